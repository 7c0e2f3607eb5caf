"""Ctrl-C that cannot be lost before an output is moved into place.

Python raises KeyboardInterrupt at the next bytecode of the main thread; when that bytecode is in
a weakref or finalizer callback (torch frees tensors through them), the exception is printed as
"Exception ignored" and dropped, and the command went on to write its output and exit 0. The
`mergelang` process (cli.entry) installs `arm`'s handler: it records the signal and raises as
Python's does; `check` raises KeyboardInterrupt again if a signal was recorded. Every place an
output is moved into place (io/workfolder for folders, io/outguard.replace_file for files, the
tune table) calls `check` just before the rename, so an interrupted command never presents an
output as complete. Only the real process arms it (not an in-process CliRunner or library use),
and a background job that started with SIGINT ignored keeps it ignored."""

from __future__ import annotations

import signal
import threading

_SEEN = threading.Event()


def _handler(signum: int, frame: object) -> None:  # noqa: ARG001
    _SEEN.set()
    raise KeyboardInterrupt


def arm() -> None:
    """Record Ctrl-C from now on (main thread; only where Python's own handler is in place)."""
    _SEEN.clear()
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _handler)


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was recorded (even where its exception was lost)."""
    if _SEEN.is_set():
        raise KeyboardInterrupt
