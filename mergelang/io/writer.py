"""Output checkpoints: stream merged tensors into a sharded Hugging Face safetensors folder.

The layout (which tensor goes in which shard, at which byte offset) is planned up front from
shapes and dtypes alone (:func:`layout.plan_shards`), so every shard file can be created at its final
size before any tensor exists. Tensors are then written with ``os.pwrite`` at their planned
offsets, from any thread and in any order, straight from memory to disk.

Everything is written into a temporary folder next to the destination, verified (shard sizes,
headers and index re-read from disk) and moved into place only by :meth:`CheckpointWriter.finish`,
so a failed or interrupted merge never leaves a half-written output folder behind. A resumable
writer (given a run fingerprint) works in a deterministic work folder with a journal instead,
kept on failure so that a rerun with ``resume=True`` continues where it stopped (journal.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from mergelang.io.journal import (JOURNAL_NAME, NOFOLLOW, WORK_MARKER, Journal, JournalError, checksum, checksum_more, digest, lock_dir,
                      prepare_work, range_crc, reuse_shard, work_dir_for)
from mergelang.errors import CheckpointError
from mergelang.io.inputs import check_json_object, reference_files
from mergelang.io.layout import OutputTensor, ShardFile, ShardLayout, build_header, plan_shards
from mergelang.io.outguard import MANIFEST_NAME, manifest_text
from mergelang.io.workfolder import WorkFolder, WriterError, os_error as _os_error
from mergelang.io.verify import verify_output

__all__ = ["CheckpointWriter", "WriterError", "OutputTensor", "ShardFile", "ShardLayout",
           "build_header", "plan_shards"]  # the layout types live in layout.py

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte is written (a call may write fewer bytes)."""
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:
            raise OSError(28, "short write (no progress)")
        done += n


def bytes_of(tensor: torch.Tensor) -> Any:
    """The tensor's bytes as a flat numpy uint8 array (a view when it is a contiguous CPU tensor)."""
    import torch

    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


