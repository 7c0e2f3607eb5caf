"""Elementwise fusion (CPU): chains of elementwise ops over one tensor become one FUSED step.

Memory-bound chains such as `ties`' sign election (about fifteen whole-tensor passes: sums over
models, comparisons, `where`s, a division) cost DRAM traffic per op, not arithmetic. This pass,
applied to an `ExecutionPlan` just before it runs on the CPU, groups them into single-output
regions, each run by one generated loop (`runtime/kernels/numba_codegen.py`) that reads every input once and
writes one result. A LOAD of bfloat16 whose only users are fused steps is read as stored and
widened inside the loop (no float32 copy of the input is ever made), and every LOAD read only by
fused steps is a view of the checkpoint file's bytes (`ModelSource.load_as(view=True)`: a
private mmap, no copy; the kernel reads the page cache).

Regions are formed consumer first: a fusable node joins the region of its users when all of them
are in one region (so each region has one output, its root, and no value leaves it half-way;
this also rules out cycles through unfused ops such as `topk_mask`). Every member has the root's
element shape `S`, with or without the model axis `M` of the region; external inputs are values
of that shape, or scalars (one value, or one per model). Which ops fuse and why each gives
exactly the plain kernel's bits is listed in `runtime/kernels/numba_codegen.py`.

The fused plan is only for running: `--emit` and `explain` show the unfused graph.
"""

from __future__ import annotations

import math
from dataclasses import replace

from mergelang.ir.graph import MergeGraph, Node
from mergelang.ir.ops import OP_INFO, Attrs, Op
from mergelang.passes.fp8_reads import FP8_CODES, read_stored, stored_fp8
from mergelang.passes.plan import ExecutionPlan, rescheduled

#: a region's root must have at least this many elements (smaller ones: call overhead dominates,
#: and tiny test tensors never pay a kernel compile)
MIN_ELEMENTS = 1 << 16

#: most models a fused sum over models may add: torch sums up to 4 rows sequentially from zero
MAX_SUM_MODELS = 4

#: op -> instruction name in a fused program (the op table's `opcode`, ir/ops.py)
OPCODES = {op: info.opcode for op, info in OP_INFO.items() if info.opcode is not None}


class _Region:
    __slots__ = ("root", "shape", "models", "members")

    def __init__(self, root: int, node: Node):
        self.root = root
        self.shape = node.type.shape
        self.models = node.type.models
        self.members = [root]


def _users(plan: ExecutionPlan) -> dict[int, list[int]]:
    """Value -> the steps that use it (once per use), in plan order."""
    g = plan.graph
    users: dict[int, list[int]] = {}
    for s in plan.steps:
        for a in g.node(s.nid).args:
            users.setdefault(a, []).append(s.nid)
    return users


def _stack_depth(g: MergeGraph, node: Node) -> int | None:
    """The model axis a node brings to its region: its own, else its first stacked argument's."""
    return node.type.models or next(
        (g.node(a).type.models for a in node.args if g.node(a).type.models), None)


def _is_scalar(ty) -> bool:
    return math.prod(ty.shape) == 1


def _fits(r: _Region, ty, member: bool) -> bool:
    """A value of type `ty` can live in region `r` (a member: the region's shape exactly; an
    external input may also be a scalar, or a scalar per model)."""
    if ty.models is not None and r.models is not None and ty.models != r.models:
        return False
    if ty.shape == r.shape:
        return ty.dtype in ("float32", "bool")
    return not member and _is_scalar(ty) and ty.dtype in ("float32", "bool")


def _nonzero_const(g: MergeGraph, nid: int) -> bool:
    n = g.node(nid)
    if n.op is not Op.CONST:
        return False
    vals = n.attrs["value"] if isinstance(n.attrs["value"], tuple) else (n.attrs["value"],)
    return all(isinstance(v, (int, float)) and v == v and v != 0 for v in vals)


