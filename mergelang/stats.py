"""Model-wide statistics: scopes that span every tensor of a model, planned as streaming passes.

`model_sum(x)` and `model_topk_value(x, fraction)` elaborate, per output tensor, into a
`MODEL_STAT` node whose value is one number per model (a plain number for an unstacked `x`)
computed over *every tensor whose rule reaches the same call site*. The statistic's key is the
call chain (each user call site down to the intrinsic's own span) plus its kind, fraction and
model count: two rules calling `ties_global` are two statistics; tensors routed to another rule
(e.g. `"*norm*" => base`) do not take part.

The compiler (`split_stats`) turns one elaborated graph into streaming passes over the inputs:

* statistics pass d (d = 0, 1, ...): the graph's outputs are replaced by "feeds" — one OUTPUT
  per MODEL_STAT node whose input depends on statistics of passes < d only — and every
  MODEL_STAT node becomes a `STAT_VALUE` placeholder; dead code elimination keeps only what the
  feeds need. A `StatCollector` sink reduces the feeds per key.
* the apply pass: the normal plan, with the placeholders.

Before each pass runs, `fill` replaces its placeholders with CONST nodes holding the values found
so far (same node ids, so the lowered schedule stays valid). Whole models are never loaded: each
pass streams tensors like an ordinary merge.

Memory: `model_sum` keeps one float64 accumulator per model. `model_topk_value` is exact: it
keeps a float32 copy of every routed entry (models x entries x 4 bytes, shown by `--emit plan`)
and takes `torch.kthvalue` of their concatenation — the same number as the reference
implementation, but bounded by host memory (a two-level radix histogram would make it constant
memory at the cost of one more pass; not done).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from .diagnostics import Span
from .graph import MergeGraph, Node
from .intrinsics import intrinsic
from .kernels import KERNELS
from .ops import Attrs, Op
from .values import Const, TensorV, Value, is_number


@dataclass(frozen=True)
class StatSpec:
    key: str
    kind: str          # "sum" | "topk_value"
    fraction: float
    models: int | None
    level: int         # the statistics pass that computes it (0-based)
    numel: int         # entries per model over all routed tensors
    tensors: int       # how many tensors are routed to it

    @property
    def buffer_bytes(self) -> int:
        return (self.models or 1) * self.numel * 4 if self.kind == "topk_value" else 0


# ---------------------------------------------------------------- the intrinsics
def _stat(el: Any, kind: str, x: Value, fraction: float, span: Span) -> Value:
    nid = el.to_node(x, span)
    chain = [f.call_span for f in el.stack] + [span]
    where = " > ".join(s.location() for s in chain)
    models = el.graph.node(nid).type.models
    frac = f", {fraction:g}" if kind == "topk_value" else ""
    key = f"model_{kind}(…{frac}) x{models or 1} @ {where}"
    return TensorV(el.make(Op.MODEL_STAT, [nid], Attrs(kind=kind, key=key, fraction=fraction,
                                                       tensor=el.tensor), span))


@intrinsic("model_sum", "x",
           doc="sum of x over every entry of every tensor routed to this call site: one number "
               "per model for a stack (the statistic is computed by a pass before the merge)")
def _model_sum(el: Any, a: dict[str, Value], span: Span) -> Value:
    return _stat(el, "sum", a["x"], 0.0, span)


@intrinsic("model_topk_value", "x", "fraction",
           doc="per model, the threshold t such that x >= t keeps the top `fraction` of the "
               "entries of every tensor routed to this call site: the (N - int(N * fraction))-th "
               "smallest of the N entries (the smallest one when that is 0), as original TIES")
def _model_topk_value(el: Any, a: dict[str, Value], span: Span) -> Value:
    f = a["fraction"]
    if not (is_number(f) and 0.0 <= float(f.value) <= 1.0):  # type: ignore[union-attr]
        raise el.error("E220", f"model_topk_value's fraction must be a number in [0, 1] known at "
                       f"compile time, got {f.describe()}", span, "e.g. 0.2 keeps the top 20%")
    return _stat(el, "topk_value", a["x"], float(f.value), span)  # type: ignore[union-attr]


def _unfilled(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    raise RuntimeError(f"internal: model-wide statistic {node.attrs['key']} was not computed")


KERNELS[Op.MODEL_STAT] = _unfilled
KERNELS[Op.STAT_VALUE] = _unfilled


# ---------------------------------------------------------------- planning
def _levels(g: MergeGraph) -> dict[int, int]:
    """Per node: how many statistics passes must run before it can be computed."""
    level: dict[int, int] = {}
    for nid in g.topo_order():
        n = g.node(nid)
        lv = max((level[a] for a in n.args), default=0)
        level[nid] = lv + 1 if n.op is Op.MODEL_STAT else lv
    return level


def split_stats(g: MergeGraph) -> tuple[list[MergeGraph], MergeGraph, tuple[StatSpec, ...]]:
    """(statistics pass graphs, apply graph, statistics) for an elaborated graph."""
    stats = [(nid, n) for nid, n in g.items() if n.op is Op.MODEL_STAT]
    if not stats:
        return [], g, ()
    level = _levels(g)
    specs: dict[str, StatSpec] = {}
    for nid, n in stats:
        x = g.node(n.args[0]).type
        key = n.attrs["key"]
        s = specs.get(key)
        per_model = x.numel // (x.models or 1) if x.models else x.numel
        if s is None:
            specs[key] = StatSpec(key, n.attrs["kind"], n.attrs["fraction"], x.models,
                                  level[n.args[0]], per_model, 1)
        else:
            specs[key] = replace(s, level=max(s.level, level[n.args[0]]),
                                 numel=s.numel + per_model, tensors=s.tensors + 1)

    def placeholders() -> MergeGraph:
        h = g.clone()
        for nid, n in stats:
            h.set_node(nid, Node(Op.STAT_VALUE, (), Attrs(key=n.attrs["key"], type=n.type),
                                 n.type, n.span))
        return h

    passes = []
    for d in range(max(s.level for s in specs.values()) + 1):
        h = placeholders()
        h.remove_nodes_from(h.outputs())
        order = 0
        for nid, n in stats:
            if specs[n.attrs["key"]].level == d:
                h.make(Op.OUTPUT, [n.args[0]], Attrs(name=f"{n.attrs['key']}\t{n.attrs['tensor']}",
                                                     order=order, dtype="float32"), n.span)
                order += 1
        passes.append(h)
    return passes, placeholders(), tuple(specs.values())


# ---------------------------------------------------------------- running
class StatCollector:
    """The sink of a statistics pass: reduces the feeds of each statistic."""

    def __init__(self, specs: tuple[StatSpec, ...]):
        self.specs = {s.key: s for s in specs}
        self.sums: dict[str, torch.Tensor] = {}
        self.parts: dict[str, list[torch.Tensor]] = {}

    def __call__(self, name: str, t: torch.Tensor) -> None:
        spec = self.specs[name.split("\t", 1)[0]]
        flat = t.reshape(spec.models or 1, -1)
        if spec.kind == "sum":
            part = flat.to(torch.float64).sum(dim=1)
            prev = self.sums.get(spec.key)
            self.sums[spec.key] = part if prev is None else prev + part
        else:
            self.parts.setdefault(spec.key, []).append(flat.to(torch.float32))

    def finish(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, total in self.sums.items():
            out[key] = _as_value(total, self.specs[key])
        for key, parts in self.parts.items():
            x = torch.cat(parts, dim=1)
            parts.clear()
            n = x.shape[1]
            kk = max(n - int(n * self.specs[key].fraction), 1)
            out[key] = _as_value(torch.kthvalue(x, kk, dim=1).values, self.specs[key])
        return out


def _as_value(t: torch.Tensor, spec: StatSpec) -> Any:
    vals = [float(v) for v in t.tolist()]
    return tuple(vals) if spec.models is not None else vals[0]


def fill(plan: Any, values: dict[str, Any]) -> Any:
    """`plan` with its STAT_VALUE placeholders replaced by CONSTs (same ids, same schedule)."""
    g = plan.graph
    todo = [(nid, n) for nid, n in g.items() if n.op is Op.STAT_VALUE and n.attrs["key"] in values]
    if not todo:
        return plan
    g = g.clone()
    for nid, n in todo:
        g.set_node(nid, Node(Op.CONST, (), Attrs(value=values[n.attrs["key"]], type=n.type),
                             n.type, n.span))
    return replace(plan, graph=g)


def run_stat_passes(plan: Any, run: Callable[[Any, Callable[[str, torch.Tensor], None]], None]) -> Any:
    """Run `plan`'s statistics passes with `run(pass_plan, sink)`; the apply plan, filled."""
    values: dict[str, Any] = {}
    for pp in plan.prepasses:
        col = StatCollector(plan.stats)
        run(fill(pp, values), col)
        values.update(col.finish())
    return fill(replace(plan, prepasses=(), stats=()), values)
