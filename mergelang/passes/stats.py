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
  feeds need. A collector (runtime/stats.py) reduces the feeds per key.
* the apply pass: the normal plan, with the placeholders.

Before each pass runs, `fill` replaces its placeholders with CONST nodes holding the values found
so far (same node ids, so the lowered schedule stays valid). Whole models are never loaded: each
pass streams tensors like an ordinary merge.

Memory: `model_sum` keeps one float64 accumulator per model. `model_topk_value` is exact (the
same number as `torch.kthvalue` over the concatenation, as the reference implementation): up to
`BUFFER_LIMIT` bytes it keeps a float32 copy of the routed entries (shown by `--emit plan`);
above, a two-round radix select keeps two 65536-bin histograms per model and streams its pass
twice. Running the passes (the collector that reduces their feeds, the radix select) is tensor
code: runtime/stats.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from mergelang.ir.graph import MergeGraph, Node
from mergelang.ir.ops import Attrs, Op


#: largest entry buffer (bytes) kept for an exact model_topk_value; above it: radix select
BUFFER_LIMIT = 1 << 30


@dataclass(frozen=True)
class StatSpec:
    key: str
    kind: str          # "sum" | "topk_value" | "quantile_value"
    fraction: float
    models: int | None
    level: int         # the statistics pass that computes it (0-based)
    numel: int         # entries per model over all routed tensors
    tensors: int       # how many tensors are routed to it
    offset: int = 0    # quantile_value: added to the 0-based position int(N * fraction)

    @property
    def buffer_bytes(self) -> int:
        """Host memory that keeps the entries (0: not kept; radix select, runtime/stats.py)."""
        size = (self.models or 1) * self.numel * 4
        return size if self.kind != "sum" and size <= BUFFER_LIMIT else 0

    @property
    def rounds(self) -> int:
        """How many times its pass streams the inputs."""
        return 2 if self.kind != "sum" and not self.buffer_bytes else 1


# ---------------------------------------------------------------- planning
def _levels(g: MergeGraph) -> dict[int, int]:
    """Per node: how many statistics passes must run before it can be computed."""
    level: dict[int, int] = {}
    for nid in g.topo_order():
        n = g.node(nid)
        lv = max((level[a] for a in n.args), default=0)
        level[nid] = lv + 1 if n.op is Op.MODEL_STAT else lv
    return level


def merge_equal_stats(g: MergeGraph) -> int:
    """Give one key to statistics that are equal by construction: the same kind and parameters of
    structurally equal inputs (hash-consed), over the same tensors — e.g. the same method called
    by two named output blocks, whose call sites (and so keys) differ. The first key's nodes are
    kept and the others' users point at them (their now unused inputs are left to DCE); a
    statistic of statistics is compared after its inputs are merged. Returns the keys merged."""
    shapes: dict[str, tuple[tuple, list[str]]] = {}  # cheap pre-check: a merge needs two keys
    for _, n in g.items():                              # of one kind over the same tensors
        if n.op is Op.MODEL_STAT:
            kind = (n.attrs["kind"], n.attrs["fraction"], n.attrs.get("offset", 0))
            shapes.setdefault(n.attrs["key"], (kind, []))[1].append(n.attrs["tensor"])
    if len({(kind, tuple(sorted(ts))) for kind, ts in shapes.values()}) == len(shapes):
        return 0
    merged = 0
    while True:
        table: dict[tuple, int] = {}
        sig: dict[int, int] = {}
        groups: dict[str, dict[str, int]] = {}
        params: dict[str, tuple] = {}
        for nid in g.topo_order():
            n = g.node(nid)
            attrs: Any = n.attrs
            if n.op is Op.MODEL_STAT:
                params[n.attrs["key"]] = (n.attrs["kind"], n.attrs["fraction"], n.attrs.get("offset", 0))
                groups.setdefault(n.attrs["key"], {})[n.attrs["tensor"]] = sig[n.args[0]]
                attrs = (n.attrs["key"],)
            sig[nid] = table.setdefault((n.op, attrs, tuple(sig[a] for a in n.args)), len(table))
        first: dict[tuple, str] = {}
        rename: dict[str, str] = {}
        for key, by_tensor in groups.items():
            canon = first.setdefault((params[key], tuple(sorted(by_tensor.items()))), key)
            if canon != key:
                rename[key] = canon
        if not rename:
            return merged
        merged += len(rename)
        stat_nodes = [(nid, n) for nid, n in g.items() if n.op is Op.MODEL_STAT]
        canon_node = {(n.attrs["key"], n.attrs["tensor"]): nid for nid, n in stat_nodes}
        for nid, n in stat_nodes:  # one node per (statistic, tensor): each entry counted once
            if n.attrs["key"] in rename:
                g.replace_uses(nid, canon_node[(rename[n.attrs["key"]], n.attrs["tensor"])])
                g.remove_node(nid)


def split_stats(g: MergeGraph) -> tuple[list[MergeGraph], MergeGraph, tuple[StatSpec, ...]]:
    """(statistics pass graphs, apply graph, statistics) for an elaborated graph."""
    if not any(n.op is Op.MODEL_STAT for _, n in g.items()):
        return [], g, ()
    merge_equal_stats(g)
    stats = [(nid, n) for nid, n in g.items() if n.op is Op.MODEL_STAT]
    level = _levels(g)
    specs: dict[str, StatSpec] = {}
    for nid, n in stats:
        x = g.node(n.args[0]).type
        key = n.attrs["key"]
        s = specs.get(key)
        per_model = x.numel // (x.models or 1) if x.models else x.numel
        if s is None:
            specs[key] = StatSpec(key, n.attrs["kind"], n.attrs["fraction"], x.models,
                                  level[n.args[0]], per_model, 1, n.attrs.get("offset", 0))
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
                                                     order=order, dtype=g.compute_dtype), n.span)
                order += 1
        passes.append(h)
    return passes, placeholders(), tuple(specs.values())


# ---------------------------------------------------------------- filling
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
