"""Lowering: an optimized graph becomes an `ExecutionPlan` — ordered steps with lifetimes.

Schedule: outputs in output order; before each output, the not-yet-computed values it needs,
depth first (so each input tensor is read right before its first use). A value is freed at its
last use (torch.fx's interpreter does the same). The plan records the estimated peak of live
bytes, used by `--emit plan` and checked against `--memory-budget`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

from mergelang.ir.graph import MergeGraph, attrs_text, emit_order
from mergelang.ir.ops import Op, ParamRef
from mergelang.ir.types import format_bytes


@dataclass(frozen=True)
class Step:
    nid: int
    free: tuple[int, ...]  # values whose last use is this step


@dataclass(frozen=True)
class ExecutionPlan:
    graph: MergeGraph
    steps: tuple[Step, ...]
    peak_bytes: int
    read_bytes: int
    write_bytes: int
    #: statistics passes that run before this plan (stats.py), and the statistics they compute
    prepasses: tuple["ExecutionPlan", ...] = ()
    stats: tuple[Any, ...] = ()
    #: the memory budget this plan was split into row chunks for (chunking.py); None: not split
    budget: int | None = None

    @property
    def outputs(self) -> list[int]:
        return self.graph.outputs()


def live_bytes(g: MergeGraph, nid: int) -> int:
    n = g.node(nid)
    if n.op is Op.CONST:
        return 0
    wide = 2 if n.type.dtype == "float32" and g.compute_dtype == "float64" else 1
    if n.op is Op.LOOP:  # its result, plus what one round of its body holds at once
        return n.type.nbytes * wide + n.attrs["peak"]
    return n.type.nbytes * wide


def lower(g: MergeGraph, eager: bool = False) -> ExecutionPlan:
    steps, peak = schedule(g, emit_order(g, eager))
    reads = {(n.attrs["model"], n.attrs["tensor"]): n for _, n in g.items() if n.op is Op.LOAD}
    read_bytes = sum(_src_bytes(n) for n in reads.values())
    write_bytes = sum(n.type.nbytes for _, n in g.items() if n.op is Op.OUTPUT)
    return ExecutionPlan(g, tuple(steps), peak, read_bytes, write_bytes)


def frees_after(g: MergeGraph, order: list[int], keep: Callable[[int], bool] = lambda nid: True
                ) -> dict[int, list[int]]:
    """Position in `order` -> the values (those `keep` accepts) whose last use is there."""
    last: dict[int, int] = {}
    for i, nid in enumerate(order):
        for a in g.node(nid).args:
            last[a] = i
    frees: dict[int, list[int]] = {}
    for nid, i in last.items():
        if keep(nid):
            frees.setdefault(i, []).append(nid)
    return frees


def schedule(g: MergeGraph, order: list[int]) -> tuple[list[Step], int]:
    """Steps for running `order`: each value is freed after its last use; and the peak of live
    bytes (8 bytes per float value with compute_dtype float64, else 4; outputs are handed off,
    constants are free)."""
    frees = frees_after(g, order)
    steps = []
    live = peak = 0
    for i, nid in enumerate(order):
        n = g.node(nid)
        if n.op is not Op.OUTPUT:
            live += live_bytes(g, nid)
        peak = max(peak, live)
        free = tuple(sorted(frees.get(i, ())))
        live -= sum(live_bytes(g, a) for a in free)
        steps.append(Step(nid, free))
    return steps, peak


def rescheduled(plan: ExecutionPlan, g: MergeGraph, order: list[int]) -> ExecutionPlan:
    """`plan` rewritten to graph `g`, running `order` (frees and peak recomputed)."""
    steps, peak = schedule(g, order)
    return replace(plan, graph=g, steps=tuple(steps), peak_bytes=peak)


def _src_bytes(n) -> int:
    return n.type.with_(dtype=n.attrs["src_dtype"]).nbytes


def format_plan(plan: ExecutionPlan) -> str:
    """Stable text for `--emit plan`: one line per step, with the values freed after it; with
    model-wide statistics, one section per streaming pass."""
    if not plan.prepasses:
        return _format_steps(plan)
    n = len(plan.prepasses) + 1
    parts = []
    for i, pp in enumerate(plan.prepasses):
        specs = [s for s in plan.stats if s.level == i]
        lines = [f"# pass {i + 1} of {n}: model-wide statistics"]
        for s in specs:
            held = f", holds {_size(s.buffer_bytes)}" if s.buffer_bytes else \
                (", radix select: this pass streams twice" if s.rounds > 1 else "")
            lines.append(f"#   {s.key}: {s.numel} entries per model from {s.tensors} tensors{held}")
        parts.append("\n".join(lines) + "\n" + _format_steps(pp))
    parts.append(f"# pass {n} of {n}: apply\n" + _format_steps(plan))
    return "".join(parts)


def _format_steps(plan: ExecutionPlan) -> str:
    g = plan.graph
    local = {step.nid: i for i, step in enumerate(plan.steps)}
    names = {g.node(o).attrs["name"] for o in plan.outputs}
    budget = f"; split into row chunks for a budget of {_size(plan.budget)}" if plan.budget else ""
    lines = [f"# {len(names)} outputs, {len(plan.steps)} steps; reads {_size(plan.read_bytes)}, "
             f"writes {_size(plan.write_bytes)}, peak live {_size(plan.peak_bytes)} ({g.compute_dtype} compute)"
             f"{budget}"]
    if g.compute_dtype == "float64":
        lines.append("# compute_dtype float64: inputs upcast to float64 on load; no fused CPU loops "
                     "(they are generated for float32), torch kernels run every op")
    attr_text: dict[tuple, str] = {}  # memo: most ops repeat per tensor (the text is the same)
    type_text: dict[Any, str] = {}
    for step in plan.steps:
        n = g.node(step.nid)
        args = ", ".join(f"%{local[a]}" for a in n.args)
        if n.op is Op.LOAD:
            what = f"load {n.attrs['model']}[{n.attrs['tensor']!r}]{_rows(n)}"
        elif n.op is Op.OUTPUT:
            what = f"write {n.attrs['name']!r}{_rows(n)} as {n.attrs['dtype']} <- {args}"
        elif n.op is Op.STAT_VALUE:
            what = f"stat {n.attrs['key']!r}"
        elif n.op is Op.PARAM:
            what = f"param {ParamRef(n.attrs['expr'])!r}"
        elif n.op is Op.CONST:
            what = f"const {n.attrs['value']!r}"
        else:
            key = (n.op, n.attrs)
            text = attr_text.get(key)
            if text is None:
                text = attr_text[key] = attrs_text(n)
            what = f"{n.op.value} {args} {text}".rstrip()
        free = f"  ; free {', '.join(f'%{local[a]}' for a in step.free)}" if step.free else ""
        ty = type_text.get(n.type)
        if ty is None:
            ty = type_text[n.type] = str(n.type if n.type.dtype != "float32" or n.op is Op.OUTPUT
                                         else n.type.with_(dtype=g.compute_dtype))
        lines.append(f"%{local[step.nid]} = {what} : {ty}{free}")
    return "\n".join(lines) + "\n"


def _rows(n) -> str:
    """` rows A:B` (` of N` for a write) for a row chunk's LOAD or OUTPUT, else empty."""
    rows = n.attrs.get("rows")
    if rows is None:
        return ""
    return f" rows {rows[0]}:{rows[1]}" + (f" of {rows[2]}" if len(rows) > 2 else "")


def _size(n: int) -> str:
    return format_bytes(n)
