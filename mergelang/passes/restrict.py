"""The plan pass for `--resume`: drop the outputs an interrupted run already wrote."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable

from mergelang.ir.ops import Op
from mergelang.passes.plan import schedule


def restrict_plan(plan: Any, done: Iterable[str]) -> Any:
    """`plan` without the outputs named in `done` and the steps only they needed; values are
    freed after their last use among the remaining steps."""
    done = set(done)
    if not done:
        return plan
    g = plan.graph
    needed = g.needed(nid for nid in g.outputs() if g.node(nid).attrs["name"] not in done)
    order = [s.nid for s in plan.steps if s.nid in needed]
    steps = tuple(schedule(g, order)[0])  # the peak stays the full plan's (a bound for this one)
    write = sum(g.node(n).type.nbytes for n in order if g.node(n).op is Op.OUTPUT)
    return replace(plan, steps=steps, write_bytes=write)
