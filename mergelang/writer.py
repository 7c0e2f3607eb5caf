"""Output checkpoints: stream merged tensors into a sharded Hugging Face safetensors folder.

The layout (which tensor goes in which shard, at which byte offset) is planned up front from
shapes and dtypes alone (:func:`plan_shards`), so every shard file can be created at its final
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
import math
import os
import secrets
import shutil
import struct
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from .journal import (JOURNAL_NAME, Journal, JournalError, checksum, digest, lock_dir, prepare_work,
                      range_crc, reuse_shard, work_dir_for)
from .types import NAME_TO_TORCH, TORCH_TO_ST
from .verify import verify_output

INDEX_NAME = "model.safetensors.index.json"
#: suffixes of weight files that are never copied from ``config_from``
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                   ".pkl", ".onnx")
#: files bigger than this are never copied from ``config_from``
MAX_COPY_SIZE = 64 * 1024 * 1024


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output checkpoint: name, shape and torch dtype name (e.g. "bfloat16")."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.dtype not in NAME_TO_TORCH:
            raise ValueError(f"unsupported output dtype {self.dtype!r} for {self.name!r}")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"negative dimension in shape {self.shape} of {self.name!r}")

    def renamed(self, name: str) -> "OutputTensor":
        return OutputTensor(name, self.shape, self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return NAME_TO_TORCH[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize


@dataclass(frozen=True)
class ShardFile:
    """One planned shard file: its tensors in file order, its exact header bytes and offsets."""

    filename: str
    tensors: tuple[OutputTensor, ...]
    header: bytes  # 8-byte length prefix + space-padded JSON header
    offsets: dict[str, tuple[int, int]]  # absolute (begin, end) byte offsets in the file
    size: int  # total file size in bytes


@dataclass(frozen=True)
class ShardLayout:
    """The planned output: every shard file, in order."""

    shards: tuple[ShardFile, ...]

    @cached_property
    def _where(self) -> dict[str, tuple[ShardFile, int, int]]:
        return {name: (shard, b, e) for shard in self.shards for name, (b, e) in shard.offsets.items()}

    @cached_property
    def tensors(self) -> dict[str, OutputTensor]:
        """Every planned tensor by name, in layout order."""
        return {t.name: t for s in self.shards for t in s.tensors}

    def index(self) -> dict[str, Any]:
        """The content of ``model.safetensors.index.json`` (total_size: tensor bytes, as HF counts)."""
        return {"metadata": {"total_size": sum(t.nbytes for t in self.tensors.values())},
                "weight_map": {name: self._where[name][0].filename for name in self.tensors}}

    def where(self, name: str) -> tuple[ShardFile, int, int]:
        """The shard holding `name` and the tensor's absolute (begin, end) offsets in it."""
        return self._where[name]


