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

Memory: `model_sum` keeps one float64 accumulator per model. `model_topk_value` is exact (the
same number as `torch.kthvalue` over the concatenation, as the reference implementation): up to
`BUFFER_LIMIT` bytes it keeps a float32 copy of the routed entries (shown by `--emit plan`);
above, a two-round radix select (StatCollector) keeps two 65536-bin histograms per model and
streams its pass twice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

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
        """Host memory that keeps the entries (0: not kept; radix select, see StatCollector)."""
        size = (self.models or 1) * self.numel * 4
        return size if self.kind != "sum" and size <= BUFFER_LIMIT else 0

    @property
    def rounds(self) -> int:
        """How many times its pass streams the inputs."""
        return 2 if self.kind != "sum" and not self.buffer_bytes else 1


def unfilled(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    """The kernel of MODEL_STAT / STAT_VALUE nodes left in a plan (registered by runtime/executor.py, so
    that compiling does not import the kernels, nor torch)."""
    raise RuntimeError(f"internal: model-wide statistic {node.attrs['key']} was not computed")


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


# ---------------------------------------------------------------- running
class StatCollector:
    """The sink of a statistics pass: reduces the feeds of each statistic of that pass.

    `model_topk_value` is exact either way: small statistics keep their entries (float32) and
    take `torch.kthvalue`; above `BUFFER_LIMIT` bytes a radix select over the entries' order-
    preserving 32-bit keys runs instead — round 1 counts the high 16 bits per model, round 2
    the low 16 bits of the entries in the chosen bucket — with two 65536-bin histograms per
    model, at the cost of streaming the pass twice."""

    def __init__(self, specs: tuple[StatSpec, ...], limit: int | None = None):
        self.specs = {s.key: s for s in specs}
        self.limit = BUFFER_LIMIT if limit is None else min(limit, BUFFER_LIMIT)
        self.sums: dict[str, torch.Tensor] = {}
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.hist: dict[str, torch.Tensor] = {}
        self.bucket: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (high bits, rank left)
        self.done: dict[str, Any] = {}

    def __call__(self, name: str, t: torch.Tensor) -> None:
        import torch

        spec = self.specs[name.split("\t", 1)[0]]
        if spec.key in self.done:
            return
        flat = t.reshape(spec.models or 1, -1)
        if spec.kind == "sum":
            part = flat.to(torch.float64).sum(dim=1)
            prev = self.sums.get(spec.key)
            self.sums[spec.key] = part if prev is None else prev + part
        elif self.keeps(spec):
            self.parts.setdefault(spec.key, []).append(flat.to(torch.float32).cpu())
        else:
            keys = sort_keys(flat.to(torch.float32).cpu())
            if spec.key in self.bucket:  # round 2: low bits of the entries in the chosen bucket
                high, _ = self.bucket[spec.key]
                sel = (keys >> 16) == high.unsqueeze(1)
                idx = torch.where(sel, keys & 0xFFFF, torch.full_like(keys, 1 << 16))
            else:
                idx = keys >> 16
            h = bincount_rows(idx, (1 << 16) + 1)[:, : 1 << 16]
            prev = self.hist.get(spec.key)
            self.hist[spec.key] = h if prev is None else prev + h

    def keeps(self, spec: StatSpec) -> bool:
        """Whether the entries are kept (else: radix select)."""
        return (spec.models or 1) * spec.numel * 4 <= self.limit

    def finish(self) -> bool:
        """Compute what this round allows; True when another round over the pass is needed."""
        import torch

        for key, total in self.sums.items():
            self.done[key] = _as_value(total, self.specs[key])
        self.sums.clear()
        for key, parts in self.parts.items():
            x = torch.cat(parts, dim=1)
            parts.clear()
            if x.shape[1] == 0:  # no entries routed: no tensor uses the threshold
                self.done[key] = _as_value(torch.zeros(x.shape[0]), self.specs[key])
                continue
            kk = _kth_index(x.shape[1], self.specs[key])
            self.done[key] = _as_value(torch.kthvalue(x, kk, dim=1).values, self.specs[key])
        self.parts.clear()
        again = False
        for key, h in self.hist.items():
            spec = self.specs[key]
            if spec.numel == 0:  # no entries routed: no tensor uses the threshold
                self.done[key] = _as_value(torch.zeros(h.shape[0]), spec)
            elif key not in self.bucket:
                kk = torch.full((h.shape[0],), _kth_index(spec.numel, spec), dtype=torch.int64,
                                device=h.device)
                high, left = _pick(h, kk)
                self.bucket[key] = (high, left)
                again = True
            else:
                high, left = self.bucket[key]
                low, _ = _pick(h, left)
                self.done[key] = _as_value(from_sort_keys((high << 16) | low), spec)
        self.hist.clear()
        return again

    @property
    def values(self) -> dict[str, Any]:
        return self.done


def _kth_index(n: int, spec: StatSpec) -> int:
    """1-based rank of the threshold among n entries (ties-merging's topk_values_mask)."""
    if spec.kind == "quantile_value":
        return min(max(int(n * spec.fraction) + spec.offset, 0), n - 1) + 1
    return max(n - int(n * spec.fraction), 1)


def bincount_rows(idx: torch.Tensor, bins: int) -> torch.Tensor:
    import torch

    rows = idx.shape[0]
    offs = torch.arange(rows, dtype=torch.int64, device=idx.device).unsqueeze(1) * bins
    return torch.bincount((idx + offs).reshape(-1), minlength=rows * bins).reshape(rows, bins)


def _pick(h: torch.Tensor, kk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the bin holding the kk-th smallest entry (1-based) and its rank within it."""
    import torch

    cum = h.cumsum(dim=1)
    b = torch.searchsorted(cum, kk.unsqueeze(1)).squeeze(1)
    below = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0).unsqueeze(1)).squeeze(1),
                        torch.zeros_like(b))
    return b, kk - below


def sort_keys(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys in [0, 2^32) with the same order (-0.0 just below +0.0)."""
    import torch

    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= 1 << 31, 0xFFFFFFFF - bits, bits + (1 << 31))


def from_sort_keys(k: torch.Tensor) -> torch.Tensor:
    import torch

    bits = torch.where(k >= 1 << 31, k - (1 << 31), 0xFFFFFFFF - k)
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)
    return bits.to(torch.int32).view(torch.float32)


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


def run_stat_passes(plan: Any, run: Callable[[Any, Callable[[str, torch.Tensor], None]], None],
                    memory_budget: int | None = None) -> Any:
    """Run `plan`'s statistics passes with `run(pass_plan, sink)`; the apply plan, filled. With
    a memory budget, entries are kept only within the budget's headroom above the pass's peak."""
    values: dict[str, Any] = {}
    for pp in plan.prepasses:
        limit = None if memory_budget is None else max(0, memory_budget - pp.peak_bytes)
        col = StatCollector(plan.stats, limit)
        filled = fill(pp, values)
        run(filled, col)
        while col.finish():
            run(filled, col)
        values.update(col.values)
    return fill(replace(plan, prepasses=(), stats=()), values)
