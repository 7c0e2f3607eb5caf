"""The work folder every output is written in, and the rules for moving it into place: the
base of the single-output `CheckpointWriter` and the `MultiWriter` (one implementation, no
borrowed methods), and `Sink`, the protocol of what an executor's results are written to."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol

from mergelang.errors import CodedIOError
from mergelang.io import interrupt
from mergelang.io.outguard import OutputError, check_output

if TYPE_CHECKING:
    import torch


class Sink(Protocol):
    """Where a run's outputs go (the checkpoint writers; tests use in-memory ones).

    `write(name, tensor)` takes a whole output tensor, `write_rows(name, rows, start, total)`
    a row chunk; both are thread-safe, in any order, each name once. `complete(files)` finishes
    the output(s) (the small files to add: config, tokenizer, recipe copy, manifest fields) and
    moves them into place; `suspend()` keeps the work for `--resume`. `resumed` names the
    outputs an interrupted run already wrote; `messages` are lines for the user."""

    resumed: set[str]
    messages: list[str]
    resumable: bool
    tmp_dir: Path

    def write(self, name: str, tensor: "torch.Tensor") -> None: ...

    def write_rows(self, name: str, tensor: "torch.Tensor", start: int, total: int) -> None: ...

    def complete(self, files: Mapping[str, Any]) -> Path: ...

    def suspend(self) -> None: ...


class WriterError(CodedIOError):
    """A user-facing output problem: E403 (output exists), E404 (overlaps an input) or E502
    (cannot write)."""


def os_error(path: Path | str, e: OSError, what: str = "cannot write") -> WriterError:
    reason = e.strerror or str(e)
    return WriterError("E502", f"{what} {path}: {reason}",
                       help="check free disk space and permissions of the output location")


class WorkFolder:
    """An output destination `out_dir` (absolute) that may not overlap `protected` (the inputs)
    and is replaced only with `force` (outguard.py); work happens in a folder beside it that is
    renamed into place once complete."""

    out_dir: Path
    force: bool
    protected: tuple[Path, ...]
    tmp_dir: Path
    report_ok = False  # inspect's ReportFolder: may replace its own report inside an output

    def _check_target(self) -> None:
        """The output path may be written (outguard.py): not an input, and absent, empty, or
        (with force) an earlier mergelang output."""
        try:
            check_output(self.out_dir, self.protected, self.force, self.report_ok)
        except OutputError as e:
            raise WriterError(e.code, e.message, e.help) from None

    def _fresh_name(self, kind: str) -> Path:
        return self.out_dir.parent / f".{self.out_dir.name}.mergelang-{kind}-{secrets.token_hex(4)}"

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
            interrupt.check()  # a Ctrl-C whose exception was lost: not presented as complete
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
            raise os_error(out, e, "cannot move the finished checkpoint to") from e
        self._sync_dir(out.parent)