def build_header(tensors: tuple[OutputTensor, ...]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A safetensors header for `tensors` laid out back to back in order, and their absolute
    offsets. The JSON is padded with spaces so the data starts 8-byte aligned."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    spans: list[tuple[int, int]] = []
    pos = 0
    for t in tensors:
        spans.append((pos, pos + t.nbytes))
        meta[t.name] = {"dtype": TORCH_TO_ST[t.torch_dtype], "shape": list(t.shape),
                        "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    text = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors pads it
    header = struct.pack("<Q", len(text)) + text
    return header, {t.name: (len(header) + b, len(header) + e) for t, (b, e) in zip(tensors, spans)}


def plan_shards(tensors: list[OutputTensor], shard_size: int) -> ShardLayout:
    """Split `tensors` greedily, in order, into shards of at most `shard_size` tensor bytes.

    A tensor that would push the current shard past `shard_size` starts a new shard; a single
    tensor bigger than `shard_size` gets a shard of its own. Files are always named
    ``model-0000i-of-0000N.safetensors``, even when there is one shard. No tensors gives one
    empty shard.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if len({t.name for t in tensors}) != len(tensors):
        raise ValueError("duplicate output tensor names")
    groups: list[list[OutputTensor]] = [[]]
    used = 0
    for t in tensors:
        if groups[-1] and used + t.nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += t.nbytes
    shards = []
    for i, group in enumerate(groups):
        members = tuple(group)
        header, offsets = build_header(members)
        size = len(header) + sum(t.nbytes for t in members)
        filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shards.append(ShardFile(filename, members, header, offsets, size))
    return ShardLayout(tuple(shards))


class WriterError(Exception):
    """A user-facing output problem: E403 (output exists) or E502 (cannot write)."""

    def __init__(self, code: str, message: str, help: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.help = help


def _os_error(path: Path | str, e: OSError, what: str = "cannot write") -> WriterError:
    reason = e.strerror or str(e)
    return WriterError("E502", f"{what} {path}: {reason}",
                       help="check free disk space and permissions of the output location")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte is written (a call may write fewer bytes)."""
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:
            raise OSError(28, "short write (no progress)")
        done += n


class CheckpointWriter:
    """Writes the tensors of a planned :class:`ShardLayout` into a fresh HF checkpoint folder.

    Use as a context manager: an exception inside the block, or leaving it without calling
    :meth:`finish`, removes everything written so far and leaves `out_dir` untouched.
    """

    def __init__(self, out_dir: str | Path, layout: ShardLayout, *, force: bool = False,
                 fingerprint: dict[str, str] | None = None, resume: bool = False):
        """`fingerprint` (what is computed and read, see journal.py) makes the writer resumable:
        it works in the deterministic folder :func:`work_dir_for` with a journal, keeps that
        folder when the block fails, and with `resume` reuses the tensors already journaled
        (:attr:`resumed`). Without it, the temporary folder has a random name and is removed
        on any failure."""
        self.out_dir = Path(os.path.abspath(out_dir))
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
                _pwrite_all(fd, memoryview(shard.header), 0)
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
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
                    self._fds[shard.filename] = fd
                    _pwrite_all(fd, memoryview(shard.header), 0)
                    os.ftruncate(fd, shard.size)
                    continue
                self._fds[shard.filename] = fd
                for name in shard.offsets:
                    if name in entries and range_crc(fd, *shard.offsets[name]) == entries[name]:
                        self.resumed.add(name)
            kept = {n: entries[n] for n in self.layout.tensors if n in self.resumed}
            path = jpath
            self._journal = Journal.create(jpath, fingerprint, kept)
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

    def _check_target(self) -> None:
        out = self.out_dir
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            kind = "a symbolic link" if out.is_symlink() else "not a folder"
            raise WriterError("E403", f"output path {out} exists and is {kind}", help="choose another -o")
        if out.is_dir() and not self.force and any(out.iterdir()):
            raise WriterError("E403", f"output folder {out} exists and is not empty",
                              help="pass --force to replace it, or choose another -o")

    def _fresh_name(self, kind: str) -> Path:
        return self.out_dir.parent / f".{self.out_dir.name}.mergelang-{kind}-{secrets.token_hex(4)}"

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
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            if data.nbytes:
                _pwrite_all(fd, memoryview(data), begin)
            if self._journal is not None:  # journaled once durable (group commit, journal.py)
                self._journal.record(name, checksum(memoryview(data)), fd, data.nbytes)
            ok = True
        except OSError as e:
            raise _os_error(self.tmp_dir / shard.filename, e) from e
        finally:
            with self._lock:
                (self._written.add if ok else self._claimed.discard)(name)
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
               extra_files: dict[str, str] | None = None) -> Path:
        """Complete the checkpoint and move it into place at `out_dir` (returned).

        Checks every tensor was written, syncs and size-checks the shards, writes the index,
        copies ``config.json`` (its dtype set to `dtype`) and other small non-weight files from
        `config_from`, the recipe and `extra_files`. On any failure everything is removed.
        The writer is closed afterwards either way.
        """
        if self._closed:
            raise ValueError("internal: finish() on a closed writer")
        try:
            return self._finish(config_from, dtype, recipe_text, recipe_filename, extra_files or {})
        except BaseException:
            self.suspend() if self.resumable else self.abort()
            raise

    def _finish(self, config_from: Path | None, dtype: str | None, recipe_text: str | None,
                recipe_filename: str, extra_files: dict[str, str]) -> Path:
        with self._lock:
            missing = [name for name in self.layout.tensors if name not in self._written]
            if missing:
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise WriterError("E502", f"internal: tensors not written: {', '.join(missing[:5])}{more}")
            self._closed = True  # no further writes; none are in flight (all are written)
            fds = dict(self._fds)
        for shard in self.layout.shards:
            try:
                os.fsync(fds[shard.filename])
            except OSError as e:
                raise _os_error(self.tmp_dir / shard.filename, e) from e
        self._close_files(commit=True)  # a failure from here on keeps every tensor for resume

        index = json.dumps(self.layout.index(), indent=2, sort_keys=True) + "\n"
        files: dict[str, str | Path] = {INDEX_NAME: index}
        if config_from is not None:
            files.update(self._config_files(Path(config_from), dtype, recipe_filename))
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
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp_dir / JOURNAL_NAME)
        self._sync_dir(self.tmp_dir)
        self._move_into_place()
        self._finished = True
        return self.out_dir

    def _config_files(self, src: Path, dtype: str | None, recipe_filename: str) -> dict[str, str | Path]:
        """``config.json`` (dtype updated) as text, and other copyable files of `src` as Paths."""
        out: dict[str, str | Path] = {}
        try:
            entries = sorted(src.iterdir())
            cfg_path = src / "config.json"
            if cfg_path.is_file():
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
                if dtype is not None and isinstance(cfg, dict):
                    cfg["torch_dtype"] = dtype
                    if "dtype" in cfg:
                        cfg["dtype"] = dtype
                out["config.json"] = json.dumps(cfg, indent=2) + "\n"
            for p in entries:
                skip = p.name in out or p.name == recipe_filename or p.name.endswith(WEIGHT_SUFFIXES)
                if not skip and not p.name.endswith(".index.json") and p.is_file() \
                        and p.stat().st_size <= MAX_COPY_SIZE:
                    out[p.name] = p
        except OSError as e:
            raise _os_error(src, e, "cannot read") from e
        except ValueError as e:  # malformed config.json
            raise WriterError("E502", f"cannot read {src / 'config.json'}: {e}") from e
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

    @staticmethod
    def _sync_dir(path: Path) -> None:
        """Best-effort fsync of a folder, so that new entries and renames survive a crash."""
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _move_into_place(self) -> None:
        out = self.out_dir
        try:
            self._check_target()  # it may have appeared or filled up since __init__
            if out.exists():
                aside = self._fresh_name("old")
                os.rename(out, aside)
                try:
                    os.replace(self.tmp_dir, out)
                except OSError:
                    os.rename(aside, out)
                    raise
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(self.tmp_dir, out)
        except OSError as e:
            raise _os_error(out, e, "cannot move the finished checkpoint to") from e
        self._sync_dir(out.parent)

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