def _op_ok(g: MergeGraph, node: Node) -> bool:
    """The op itself fuses (independent of the region)."""
    op = node.op
    if op is Op.REDUCE:
        kind, over = node.attrs["kind"], node.attrs["over"]
        src = g.node(node.args[0]).type
        return over == "models" and (
            kind == "count" or (kind == "sum" and src.dtype == "float32"
                                and (src.models or 0) <= MAX_SUM_MODELS))
    if op not in OPCODES:
        return False
    if op in (Op.MINIMUM, Op.MAXIMUM):  # exact only when +0 never meets -0: one side a nonzero const
        return any(_nonzero_const(g, a) for a in node.args)
    if op is Op.STACK:
        return all(g.node(a).type.models is None for a in node.args)
    return True


def _can_join(g: MergeGraph, r: _Region, nid: int) -> bool:
    node = g.node(nid)
    if not _fits(r, node.type, True):
        return False
    models = r.models if r.models is not None else node.type.models
    for a in node.args:
        t = g.node(a).type
        if t.models is not None and models is not None and t.models != models:
            return False
        if not _fits(r, t, False):
            return False
        if t.models is not None:
            models = t.models
    if node.op is Op.STACK and models is not None and len(node.args) != models:
        return False
    return True


def _regions(plan: ExecutionPlan) -> list[_Region]:
    g = plan.graph
    users = _users(plan)
    region_of: dict[int, _Region] = {}
    regions: list[_Region] = []
    for nid in reversed([s.nid for s in plan.steps]):
        node = g.node(nid)
        if not _op_ok(g, node):
            continue
        owners = {id(region_of.get(u)): region_of.get(u) for u in users.get(nid, ())}
        if len(owners) == 1:
            r = next(iter(owners.values()))
            if r is not None and _can_join(g, r, nid):
                r.members.append(nid)
                region_of[nid] = r
                if r.models is None:
                    r.models = _stack_depth(g, node)
                continue
        r = _Region(nid, node)
        if _can_join(g, r, nid):
            r.models = _stack_depth(g, node)
            region_of[nid] = r
            regions.append(r)
    return regions


def fuse_plan(plan: ExecutionPlan) -> ExecutionPlan:
    """The plan with its fusable elementwise regions as FUSED steps (unchanged if there are none)."""
    plan = _quant_in_kernels(_fold_abs_into_topk(plan))
    g0 = plan.graph
    if not any(g0.node(s.nid).type.numel >= MIN_ELEMENTS for s in plan.steps):
        return plan  # nothing big enough to fuse: skip the whole-plan analysis (many tiny tensors)
    users = _users(plan)
    g = plan.graph
    big = [r for r in _regions(plan) if g.node(r.root).type.numel >= MIN_ELEMENTS]
    regions, selects = _rematerialise(plan, big, users)
    regions = [r for r in regions if len(r.members) >= 2]
    if not regions and not selects:
        return plan
    g2 = MergeGraph(g)
    member_of = {m: r for r in [*regions, *selects.values()] for m in r.members}
    # LOADs whose every user is fused are only read by kernels: a view of the file's bytes
    # (attr `view`, no copy); bfloat16 ones are read as stored and widened in the kernel;
    # block-scaled FP8 ones as their codes plus a LOAD of their scales (decoded in the kernel)
    scales: dict[int, int] = {}  # FP8 codes LOAD -> its scales LOAD
    for s in plan.steps:
        n = g.node(s.nid)
        if (n.op is Op.LOAD and n.type.dtype == "float32" and users.get(s.nid)
                and all(u in member_of or u in selects for u in users[s.nid])):
            if stored_fp8(n):
                scales[s.nid] = read_stored(g2, s.nid, n)
                continue
            ty = n.type.with_(dtype="bfloat16") if n.attrs.get("src_dtype") == "bfloat16" else n.type
            g2.set_node(s.nid, replace(n, type=ty, attrs=Attrs(dict(n.attrs), view=True)))
    pos = {s.nid: i for i, s in enumerate(plan.steps)}
    fused_at: dict[int, int] = {}
    for r in regions:
        root_users = users.get(r.root, [])
        narrow = (len(root_users) == 1 and g.node(root_users[0]).op is Op.OUTPUT
                  and g.node(root_users[0]).attrs["dtype"] == "bfloat16"
                  and g.node(r.root).type.dtype == "float32")
        fused_at[r.root] = _build(g, g2, r, pos, scales, narrow=narrow)
    for topk, r in selects.items():  # its users (built above) are pointed at the new node
        fused_at[topk] = _build(g, g2, r, pos, scales, select=topk)
    for r in selects.values():  # recomputed by every consumer: never a step of its own
        g2.remove_nodes_from([m for m in r.members if m in g2])
    order = []
    for s in plan.steps:
        if s.nid in fused_at:
            order.append(fused_at[s.nid])
        elif s.nid not in member_of:
            order.append(s.nid)
            if s.nid in scales:
                order.append(scales[s.nid])
    return rescheduled(plan, g2, order)


