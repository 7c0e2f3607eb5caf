"""Row chunking under a memory budget: tensors whose work does not fit are split into row ranges.

The plan computes one output tensor after another (plan.py); the steps since the previous output
form that tensor's *segment*. When a segment's peak of live bytes is above the budget and its
work is *row-local* (row i of the output needs only row i of every input tensor), the segment is
lowered once per row range: each LOAD reads just those rows (`rows=(a, b)`: the mmap reader maps
only that byte range), the same ops run on the smaller tensors, and each OUTPUT writes its rows
(`rows=(a, b, total)`) at their byte offset in the planned shard. The kernels are unchanged, so
every element is computed by the same float32 ops on the same values: the merged bytes are
identical to an unchunked run.

Rows are the first element axis (axis 0 of a tensor; axis 1 of a stack of models). An op is
row-local when:

* it is elementwise (arguments without the row axis broadcast: lower rank, or size 1 there),
  a stack / index / cast over the model axis, or an assert;
* it is a random mask (bernoulli: its stream is keyed by the element's index in the whole
  tensor, so a chunk draws the same numbers at offset `row0 * row size`);
* it reduces or selects over the models, or over `rows` (the last axis) of a tensor of rank >= 2
  (reduce, dot, topk_mask, rank, band_mask, topk_count_mask, argmax_mask);
* it is a reshape that keeps axis 0.

Anything else that touches the row axis is not: whole-tensor statistics (reduce/top-k over the
tensor, norms), reductions over cols, linear algebra (svd, matmul, ...), concatenation, and
values shared with the work of a non-adjacent output (consecutive outputs that share values,
e.g. one tensor of several named outputs, form one segment and are chunked together).
Such a tensor runs whole, and `chunk_plan` reports why (the CLI warns). Values that do not have
the row axis (constants, statistics, small per-tensor values) are computed once per segment.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mergelang.ir.graph import MergeGraph, Node
from mergelang.ir.ops import OP_INFO, Op
from mergelang.passes.plan import ExecutionPlan, frees_after, live_bytes, schedule
from mergelang.ir.types import format_bytes
from mergelang.ir.types import TType



@dataclass(frozen=True)
class Unchunked:
    """An output whose work is above the budget and cannot be split into rows."""

    name: str
    peak_bytes: int
    reason: str
    split: bool = False  # split into single rows, and one row alone is still above the budget

    def message(self, budget: int) -> str:
        if self.split:
            return (f"tensor `{self.name}` runs in single-row chunks, but one row needs "
                    f"{format_bytes(self.peak_bytes)} of live tensors, above the memory budget "
                    f"({format_bytes(budget)}); it may exceed the budget")
        return (f"tensor `{self.name}` needs {format_bytes(self.peak_bytes)} of live tensors, above "
                f"the memory budget ({format_bytes(budget)}), and cannot be split into row chunks: "
                f"{self.reason}; it runs whole and may exceed the budget")


def over_budget_summary(items: list[Unchunked], budget: int) -> list[str]:
    """The warnings for tensors above the memory budget: one line each for up to three, else one
    summary line (the largest named, the reasons counted) instead of one line per tensor."""
    if len(items) <= 3:
        return [u.message(budget) for u in items]
    top = max(items, key=lambda u: u.peak_bytes)
    reasons: dict[str, int] = {}
    for u in items:
        key = "one row alone is above the budget" if u.split else u.reason
        reasons[key] = reasons.get(key, 0) + 1
    why = "; ".join(f"{n} because {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return [f"{len(items)} tensors need more live memory than the memory budget "
            f"({format_bytes(budget)}) and cannot be split into row chunks small enough ({why}); "
            f"the largest is `{top.name}` ({format_bytes(top.peak_bytes)}). They run whole and "
            "may exceed the budget"]


@dataclass(frozen=True)
class ChunkReport:
    plan: ExecutionPlan
    chunked: dict[str, int]  # output name -> number of row chunks
    unchunked: list[Unchunked]


class NotRowLocal(Exception):
    pass


def _row_rank_ok(t: TType, rank: int, rows: int) -> bool:
    """A non-row argument of an elementwise op with result rank `rank` broadcasts over rows."""
    return len(t.shape) < rank or t.shape[0] == 1 or rows == 1


def classify(g: MergeGraph, seg: list[int], rows: int) -> set[int]:
    """The nodes of segment `seg` (in step order) that carry the row axis; raises NotRowLocal
    with the reason when the segment's output cannot be computed row range by row range."""
    inside = set(seg)
    rowed: set[int] = set()
    for nid in seg:
        n = g.node(nid)
        if n.op is Op.LOAD:
            if n.type.shape and n.type.shape[0] == rows and n.type.models is None:
                rowed.add(nid)
            continue
        if n.op in (Op.CONST, Op.STAT_VALUE, Op.PARAM):
            continue
        if n.op is Op.BLOCK_QUANT:
            raise NotRowLocal("block-scaled FP8 output is quantized per block of rows and columns")
        ra = [a for a in n.args if a in rowed]
        if not ra:
            if n.op is Op.OUTPUT:
                raise NotRowLocal("its value has no row axis")
            continue
        what = n.op.value
        rank = len(n.type.shape)
        local = OP_INFO[n.op].row_local  # ir/ops.py: yes | scoped | elementwise | no
        over = n.attrs.get("over") if local == "scoped" else None
        if not (local == "yes" or over in ("models", "rows")
                or (local == "elementwise" and n.attrs["elementwise"])):
            scope = f" over {n.attrs['over']}" if "over" in n.attrs else ""
            raise NotRowLocal(f"{what}{scope} needs every row at once")
        if over == "rows" and rank < 2:
            raise NotRowLocal(f"{what} over the rows of a 1-D tensor takes the whole tensor")
        if not n.type.shape or n.type.shape[0] != rows:
            raise NotRowLocal(f"{what} changes the row axis")
        if n.op is Op.TOPK_COUNT_MASK and n.args[1] in rowed:
            raise NotRowLocal("topk_count_mask's count depends on every row")
        if n.op is not Op.RESHAPE:  # a reshape that keeps axis 0 keeps row i as row i
            for a in n.args:
                t = g.node(a).type
                if a in rowed:
                    if len(t.shape) != rank:
                        raise NotRowLocal(f"{what} broadcasts the row axis")
                elif n.op is not Op.ASSERT and not _row_rank_ok(t, rank, rows):
                    raise NotRowLocal(f"{what} uses a value with rows that is computed whole")
        rowed.add(nid)
    for nid in rowed:
        if any(u not in inside for u in g.successors(nid)):
            raise NotRowLocal("a value is shared with another output tensor")
    return rowed


