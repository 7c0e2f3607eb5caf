"""The plan pipeline: the compiled plan made into the plan an executor runs, for one target.

The compiler lowers a recipe once (`passes.plan.lower`, with its statistics passes). Running it
needs a few more rewrites that depend on where and how it runs: the `Target` (device, memory
budget, whether CPU loops are fused) and, for `--resume`, which outputs are already written.
Those rewrites are the plan passes below, in one ordered tuple, each a pure function
`(plan, target, state) -> plan`; `plan_for` applies them to the apply plan and to every
statistics pass. `Recipe.run`, `Recipe.evaluate` and `--emit plan` call `plan_for`; nothing else
rewrites a plan, and an executor runs exactly what it is given.

    restrict   drop the outputs a resumed run already wrote (apply plan only: statistics must
               see every tensor)
    chunk      split outputs that do not fit the memory budget into row chunks (chunking.py)
    fuse       CPU targets: elementwise chains as generated loops (fuse.py)
    narrow_fp8 GPU targets: FP8 weights copied as codes + scales, dequantized on the device
               (BLOCK_DEQUANT; fp8_reads.py)
    batch      opt-in, any target (MERGELANG_BATCH=1): same-shape tensors through the same steps
               run as one stacked BATCH step per group (batch.py)

Statistics values are filled into the final plans when the passes before them have run
(`passes.stats.fill`, by node id: the placeholders survive chunking and fusion unchanged).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

from mergelang.passes.plan import ExecutionPlan

if TYPE_CHECKING:
    from mergelang.passes.chunking import Unchunked


@dataclass(frozen=True)
class Target:
    """Where and how a plan runs. `device` is a device type ("cpu", "cuda"); `fuse`: run CPU
    elementwise chains as generated loops (the runtime decides it from numba's availability:
    `runtime.executor.target_for`)."""

    device: str = "cpu"
    memory_budget: int | None = None
    fuse: bool = True
    #: called when fusion would change the plan: False keeps the unfused plan (e.g. numba
    #: cannot compile its runtime helpers here); None: fusion is available
    fuse_available: Callable[[], bool] | None = field(default=None, compare=False)

    @staticmethod
    def cpu(memory_budget: int | None = None) -> "Target":
        """The CPU target as the environment asks for it (`MERGELANG_FUSE=0` or
        `MERGELANG_FAST=0` turn fusion off), without importing the runtime (for `--emit`)."""
        return Target("cpu", memory_budget, fusion_enabled())


def fusion_enabled() -> bool:
    return (os.environ.get("MERGELANG_FUSE", "1") != "0"
            and os.environ.get("MERGELANG_FAST", "1") != "0")


@dataclass
class PassState:
    """What a pass may need besides the plan, and what passes report back."""

    resumed: frozenset[str] = frozenset()
    statistics: bool = False  # this is a statistics pass (not the apply plan)
    unchunked: list[Unchunked] = field(default_factory=list)


PlanPass = Callable[[ExecutionPlan, Target, PassState], ExecutionPlan]


def restrict(plan: ExecutionPlan, target: Target, state: PassState) -> ExecutionPlan:
    if state.statistics or not state.resumed:
        return plan
    from mergelang.passes.restrict import restrict_plan

    return restrict_plan(plan, state.resumed)


def chunk(plan: ExecutionPlan, target: Target, state: PassState) -> ExecutionPlan:
    if target.memory_budget is None or plan.budget == target.memory_budget:
        return plan
    from mergelang.passes.chunking import chunk_plan

    report = chunk_plan(plan, target.memory_budget)
    if not state.statistics:
        state.unchunked.extend(report.unchunked)
    return report.plan


def fuse(plan: ExecutionPlan, target: Target, state: PassState) -> ExecutionPlan:
    if target.device != "cpu" or not target.fuse or plan.graph.compute_dtype != "float32":
        return plan  # the generated loops are float32 (the plan says so for float64)
    if os.environ.get("MERGELANG_BATCH") == "1":  # CPU plans batched instead (batch.py)
        return plan
    from mergelang.passes.fuse import fuse_plan

    fused = fuse_plan(plan)
    if fused is not plan and (target.fuse_available is None or target.fuse_available()):
        return fused
    return plan


def narrow_fp8(plan: ExecutionPlan, target: Target, state: PassState) -> ExecutionPlan:
    if target.device == "cpu":  # the CPU's reader threads dequantize (overlapped with compute)
        return plan
    from mergelang.passes.fp8_reads import narrow_reads

    return narrow_reads(plan)


def batch(plan: ExecutionPlan, target: Target, state: PassState) -> ExecutionPlan:
    from mergelang.passes.batch import batch_plan, batching_requested

    if state.statistics or not batching_requested(target.device) or plan.graph.compute_dtype != "float32":
        return plan  # float64 plans widen kernel results per step (executor): not inside a batch
    return batch_plan(plan, target.memory_budget)


#: the plan passes, in order
PLAN_PASSES: tuple[tuple[str, PlanPass], ...] = (("restrict", restrict), ("chunk", chunk),
                                                 ("fuse", fuse), ("narrow_fp8", narrow_fp8),
                                                 ("batch", batch))


@dataclass(frozen=True)
class Planned:
    """The final plan (its statistics passes final too) and what the passes reported."""

    plan: ExecutionPlan
    unchunked: tuple[Unchunked, ...] = ()


def plan_for(plan: ExecutionPlan, target: Target, resumed: frozenset[str] | set[str] = frozenset()
             ) -> Planned:
    """`plan` through PLAN_PASSES for `target`; the statistics passes likewise."""
    state = PassState(frozenset(resumed))

    def run(p: ExecutionPlan, statistics: bool) -> ExecutionPlan:
        st = replace(state, statistics=statistics) if statistics else state
        for _, fn in PLAN_PASSES:
            p = fn(p, target, st)
        return p

    prepasses = tuple(run(pp, True) for pp in plan.prepasses)
    main = run(replace(plan, prepasses=()), False)
    return Planned(replace(main, prepasses=prepasses), tuple(state.unchunked))