def _rematerialise(plan: ExecutionPlan, regions: list[_Region], users: dict[int, list[int]]
                   ) -> tuple[list[_Region], dict[int, _Region]]:
    """Regions computed from checkpoint tensors alone (ties' task vectors `stack(a, b) - base`)
    whose value feeds a whole-tensor top-k, and otherwise only other fused regions, are not
    stored: every consumer recomputes them from the inputs (2 bytes per bfloat16 input read
    instead of 4 per float32 element written and read again), and the top-k becomes a FUSED
    selection over the region's program (attr `select`, `kernels_select.run_select`).
    Returns the regions left to build and {top-k node: the region it selects over}."""
    g = plan.graph
    member_of = {m: r for r in regions for m in r.members}
    kept, selects = [], {}
    for r in reversed(regions):  # producers first: a region extended here may be a candidate too
        inner = set(r.members)
        inputs = {a for m in r.members for a in g.node(m).args if a not in inner}
        outs = users.get(r.root, [])
        tops = [u for u in outs if g.node(u).op is Op.TOPK_MASK and g.node(u).attrs["over"] == "tensor"]
        others = [u for u in outs if u not in tops]
        if (not tops or not all(u in member_of for u in others)
                or not all(g.node(a).op in (Op.LOAD, Op.CONST) for a in inputs)
                or g.node(r.root).type.dtype != "float32"):
            kept.append(r)
            continue
        for other in {id(member_of[u]): member_of[u] for u in others}.values():
            other.members.extend(m for m in r.members if m not in other.members)
        for t in tops:
            selects[t] = r
    return kept[::-1], selects


def _quant_in_kernels(plan: ExecutionPlan) -> ExecutionPlan:
    """Block-scaled FP8 outputs (BLOCK_QUANT) run by the numba kernels (attr `numba`,
    runtime/kernels/numba_fp8.py): a scales part as is; a values part whose one user is its FP8
    OUTPUT gives the codes themselves (attr `codes`, typed FP8: the OUTPUT's cast is then a
    no-op), so no float32 copy of the quantized values is made."""
    g = plan.graph
    quant = [s.nid for s in plan.steps if g.node(s.nid).op is Op.BLOCK_QUANT]
    if not quant:
        return plan
    users = _users(plan)
    marks = {}
    for nid in quant:
        n = g.node(nid)
        if n.attrs.get("numba") or g.node(n.args[0]).type.numel < MIN_ELEMENTS:
            continue
        if n.attrs["part"] == "scale_inv":
            marks[nid] = replace(n, attrs=Attrs(dict(n.attrs), numba=True))
            continue
        out = users.get(nid, [])
        dtype = g.node(out[0]).attrs.get("dtype") if len(out) == 1 and g.node(out[0]).op is Op.OUTPUT else None
        if dtype in FP8_CODES:
            marks[nid] = replace(n, type=n.type.with_(dtype=dtype), attrs=Attrs(dict(n.attrs), numba=True,
                                                                                    codes=dtype))
    if not marks:
        return plan
    g2 = MergeGraph(g)
    for nid, n in marks.items():
        g2.set_node(nid, n)
    return rescheduled(plan, g2, [s.nid for s in plan.steps])


