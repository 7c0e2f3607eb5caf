"""The arguments of `Recipe.run` checked up front: a bad one is E402 (a MergelangError that is
also the ValueError these raised before), never a raw exception from deep inside a run. The
device and memory budget become the run's `Target` here, once."""

from __future__ import annotations

import os
from typing import Any

from mergelang.diagnostics import MergelangError, error
from mergelang.passes.pipeline import Target


class RunArgumentError(MergelangError, ValueError):
    """A bad argument to `Recipe.run` (E402): a MergelangError, and a ValueError as before."""


def check_run_args(out_dir: Any, device: Any, nan_check: Any, executor: Any,
                   memory_budget: Any = None) -> Target:
    """The run's `Target`, resolved once here (device and memory budget: `target_for`), after
    the other arguments are checked. `device` may already be a Target (then without a budget:
    it has its own)."""
    from mergelang.ir.types import parse_bytes
    from mergelang.runtime.executor import target_for

    def bad(msg: str) -> RunArgumentError:
        return RunArgumentError(error("E402", f"run(): {msg}"))
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise bad(f"out_dir must be a folder path, not {out_dir!r}")
    if nan_check not in (None, "error", "warn", "off"):
        raise bad(f"nan_check must be 'error', 'warn' or 'off', not {nan_check!r}")
    if executor not in ("local", "ray"):
        raise bad(f"executor must be 'local' or 'ray', not {executor!r}")
    if isinstance(device, Target):
        if memory_budget is not None:
            raise bad("memory_budget is part of the target given as device")
        return device
    budget = parse_bytes(memory_budget) if memory_budget is not None else None
    try:
        return target_for(device, budget)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise bad(f"device must be 'auto', 'cpu' or 'cuda' (or a torch device), not {device!r}: "
                  f"{exc}") from None