def _chunk_type(t: TType, n: int) -> TType:
    return t.with_(shape=(n, *t.shape[1:]))


def _chunk_node(n: Node, args: tuple[int, ...], a: int, b: int, rows: int) -> Node:
    ty = _chunk_type(n.type, b - a)
    attrs = n.attrs
    if n.op is Op.LOAD:
        attrs = attrs.replace(rows=(a, b), type=ty)
    elif n.op is Op.OUTPUT:
        attrs = attrs.replace(rows=(a, b, rows))
    elif n.op is Op.RESHAPE:
        attrs = attrs.replace(shape=(b - a, *tuple(attrs["shape"])[1:]))
    elif n.op is Op.PLUGIN:  # typed by its attrs: the chunk's type
        attrs = attrs.replace(type=ty)
    elif n.op is Op.BERNOULLI:  # element e of the chunk is element a * row + e of the tensor
        attrs = attrs.replace(row0=a)
    return Node(n.op, args, attrs, ty, n.span)


def _per_row_peak(g: MergeGraph, seg: list[int], rowed: set[int], rows: int) -> float:
    """Bytes per row at the segment's peak (row values only), plus the pipeline's headroom per
    row: the largest load prefetched ahead and one output waiting for the writer."""
    frees = frees_after(g, seg, rowed.__contains__)
    live = peak = 0.0
    for i, nid in enumerate(seg):
        n = g.node(nid)
        if nid in rowed and n.op is not Op.OUTPUT:
            live += live_bytes(g, nid) / rows  # (8 bytes a float value with compute_dtype float64)
        peak = max(peak, live)
        live -= sum(live_bytes(g, a) / rows for a in frees.get(i, ()))
    loads = [live_bytes(g, x) / rows for x in seg if x in rowed and g.node(x).op is Op.LOAD]
    return peak + max(loads, default=0.0) + _outputs_bytes(g, seg) / rows


