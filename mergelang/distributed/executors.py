"""The executor of a run, chosen once per run (the run contract: runtime/executor.Executor)."""

from __future__ import annotations

from typing import Any

from mergelang.diagnostics import MergelangError, error
from mergelang.passes.pipeline import Target
from mergelang.runtime.executor import Executor, local_executor


def executor_for(kind: str, target: Target, *, pipelined: bool = True, spec: Any = None,
                 digest: str = "", address: str | None = None, observer: Any = None) -> Executor:
    """"local": this machine (overlapped, or sequential with `pipelined=False`); "ray": a Ray
    cluster (`address`, else a local instance) with every worker started and ready for
    `target` and the recipe `spec` whose plan has fingerprint `digest` — before any output
    folder is made (distributed/ray_driver.py). `observer` (runtime/executor.Observer, run
    --report) sees a local run's loads and outputs."""
    if kind == "local":
        return local_executor(pipelined, observer=observer)
    if spec is None:
        raise MergelangError(error("E802", "this recipe cannot run on Ray: its models are held "
                                   "in memory (state dicts), which workers cannot read", None,
                                   "give the models as paths on a filesystem the workers share"))
    from mergelang.distributed.ray_driver import RayExecutor

    return RayExecutor(spec, target, digest, address)