class CheckpointWriter(WorkFolder):
    """Writes the tensors of a planned :class:`ShardLayout` into a fresh HF checkpoint folder.

    Use as a context manager: an exception inside the block, or leaving it without calling
    :meth:`finish`, removes everything written so far and leaves `out_dir` untouched.
    """

    def __init__(self, out_dir: str | Path, layout: ShardLayout, *, force: bool = False,
                 fingerprint: dict[str, str] | None = None, resume: bool = False,
                 fsync: bool = True, protected: Sequence[Path] = ()):
        """`fingerprint` (what is computed and read, see journal.py) makes the writer resumable:
        it works in the deterministic folder :func:`work_dir_for` with a journal, keeps that
        folder when the block fails, and with `resume` reuses the tensors already journaled
        (:attr:`resumed`). Without it, the temporary folder has a random name and is removed
        on any failure. `fsync=False` skips flushing the data to the disk (the journal's group
        syncs and the shards' fsync before the rename: see `Journal`): faster where the disk is
        slower than the merge, at the price of durability against a power loss. `protected`:
        the inputs, which the output path may not be, contain or lie inside (outguard.py)."""
        self.out_dir = Path(os.path.abspath(out_dir))
        self.protected = tuple(protected)
        self.fsync = fsync
        self.layout = layout
        self.force = force
        self.resumable = fingerprint is not None
        self.messages: list[str] = []  # what happened to an existing work folder, for the user
        self.resumed: set[str] = set()  # tensors kept from an interrupted run (resume)
        self._journal: Journal | None = None
        self._lock_fd = -1  # flock on the work folder: one run per output at a time
        self._check_target()
        self._lock = threading.Condition()
        self._inflight = 0
        self._closed = False
        self._finished = False
        self._claimed: set[str] = set()  # names a write has started for
        self._written: set[str] = set()  # names written completely
        self._crcs: dict[str, int] = {}  # CRC-32C of each tensor written (the manifest's digests)
        #: row-chunked tensors being written: rows done, next row, running CRC (in-order chunks)
        self._partial: dict[str, list[int]] = {}
        self._fds: dict[str, int] = {}
        parent = self.out_dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            if self.resumable:
                self.tmp_dir = work_dir_for(self.out_dir)
            else:
                self.tmp_dir = self._fresh_name("tmp")
                self.tmp_dir.mkdir()
        except OSError as e:
            raise _os_error(parent, e, "cannot create a folder in") from e
        if self.resumable:
            assert fingerprint is not None
            fp = {**fingerprint, "layout": self._layout_fingerprint()}
            self._open_work(fp, resume)
            return
        path = self.tmp_dir
        try:
            for shard in layout.shards:
                path = self.tmp_dir / shard.filename
                fd = self._fds[shard.filename] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                pwrite_all(fd, memoryview(shard.header), 0)
                os.ftruncate(fd, shard.size)  # final size up front; tensors fill it in place
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise _os_error(path, e) from e
            raise

    # ------------------------------------------------------------------ resumable work folder

    def _layout_fingerprint(self) -> str:
        return digest(p for s in self.layout.shards for p in (s.filename, s.header))

    def _open_work(self, fingerprint: dict[str, str], resume: bool) -> None:
        """Create the work folder, or (resume) validate and reuse an existing one."""
        work = self.tmp_dir
        jpath = work / JOURNAL_NAME
        try:
            entries = prepare_work(work, fingerprint, resume, self.messages)
            self._lock_fd = lock_dir(work)
        except JournalError as e:
            raise WriterError(e.code, str(e), e.help) from None
        except OSError as e:
            raise _os_error(work, e) from e
        path = work
        try:
            for shard in self.layout.shards:
                path = work / shard.filename
                fd = reuse_shard(path, shard.size, shard.header) if entries else -1
                if fd < 0:
                    entries = {n: c for n, c in entries.items() if n not in shard.offsets}
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | NOFOLLOW, 0o666)
                    self._fds[shard.filename] = fd
                    pwrite_all(fd, memoryview(shard.header), 0)
                    os.ftruncate(fd, shard.size)
                    continue
                self._fds[shard.filename] = fd
                for name in shard.offsets:
                    if name in entries and range_crc(fd, *shard.offsets[name]) == entries[name]:
                        self.resumed.add(name)
            kept = {n: entries[n] for n in self.layout.tensors if n in self.resumed}
            self._crcs.update(kept)
            path = jpath
            self._journal = Journal.create(jpath, fingerprint, kept, sync=self.fsync)
        except BaseException as e:
            self._close_files()
            if isinstance(e, OSError):
                raise _os_error(path, e) from e
            raise
        self._claimed |= self.resumed
        self._written |= self.resumed
        if resume and entries:
            self.messages.append(f"resuming: {len(self.resumed)} of {len(self.layout.tensors)} "
                                 f"tensors already written in {work}")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor at its planned offset. Thread-safe; any order; each name once."""
        try:
            shard, begin, _ = self.layout.where(name)
        except KeyError:
            raise ValueError(f"internal: {name!r} is not in the output layout") from None
        planned = self.layout.tensors[name]
        if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.torch_dtype:
            raise ValueError(f"internal: {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                             f"planned {planned.shape} {planned.torch_dtype}")
        with self._lock:
            if self._closed:
                raise ValueError(f"internal: write of {name!r} to a closed writer")
            if name in self._claimed:
                raise ValueError(f"internal: {name!r} written twice")
            self._claimed.add(name)
            self._inflight += 1
            fd = self._fds[shard.filename]
        ok = False
        try:
            data = bytes_of(tensor)
            if data.nbytes:
                pwrite_all(fd, memoryview(data), begin)
            crc = self._crcs[name] = checksum(memoryview(data))
            if self._journal is not None:  # journaled once durable (group commit, journal.py)
                self._journal.record(name, crc, fd, data.nbytes)
            ok = True
        except OSError as e:
            raise _os_error(self.tmp_dir / shard.filename, e) from e
        finally:
            with self._lock:
                (self._written.add if ok else self._claimed.discard)(name)
                self._inflight -= 1
                self._lock.notify_all()

    def target(self, name: str) -> tuple[str, int, int]:
        """Where tensor `name`'s bytes go: (shard file path, begin, end) — for a writer in another
        process (the Ray executor's workers), which then reports them with `record_written`."""
        shard, begin, end = self.layout.where(name)
        return str(self.tmp_dir / shard.filename), begin, end

    def record_written(self, name: str, crc: int, nbytes: int) -> None:
        """Journal tensor `name` as written by another process (its bytes are at `target(name)`,
        with checksum `crc`): the driver's side of a distributed run."""
        shard, begin, end = self.layout.where(name)
        if nbytes != end - begin:
            raise ValueError(f"internal: {name!r} reported {nbytes} bytes, planned {end - begin}")
        with self._lock:
            if self._closed or name in self._claimed:
                raise ValueError(f"internal: {name!r} written twice or after the end")
            self._claimed.add(name)
            fd = self._fds[shard.filename]
        self._crcs[name] = crc
        if self._journal is not None:
            self._journal.record(name, crc, fd, nbytes)
        with self._lock:
            self._written.add(name)
            self._lock.notify_all()

    def write_rows(self, name: str, tensor: torch.Tensor, start: int, total: int) -> None:
        """Write rows `start:start+len(tensor)` of `name` (a row chunk, chunking.py) at their
        byte offset. Thread-safe; each row once. The tensor counts as written, and is journaled,
        only when all its rows are (chunks in order keep a running CRC; otherwise the bytes are
        read back once)."""
        try:
            shard, begin, end = self.layout.where(name)
        except KeyError:
            raise ValueError(f"internal: {name!r} is not in the output layout") from None
        planned = self.layout.tensors[name]
        n = int(tensor.shape[0]) if tensor.dim() else -1
        if (not planned.shape or planned.shape[0] != total or tuple(tensor.shape[1:]) != planned.shape[1:]
                or tensor.dtype != planned.torch_dtype or start < 0 or n < 0 or start + n > total):
            raise ValueError(f"internal: rows {start}:{start + n} of {name!r} ({tuple(tensor.shape)} "
                             f"{tensor.dtype}) do not fit the planned {planned.shape} {planned.torch_dtype}")
        row = (end - begin) // total if total else 0
        with self._lock:
            if self._closed:
                raise ValueError(f"internal: write of {name!r} to a closed writer")
            if name in self._written or (name in self._claimed and name not in self._partial):
                raise ValueError(f"internal: {name!r} written twice")
            state = self._partial.setdefault(name, [0, 0, 0])
            self._claimed.add(name)
            self._inflight += 1
            fd = self._fds[shard.filename]
        ok = complete = False
        try:
            data = bytes_of(tensor)
            if data.nbytes:
                pwrite_all(fd, memoryview(data), begin + start * row)
            with self._lock:
                in_order = state[1] == start
                state[0] += n
                state[1] = start + n if in_order else -1
                if in_order:
                    state[2] = checksum_more(memoryview(data), state[2])
                complete = state[0] == total
            if complete:
                crc = self._crcs[name] = state[2] if state[1] == total else range_crc(fd, begin, end)
                if self._journal is not None:
                    self._journal.record(name, crc, fd, end - begin)
            ok = True
        except OSError as e:
            raise _os_error(self.tmp_dir / shard.filename, e) from e
        finally:
            with self._lock:
                if not ok:
                    self._partial.pop(name, None)
                    self._claimed.discard(name)
                elif complete:
                    self._partial.pop(name, None)
                    self._written.add(name)
                self._inflight -= 1
                self._lock.notify_all()

    def _close_files(self, commit: bool = False) -> None:
        """Stop accepting writes, wait for writes in flight, (`commit`: journal the tensors
        written since the last group commit), close every shard file."""
        with self._lock:
            self._closed = True
            deadline = time.monotonic() + 60  # a Ctrl-C inside write() may leave a count behind
            while self._inflight and time.monotonic() < deadline:
                self._lock.wait(timeout=1.0)
            fds, self._fds = self._fds, {}
        if self._journal is not None:
            if commit:
                with contextlib.suppress(OSError):  # e.g. the disk is full: those are redone
                    self._journal.commit()
            self._journal.close()
        lock_fd, self._lock_fd = self._lock_fd, -1
        for fd in [*fds.values(), *([lock_fd] if lock_fd >= 0 else [])]:
            with contextlib.suppress(OSError):
                os.close(fd)

    def finish(self, *, config_from: Path | None = None, dtype: str | None = None,
               recipe_text: str | None = None, recipe_filename: str = "mergelang_recipe.mrg",
               extra_files: dict[str, str] | None = None, copies: dict[str, Path] | None = None,
               manifest: dict[str, Any] | None = None) -> Path:
        """Complete the checkpoint and move it into place at `out_dir` (returned).

        Checks every tensor was written, syncs and size-checks the shards, writes the index,
        copies ``config.json`` (its dtype set to `dtype`) and other small non-weight files from
        `config_from` (or exactly the files `copies`, checked at compile time:
        inputs.reference_files), the recipe, `extra_files`, and last the manifest that marks the
        folder as a mergelang output (`manifest`: extra fields). On any failure everything is
        removed. The writer is closed afterwards either way.
        """
        if self._closed:
            raise ValueError("internal: finish() on a closed writer")
        try:
            return self._finish(config_from, dtype, recipe_text, recipe_filename, extra_files or {},
                                copies, manifest)
        except BaseException:
            self.suspend() if self.resumable else self.abort()
            raise

    def _finish(self, config_from: Path | None, dtype: str | None, recipe_text: str | None,
                recipe_filename: str, extra_files: dict[str, str], copies: dict[str, Path] | None,
                manifest: dict[str, Any] | None) -> Path:
        with self._lock:
            missing = [name for name in self.layout.tensors if name not in self._written]
            if missing:
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise WriterError("E502", f"internal: tensors not written: {', '.join(missing[:5])}{more}")
            self._closed = True  # no further writes; none are in flight (all are written)
            fds = dict(self._fds)
        for shard in self.layout.shards if self.fsync else ():
            try:
                os.fsync(fds[shard.filename])
            except OSError as e:
                raise _os_error(self.tmp_dir / shard.filename, e) from e
        self._close_files(commit=True)  # a failure from here on keeps every tensor for resume

        index = json.dumps(self.layout.index(), indent=2, sort_keys=True) + "\n"
        files: dict[str, str | Path] = {INDEX_NAME: index} if self.layout.indexed else {}
        if copies is not None or config_from is not None:
            files.update(self._config_files(config_from, copies, dtype, recipe_filename))
        if recipe_text is not None:
            files[recipe_filename] = recipe_text
        files.update(extra_files)
        for fname, content in files.items():
            self._put(fname, content)
        problem = verify_output(self.tmp_dir, self.layout)
        if problem:
            raise WriterError("E506", f"the finished checkpoint failed verification: {problem}",
                              help="nothing was moved to the output folder; this is likely a bug "
                                   "or a failing disk")
        if self.resumable:
            for name in (JOURNAL_NAME, WORK_MARKER):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.tmp_dir / name)
        try:
            names = [p.name for p in self.tmp_dir.iterdir()]
        except OSError as e:
            raise _os_error(self.tmp_dir, e) from e
        self._put(MANIFEST_NAME, manifest_text(names, extra={**(manifest or {}),
                                                             "digests": self._digests(names)}))
        self._sync_dir(self.tmp_dir)
        self._move_into_place()
        self._finished = True
        return self.out_dir

    def _digests(self, names: list[str]) -> dict[str, str]:
        """The digest of every file in the finished folder (io/digests.py): each shard's from
        the CRC-32C of the tensors as written, each other (small) file's SHA-256, read back."""
        from mergelang.io.digests import sha256_file, tensor_digest

        out = {}
        for shard in self.layout.shards:
            order = sorted(shard.offsets, key=lambda n: shard.offsets[n][0])
            out[shard.filename] = tensor_digest(bytes(shard.header), [(n, self._crcs[n]) for n in order])
        for name in names:
            if name not in out:
                try:
                    out[name] = sha256_file(self.tmp_dir / name)
                except OSError as e:
                    raise _os_error(self.tmp_dir / name, e) from e
        return out

    def _config_files(self, src: Path | None, copies: dict[str, Path] | None, dtype: str | None,
                      recipe_filename: str) -> dict[str, str | Path]:
        """``config.json`` (dtype updated) as text, and the other files to copy as Paths: the
        checked `copies`, or those of folder `src` (inputs.reference_files)."""
        try:
            if copies is None:
                assert src is not None
                copies = reference_files(Path(src), recipe_filename)
            out: dict[str, str | Path] = dict(copies)
            if "config.json" in copies:
                cfg = check_json_object(copies["config.json"])
                if dtype is not None:
                    cfg["torch_dtype"] = dtype
                    if "dtype" in cfg:
                        cfg["dtype"] = dtype
                out["config.json"] = json.dumps(cfg, indent=2) + "\n"
        except OSError as e:
            raise _os_error(src or "the reference model", e, "cannot read") from e
        except CheckpointError as e:  # changed since the compile-time check
            raise WriterError(e.code, e.message, e.help) from None
        return out

    def _put(self, fname: str, content: str | Path) -> None:
        """Write `content` (text, or a file to copy) as `fname` in the temporary folder."""
        if not fname or "/" in fname or "\\" in fname or fname in (".", ".."):
            raise ValueError(f"internal: bad output file name {fname!r}")
        path = self.tmp_dir / fname
        try:
            if isinstance(content, Path):
                shutil.copyfile(content, path)
            else:
                path.write_text(content, encoding="utf-8")
        except OSError as e:
            raise _os_error(path, e) from e

    def complete(self, files: Mapping[str, Any]) -> Path:
        """`finish(**files)` (the Sink protocol's form)."""
        return self.finish(**files)

    def suspend(self) -> None:
        """Close the files and keep the work folder (with its journal) for a later resume."""
        self._close_files(commit=True)

    def abort(self) -> None:
        """Close the files and remove the temporary folder, ignoring errors. Idempotent."""
        self._close_files()
        tmp = getattr(self, "tmp_dir", None)
        if tmp is not None and not self._finished:
            shutil.rmtree(tmp, ignore_errors=True)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._finished:
            if self.resumable and exc_type is not None:
                self.suspend()  # interrupted or failed: keep the finished tensors for --resume
            else:
                self.abort()