def _segments(plan: ExecutionPlan) -> list[list[int]]:
    """The steps split after each OUTPUT; a segment whose values the next one uses is joined
    with it (named outputs: the same tensor of every output shares its loads and work), so
    the joined work is chunked as one (every output in it has the same rows) or runs whole."""
    g, segs, cur = plan.graph, [], []
    for s in plan.steps:
        cur.append(s.nid)
        if g.node(s.nid).op is Op.OUTPUT:
            segs.append(cur)
            cur = []
    if cur:
        segs.append(cur)
    joined: list[list[int]] = []
    for seg in segs:
        if joined:
            inside = set(seg)
            prev = joined[-1]
            if any(_tensor_work(g.node(x)) and any(u in inside for u in g.successors(x))
                   for x in prev):
                prev.extend(seg)
                continue
        joined.append(list(seg))
    return joined


def _tensor_work(n: Node) -> bool:
    """A value that may carry rows (not a constant, statistic, scalar or output)."""
    return n.op not in (Op.OUTPUT, Op.CONST, Op.STAT_VALUE, Op.PARAM) and bool(n.type.shape)


def _outputs_bytes(g: MergeGraph, seg: list[int]) -> int:
    """Bytes of the segment's outputs (pending writes)."""
    return sum(g.node(x).type.nbytes for x in seg if g.node(x).op is Op.OUTPUT)


def chunk_plan(plan: ExecutionPlan, budget: int, min_rows: int = 1) -> ChunkReport:
    """`plan` with every row-local output whose segment does not fit in `budget` (live values +
    one prefetched load + one pending write) split into row ranges that do; the outputs that do
    not fit and cannot be split are reported. Statistics passes are chunked when they run."""
    g = plan.graph
    segs = _segments(plan)
    # live bytes carried into each segment (values kept for later segments), from the schedule
    carried, live = [], 0
    step_of = {s.nid: s for s in plan.steps}
    for seg in segs:
        carried.append(live)
        for nid in seg:
            if g.node(nid).op is not Op.OUTPUT:
                live += live_bytes(g, nid)
            live -= sum(live_bytes(g, a) for a in step_of[nid].free)
    new_order: list[int] = []
    h: MergeGraph | None = None
    chunked: dict[str, int] = {}
    unchunked: list[Unchunked] = []
    for seg, before in zip(segs, carried):
        out = g.node(seg[-1])
        peak = _segment_peak(g, seg, before)
        if out.op is not Op.OUTPUT or peak + _headroom(g, seg) <= budget:
            new_order.extend(seg)
            continue
        name = out.attrs["name"]
        rows = out.type.shape[0] if out.type.shape else 0
        try:
            if rows < 2:
                raise NotRowLocal("it has fewer than two rows")
            if out.type.models is not None:  # statistics passes' feeds: collected whole
                raise NotRowLocal("it is a stack of models (a model-wide statistic's input)")
            rowed = classify(g, seg, rows)
        except NotRowLocal as e:
            unchunked.append(Unchunked(name, peak + _headroom(g, seg), str(e)))
            new_order.extend(seg)
            continue
        fixed = before + sum(live_bytes(g, x) for x in seg if x not in rowed)
        per_row = _per_row_peak(g, seg, rowed, rows)
        step = max(min_rows, int((budget - fixed) // per_row) if per_row else rows)
        if step >= rows:
            new_order.extend(seg)
            continue
        if h is None:
            h = g.clone()
        new_order.extend(x for x in seg if x not in rowed)
        chunks = [(a, min(rows, a + step)) for a in range(0, rows, step)]
        for a, b in chunks:
            ids: dict[int, int] = {}
            for x in seg:
                if x in rowed:
                    n = g.node(x)
                    args = tuple(ids.get(y, y) for y in n.args)
                    ids[x] = h.add(_chunk_node(n, args, a, b, rows))
                    new_order.append(ids[x])
        h.remove_nodes_from(rowed)
        for x in seg:
            if g.node(x).op is Op.OUTPUT:
                chunked[g.node(x).attrs["name"]] = len(chunks)
        if step * per_row + fixed > budget:
            unchunked.append(Unchunked(name, int(fixed + per_row), "one row alone is above the budget",
                                       split=True))
    if h is None:
        return ChunkReport(replace(plan, budget=budget), chunked, unchunked)
    steps, peak = schedule(h, new_order)
    return ChunkReport(replace(plan, graph=h, steps=tuple(steps), peak_bytes=peak, budget=budget),
                       chunked, unchunked)


def _segment_peak(g: MergeGraph, seg: list[int], before: int) -> int:
    return before + schedule(g, seg)[1]


def _headroom(g: MergeGraph, seg: list[int]) -> int:
    loads = [live_bytes(g, x) for x in seg if g.node(x).op is Op.LOAD]
    return max(loads, default=0) + _outputs_bytes(g, seg)
