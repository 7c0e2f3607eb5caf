"""Inputs that change during a run. Each input file's size and modification time are taken
before the merge and compared after it (`inputs_unchanged`: E508, the output is not moved into
place). A SIGBUS while reading a memory-mapped input (a shard truncated by another process after it
was mapped) ends the process with a coded message and exit status 1, not exit 135 without a
word. The checks before each map (checkpoint.SafetensorsSource._unchanged, E508) catch a file
that shrank before it is read; this handler covers the window while a mapping is being read.

The handler is a ctypes callback (no compiler needed): it writes the message and calls
`os._exit(1)`. Output folders are only renamed into place once complete, so nothing half-written
is ever presented as an output; the work folder stays (a resume then refuses the changed
inputs: E504)."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

MESSAGE = (b"error[E508]: an input file shrank while mergelang was reading it (a memory-mapped "
           b"shard truncated or rewritten during the merge): the run stopped, no output was "
           b"written\n = help: rerun once the inputs are complete\n")
_installed: list[Any] = []  # the callback, kept alive


def _on_sigbus(signum: int) -> None:  # pragma: no cover - runs in a killed child (tested)
    os.write(2, MESSAGE)
    os._exit(1)


def install_sigbus() -> bool:
    """Install the handler (once per process; POSIX only). Returns whether it is installed."""
    if _installed:
        return True
    if not hasattr(signal, "SIGBUS") or sys.platform == "win32":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        proto = ctypes.CFUNCTYPE(None, ctypes.c_int)
        handler = proto(_on_sigbus)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, proto]
        libc.signal(int(signal.SIGBUS), handler)
    except (OSError, AttributeError):  # pragma: no cover - no C library to call
        return False
    _installed.append(handler)
    return True


def input_stats(models: Any) -> dict[str, tuple[int, int, int]]:
    """(size, mtime_ns, inode) of every file the models' tensors are read from."""
    out: dict[str, tuple[int, int, int]] = {}
    for m in (models or {}).values():
        if m is None:
            continue
        for info in m.tensors().values():
            f = getattr(info, "file", "")
            if f and f not in out:
                try:
                    st = os.stat(f)
                    out[f] = (st.st_size, st.st_mtime_ns, st.st_ino)
                except OSError:
                    out[f] = (-1, -1, -1)
    return out


def inputs_unchanged(before: dict[str, tuple[int, int, int]]) -> None:
    """CheckpointError E508 when an input file changed (size, time or inode) since `before`:
    the tensors read from it may mix two versions."""
    from mergelang.errors import CheckpointError

    for f, was in before.items():
        try:
            st = os.stat(f)
            now = (st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError:
            now = (-1, -1, -1)
        if now != was:
            raise CheckpointError(f"{f} changed during the merge (size {was[0]} -> {now[0]} bytes)",
                                  "an input was modified, truncated or replaced while it was read: "
                                  "the output is not written; rerun once the inputs are stable",
                                  "E508")
