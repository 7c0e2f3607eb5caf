"""FP8 weights read as stored: a block-scaled FP8 weight (sources/fp8.BlockFp8) crosses from the
file to where it is computed on as its codes (1 byte per element) and its block scales, not as
the float32 values the dequantizing source would make (4 bytes per element).

Two users, both plan passes (passes/pipeline.py):
- the fuse pass (CPU) makes a LOAD that only generated loops read into a codes LOAD plus a
  scales LOAD (`read_stored`) and the loop decodes them (numba_codegen's `fp8:` inputs);
- `narrow_reads` (GPU plans) puts a BLOCK_DEQUANT after the two LOADs: the codes are copied
  (4x less over the bus and in pinned memory) and dequantized on the device, instead of by
  torch on the CPU first. CPU plans keep the source's dequantizing read for LOADs their loops
  do not decode: it runs in the reader threads, overlapped with compute (measured: moving it
  into the compute step made unfused CPU merges of two 294 MB FP8 models 20-45% slower).
Both compute q * scale as the source does (one float32 product): the same bits. Row chunks (a
memory budget) keep the source's dequantizing read: their rows need not align with blocks.
"""

from __future__ import annotations

from dataclasses import replace

from mergelang.ir.graph import MergeGraph, Node
from mergelang.ir.ops import Attrs, Op
from mergelang.ir.types import TType
from mergelang.passes.plan import ExecutionPlan, rescheduled

#: stored dtypes of block-scaled FP8 weights read as codes
FP8_CODES = ("float8_e4m3fn", "float8_e5m2")


def stored_fp8(n: Node) -> bool:
    """A LOAD of a whole 2-D block-scaled FP8 weight (the elaborator's attr `scale`), still read
    through the dequantizing source."""
    return (n.op is Op.LOAD and n.attrs.get("scale") is not None and n.attrs.get("rows") is None
            and not n.attrs.get("stored") and n.type.dtype == "float32"
            and n.attrs.get("src_dtype") in FP8_CODES and len(n.type.shape) == 2 and n.type.numel > 1)


def read_stored(g2: MergeGraph, nid: int, n: Node) -> int:
    """Make LOAD `nid` of `g2` read its FP8 codes as stored; add and return the LOAD of its
    block scales (both attr `stored`: `ModelSource.load_stored`)."""
    name, b0, b1 = n.attrs["scale"]
    rows, cols = n.type.shape
    grid = TType((-(-rows // b0), -(-cols // b1)))
    g2.set_node(nid, replace(n, type=n.type.with_(dtype=n.attrs["src_dtype"]),
                             attrs=Attrs(dict(n.attrs), view=True, stored=True)))
    return g2.add(Node(Op.LOAD, (), Attrs(model=n.attrs["model"], tensor=name, src_dtype="float32",
                                          view=True, stored=True), grid, n.span))


def narrow_reads(plan: ExecutionPlan) -> ExecutionPlan:
    """Every FP8 LOAD still read dequantized becomes codes + scales LOADs and a BLOCK_DEQUANT
    (in the old LOAD's place for its users), dequantized where the plan runs."""
    g = plan.graph
    loads = [s.nid for s in plan.steps if stored_fp8(g.node(s.nid))]
    if not loads:
        return plan
    g2 = MergeGraph(g)
    after: dict[int, list[int]] = {}
    for nid in loads:
        n = g.node(nid)
        users = list(g.successors(nid))
        scale = read_stored(g2, nid, n)
        deq = g2.add(Node(Op.BLOCK_DEQUANT, (nid, scale), Attrs(block=tuple(n.attrs["scale"][1:])),
                          n.type, n.span))
        for u in users:
            un = g2.node(u)
            g2.set_node(u, un.with_args(tuple(deq if a == nid else a for a in un.args)))
        after[nid] = [scale, deq]
    order = [x for s in plan.steps for x in (s.nid, *after.get(s.nid, ()))]
    return rescheduled(plan, g2, order)
