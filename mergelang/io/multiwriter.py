"""Several output checkpoints from one run (named `merge "NAME" from ...` blocks), atomically.

Output `NAME`'s tensors reach :meth:`MultiWriter.write` as ``NAME/TENSOR``. Each output is an
ordinary resumable :class:`~mergelang.io.writer.CheckpointWriter` whose destination is
``WORK/NAME``, with ``WORK`` the run's work folder (``.OUTDIR.mergelang-work``, the same name a
single-output run uses); so each output has its own preallocated shards and journal in
``WORK/.NAME.mergelang-work``. :meth:`MultiWriter.finish` completes and verifies every output
(each is renamed to ``WORK/NAME``), then renames ``WORK`` to ``OUTDIR`` once: nothing appears
at ``OUTDIR`` before every output is complete. After a failure or a kill, ``WORK`` is kept and
a run with ``resume=True`` continues every output from its journal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping, Sequence

import torch

from mergelang.io.journal import WORK_MARKER, JournalError, check_ours, lock_dir, mark_ours, work_dir_for
from mergelang.io.outguard import MANIFEST_NAME, manifest_text
from mergelang.io.workfolder import WorkFolder, os_error
from mergelang.io.writer import CheckpointWriter, ShardLayout, WriterError


class MultiWriter(WorkFolder):
    """Writes named checkpoints into sub-folders of `out_dir` (always resumable: `fingerprint`
    as for :class:`CheckpointWriter`). Use as a context manager."""

    def __init__(self, out_dir: str | Path, layouts: Mapping[str, ShardLayout], *, force: bool = False,
                 fingerprint: dict[str, str], resume: bool = False, fsync: bool = True,
                 protected: Sequence[Path] = ()):
        self.out_dir = Path(os.path.abspath(out_dir))
        self.protected = tuple(protected)
        self.force = force
        self.resumable = True
        self.messages: list[str] = []
        self.resumed: set[str] = set()  # `NAME/TENSOR` kept from an interrupted run
        self.writers: dict[str, CheckpointWriter] = {}
        self._finished = False
        self._lock_fd = -1
        self._check_target()
        self.tmp_dir = work = work_dir_for(self.out_dir)
        try:
            self._prepare(work, set(layouts), resume)
            for name, layout in layouts.items():
                w = self.writers[name] = CheckpointWriter(work / name, layout, fingerprint=fingerprint,
                                                          resume=resume, fsync=fsync)
                self.messages += [m for m in w.messages if not m.startswith("nothing to resume")]
                self.resumed |= {f"{name}/{t}" for t in w.resumed}
        except JournalError as e:
            self.suspend()
            raise WriterError(e.code, str(e), e.help) from None
        except OSError as e:
            self.suspend()
            raise os_error(work, e) from e
        except BaseException:
            self.suspend()
            raise

    def _prepare(self, work: Path, names: set[str], resume: bool) -> None:
        """Create (or, resuming, reuse) the work folder; keep only the outputs' own work folders."""
        if work.is_symlink() or (work.exists() and not work.is_dir()):
            raise JournalError("E505", f"the work folder {work} is not a folder", "remove it and run again")
        keep = {f".{n}.mergelang-work" for n in names} | {WORK_MARKER} if resume else {WORK_MARKER}
        if work.is_dir():
            check_ours(work)  # only a folder mergelang made is emptied
            os.close(lock_dir(work))  # refuse early if another run holds it
            stale = [p for p in work.iterdir() if p.name not in keep]
            if stale and not resume:
                self.messages.append(f"replaced the work folder {work} left by an interrupted run "
                                     "(use --resume to continue such a run instead)")
            for p in stale:  # another run's files, or an output finished just before a kill
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()
        elif resume:
            self.messages.append(f"nothing to resume (no work folder {work}); starting from the beginning")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        work.mkdir(exist_ok=True)
        mark_ours(work)
        self._lock_fd = lock_dir(work)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write tensor `NAME/TENSOR` of output NAME. Thread-safe; any order; each name once."""
        out, _, tensor_name = name.partition("/")
        writer = self.writers.get(out)
        if writer is None:
            raise ValueError(f"internal: {name!r} names no output")
        writer.write(tensor_name, tensor)

    def target(self, name: str) -> tuple[str, int, int]:
        out, _, tensor_name = name.partition("/")
        return self.writers[out].target(tensor_name)

    def record_written(self, name: str, crc: int, nbytes: int) -> None:
        out, _, tensor_name = name.partition("/")
        self.writers[out].record_written(tensor_name, crc, nbytes)

    def write_rows(self, name: str, tensor: torch.Tensor, start: int, total: int) -> None:
        """Write a row chunk of tensor `NAME/TENSOR` (see CheckpointWriter.write_rows)."""
        out, _, tensor_name = name.partition("/")
        writer = self.writers.get(out)
        if writer is None:
            raise ValueError(f"internal: {name!r} names no output")
        writer.write_rows(tensor_name, tensor, start, total)

    def finish(self, files: Mapping[str, Mapping[str, Any]]) -> Path:
        """Finish every output (`files[NAME]`: CheckpointWriter.finish's keyword arguments),
        then move the whole folder into place at `out_dir` (returned)."""
        try:
            for name, w in self.writers.items():
                w.finish(**files.get(name, {}))
            try:
                (self.tmp_dir / WORK_MARKER).unlink(missing_ok=True)
                (self.tmp_dir / MANIFEST_NAME).write_text(manifest_text([], outputs=self.writers),
                                                          encoding="utf-8")
            except OSError as e:
                raise os_error(self.tmp_dir / MANIFEST_NAME, e) from e
            self._release()
            self._sync_dir(self.tmp_dir)
            self._move_into_place()
        except BaseException:
            self.suspend()
            raise
        self._finished = True
        return self.out_dir

    def _release(self) -> None:
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def complete(self, files: Mapping[str, Any]) -> Path:
        """`finish(files)` (the Sink protocol's form: files per output name)."""
        return self.finish(files)

    def suspend(self) -> None:
        """Close every output's files and keep the work folder for a later resume."""
        for w in self.writers.values():
            if not w._finished:
                w.suspend()
        self._release()

    def __enter__(self) -> "MultiWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._finished:
            self.suspend()
