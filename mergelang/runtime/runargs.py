"""The arguments of `Recipe.run` checked up front: a bad one is E402 (a MergelangError that is
also the ValueError these raised before), never a raw exception from deep inside a run."""

from __future__ import annotations

import os
from typing import Any

from mergelang.diagnostics import MergelangError, error


class RunArgumentError(MergelangError, ValueError):
    """A bad argument to `Recipe.run` (E402): a MergelangError, and a ValueError as before."""


def check_run_args(out_dir: Any, device: Any, nan_check: Any, executor: Any) -> None:
    from mergelang.runtime.executor import resolve_device

    def bad(msg: str) -> RunArgumentError:
        return RunArgumentError(error("E402", f"run(): {msg}"))
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise bad(f"out_dir must be a folder path, not {out_dir!r}")
    if nan_check not in (None, "error", "warn", "off"):
        raise bad(f"nan_check must be 'error', 'warn' or 'off', not {nan_check!r}")
    if executor not in ("local", "ray"):
        raise bad(f"executor must be 'local' or 'ray', not {executor!r}")
    try:
        resolve_device(device)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise bad(f"device must be 'auto', 'cpu' or 'cuda' (or a torch device), not {device!r}: "
                  f"{exc}") from None
