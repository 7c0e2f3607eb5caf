"""Batching (GPU targets): same-shape tensors that go through the same steps run as one stack.

A Llama's 32 `q_proj` (a MoE layer's experts, ...) are merged by the same chain of ops, each a
kernel launch per tensor. On a GPU a launch of a small tensor costs more than its arithmetic, so
this pass groups the outputs whose *cones* (every value an output needs that no other output
needs: its loads and its private ops; constants, run-time params and statistics are shared)
are identical up to the tensor names, and replaces each group of B by:

    load ... (the B x K loads, as before)
    %s = batch <loads of tensor 0>, ..., <loads of tensor B-1>, <shared values>   (one BATCH)
    %o_b = unbatch %s index=b ; write ... <- %o_b                                   (per tensor)

A BATCH stacks its K stacked inputs once (`torch.stack`) and runs each op of the shared body
once on the stack (runtime/kernels/batched.py: elementwise ops directly, reductions over models
or rows with the dims shifted, order statistics per tensor as rows of one [B*M, N] view, the
rest tensor by tensor), so its result is the unbatched plan's, byte for byte (tests/passes/
test_batch.py). The output's cast is part of the body; UNBATCH is a view.

Memory: a group's stacked inputs and result are live at once, and a stacked result lives until
its last tensor is written (outputs keep their order). Groups are cut into runs of at most
`max_batch` tensors consecutive in output order; `max_batch` is halved until the plan's peak
fits the target's budget (`DEFAULT_BATCH_BUDGET` when none is given); at 1 nothing is batched.

Opt-in for now: `MERGELANG_BATCH=1` batches plans for every target (the CPU's fused loops give
way to it); without it nothing is batched. It becomes the default for GPU targets once a GPU run
(benchmarks/gpu_check.sh) has shown the batched CUDA plans byte-equal to the unbatched ones and
faster: no GPU was available when it was built, so neither is measured yet.
"""

from __future__ import annotations

import os
from dataclasses import replace

from mergelang.ir.graph import MergeGraph, Node, emit_order
from mergelang.ir.ops import Attrs, Op
from mergelang.ir.types import TType
from mergelang.passes.plan import ExecutionPlan, rescheduled

#: values every output may share: they are arguments of a BATCH, not part of its body
SHARED_OPS = frozenset({Op.CONST, Op.PARAM, Op.STAT_VALUE})
#: attributes that name the tensor (they differ between the members of a group)
ITEM_ATTRS = frozenset({"tensor", "name", "order"})
#: ops a cone may not contain: checks name their tensor; loops and regions carry bodies
UNBATCHABLE = frozenset({Op.ASSERT, Op.LOOP, Op.FUSED, Op.BATCH, Op.UNBATCH, Op.MODEL_STAT,
                         Op.ARG, Op.PLUGIN})
#: the most tensors in one BATCH
MAX_BATCH = 64
#: the peak of live bytes batching may grow a plan to when the target gives no budget
DEFAULT_BATCH_BUDGET = 8 << 30


def batching_requested(device: str) -> bool:
    """Batch on `device` only with MERGELANG_BATCH=1 (opt-in until measured on a GPU: see the
    module's docstring); `device` is kept for the per-device default that run will set."""
    del device
    return os.environ.get("MERGELANG_BATCH") == "1"


def _cone(g: MergeGraph, out: int) -> list[int] | None:
    """The values output `out` needs, shared ones left out, in id order (a topological order
    of one cone: builders make arguments first); None when one of them cannot be batched."""
    nodes = sorted(n for n in g.needed([out]) if g.node(n).op not in SHARED_OPS)
    for nid in nodes:
        n = g.node(nid)
        if n.op in UNBATCHABLE or "rows" in n.attrs:
            return None
    return nodes


def _signature(g: MergeGraph, cone: list[int]) -> tuple:
    local = {nid: i for i, nid in enumerate(cone)}
    sig = []
    for nid in cone:
        n = g.node(nid)
        attrs = tuple((k, v) for k, v in n.attrs.items() if k not in ITEM_ATTRS)
        args = tuple(("v", local[a]) if a in local else ("s", a) for a in n.args)
        sig.append((n.op, attrs, n.type, args))
    return tuple(sig)