def _fold_abs_into_topk(plan: ExecutionPlan) -> ExecutionPlan:
    """`topk_mask(abs(x), over = "tensor")` whose `abs` has no other use: the selection reads x
    and ranks |x| itself (attr `abs`), so |x| is never materialised."""
    g = plan.graph
    tops = [s.nid for s in plan.steps if g.node(s.nid).op is Op.TOPK_MASK]
    if not tops:
        return plan
    users = _users(plan)
    folds = {}
    for nid in tops:
        n = g.node(nid)
        if n.attrs["over"] == "tensor" and not n.attrs.get("abs"):
            src = g.node(n.args[0])
            if src.op is Op.ABS and len(users[n.args[0]]) == 1 and src.type.dtype == "float32":
                folds[nid] = n.args[0]
    if not folds:
        return plan
    g2 = MergeGraph(g)
    for nid, absid in folds.items():
        n = g.node(nid)
        g2.set_node(nid, replace(n, args=g.node(absid).args, attrs=Attrs(dict(n.attrs), abs=True)))
        g2.remove_node(absid)
    gone = set(folds.values())
    order = [s.nid for s in plan.steps if s.nid not in gone]
    return rescheduled(plan, g2, order)


def _build(g: MergeGraph, g2: MergeGraph, r: _Region, pos: dict[int, int], scales: dict[int, int],
           narrow: bool = False, select: int | None = None) -> int:
    """Add the FUSED node for region `r` (read from the unfused graph `g`) to `g2`, point the
    root's users at it, drop the members. `narrow`: the root's one user is a bfloat16 OUTPUT, so
    the loop stores bfloat16 (the same rounding as the OUTPUT's cast, which then has nothing
    left to do). `select`: a TOPK_MASK over the root, which the node computes instead (the
    root's value is never stored; the members stay for the regions that recompute them)."""
    members = sorted(r.members, key=pos.__getitem__)  # plan order: arguments first, root last
    local = {m: i for i, m in enumerate(members)}
    inputs: list[int] = []
    body = []
    for m in members:
        node = g.node(m)
        refs = []
        for a in node.args:
            if a in local:
                refs.append(("v", local[a]))
            else:
                if a not in inputs:
                    inputs.append(a)
                    if a in scales:  # FP8 codes: their block scales are the next input
                        inputs.append(scales[a])
                refs.append(("in", inputs.index(a)))
        if node.op is Op.REDUCE:
            code = "count" if node.attrs["kind"] == "count" else "sum"
        else:
            code = OPCODES[node.op]
        body.append((code, tuple(refs), node.type.models is not None, node.type.dtype))
    kinds = []
    scale_loads = set(scales.values())
    for a in inputs:
        if a in scales:
            kinds.append("fp8:{}:{}".format(*g.node(a).attrs["scale"][1:]))
            continue
        if a in scale_loads:
            kinds.append("fp8scale")
            continue
        t = g.node(a).type
        stacked = t.models is not None
        if t.shape == r.shape:
            kinds.append("stack" if stacked else "elem")
        else:
            kinds.append("mscalar" if stacked else "scalar")
    attrs = Attrs(body=tuple(body), inputs=tuple(kinds), models=r.models or 0)
    if select is not None:
        top = g.node(select)
        attrs = attrs.replace(select=(top.attrs["density"], bool(top.attrs.get("abs"))))
        fid = g2.add(Node(Op.FUSED, tuple(inputs), attrs, top.type, top.span))
        g2.replace_uses(select, fid)
        g2.remove_node(select)
        return fid
    root = g.node(r.root)
    ty = root.type.with_(dtype="bfloat16") if narrow else root.type
    fid = g2.add(Node(Op.FUSED, tuple(inputs), attrs, ty, root.span))
    g2.replace_uses(r.root, fid)
    for m in members:
        if m in g2:
            g2.remove_node(m)
    return fid