def _groups(g: MergeGraph, outs: list[int]) -> list[list[tuple[int, list[int]]]]:
    """Outputs with identical, disjoint cones that compute something, grouped (output order)."""
    cones: dict[int, list[int]] = {}
    owner: dict[int, int] = {}
    clash: set[int] = set()
    for out in outs:
        cone = _cone(g, out)
        if cone is None or not any(g.node(n).op not in (Op.LOAD, Op.OUTPUT) for n in cone):
            continue
        cones[out] = cone
        for nid in cone:
            if nid in owner:  # a value two outputs need (e.g. tied embeddings): neither batches
                clash.update((owner[nid], out))
            owner[nid] = out
    by_sig: dict[tuple, list[tuple[int, list[int]]]] = {}
    for out, cone in cones.items():
        if out not in clash:
            by_sig.setdefault(_signature(g, cone), []).append((out, cone))
    return [members for members in by_sig.values() if len(members) > 1]


def _add_batch(g: MergeGraph, members: list[tuple[int, list[int]]]) -> None:
    """Replace `members` (output, cone) by one BATCH, an UNBATCH per tensor and the outputs."""
    first = members[0][1]
    loads = [nid for nid in first if g.node(nid).op is Op.LOAD]
    k = len(loads)
    shared: list[int] = []
    body: list[Node] = []
    local: dict[int, int] = {}
    for i, nid in enumerate(loads):
        local[nid] = len(body)
        body.append(Node(Op.ARG, (), Attrs(index=i, type=g.node(nid).type), g.node(nid).type))
    out_node = g.node(members[0][0])
    items = []  # (body index, per tensor: the attributes that name it), e.g. BERNOULLI's seed key
    for pos, nid in enumerate(first):
        n = g.node(nid)
        if n.op in (Op.LOAD, Op.OUTPUT):
            continue
        args = []
        for a in n.args:
            if a not in local:  # a shared value: an ARG after the stacked ones
                shared.append(a)
                local[a] = len(body)
                body.append(Node(Op.ARG, (), Attrs(index=k + len(shared) - 1, type=g.node(a).type),
                                 g.node(a).type))
            args.append(local[a])
        if ITEM_ATTRS & set(n.attrs):
            items.append((len(body), tuple(Attrs({k: v for k, v in g.node(c[pos]).attrs.items()
                                                  if k in ITEM_ATTRS}) for _, c in members)))
        local[nid] = len(body)
        body.append(replace(n, args=tuple(args)))
    root = body[-1]
    if root.type.dtype != out_node.attrs["dtype"]:  # the write's cast, once for the stack
        cast = Attrs(dtype=out_node.attrs["dtype"])
        body.append(Node(Op.CAST, (len(body) - 1,), cast, root.type.with_(dtype=cast["dtype"])))
    item = body[-1].type
    b = len(members)
    ty = TType((b, *item.full_shape), item.dtype)
    args = [nid for _, cone in members for nid in cone if g.node(nid).op is Op.LOAD] + shared
    bid = g.add(Node(Op.BATCH, tuple(args), Attrs(body=tuple(body), batch=b, loads=k, type=ty,
                                                        named=tuple(items)), ty,
                     out_node.span))
    for i, (out, cone) in enumerate(members):
        u = g.add(Node(Op.UNBATCH, (bid,), Attrs(index=i, type=item), item))
        g.set_node(out, g.node(out).with_args((u,)))
        for nid in cone:
            if g.node(nid).op not in (Op.LOAD, Op.OUTPUT):
                g.remove_node(nid)


def batch_plan(plan: ExecutionPlan, budget: int | None = None, max_batch: int = MAX_BATCH
               ) -> ExecutionPlan:
    """`plan` with its same-shape groups batched (see the module docstring)."""
    g0 = plan.graph
    groups = _groups(g0, plan.outputs)
    limit = DEFAULT_BATCH_BUDGET if budget is None else budget
    limit = max(limit, plan.peak_bytes)  # batching never needs to fit where the plan did not
    while groups and max_batch > 1:
        g = g0.clone()
        for members in groups:
            for i in range(0, len(members), max_batch):
                if len(members[i:i + max_batch]) > 1:
                    _add_batch(g, members[i:i + max_batch])
        out = rescheduled(plan, g, emit_order(g))
        if out.peak_bytes <= limit:
            return out
        max_batch //= 2
    return plan
