"""Graph passes: pure functions `MergeGraph -> MergeGraph`, run in the order of `PIPELINE`.

Each public pass returns a new graph (the input is never modified; `_name` is the in-place
version that `optimize` chains on a single copy), so `--emit graph` and
`--emit optimized` can both be shown and the differential tests can run both.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

from mergelang.ir.graph import MergeGraph, Node
from mergelang.ir.ops import FOLDABLE, Attrs, Op
from mergelang.passes.plan import Step
from mergelang.runtime.interpret import Interpreter

Pass = Callable[[MergeGraph], MergeGraph]

#: fold only results this small into CONST attrs (constants are per-model weights and scalars)
FOLD_LIMIT = 64


def _fold_constants(g: MergeGraph) -> MergeGraph:
    """Evaluate nodes whose inputs are all constants (e.g. stacked weights, their sums), in the
    graph's compute dtype: the plan interpreter walks the graph's CONST nodes and the small
    foldable ones in topological order (a node it does not visit is not a constant)."""
    steps = [Step(nid, ()) for nid in g.topo_order()
             if (n := g.node(nid)).op is Op.CONST or (n.op in FOLDABLE and n.args and n.op is not Op.ASSERT
                                                      and n.type.numel <= FOLD_LIMIT)]
    # nothing to free: each value is a CONST node of the graph (None: not a constant)
    Folder(g).run(steps, _Unvisited())
    return g


class _Unvisited(dict):
    """The folder's environment: a node it did not visit is not a constant (None)."""

    def __missing__(self, nid: int) -> None:
        return None


class Folder(Interpreter):
    """Constant folding as the plan interpreter's hooks (runtime/interpret.py): a node's value
    is its CONST node, or None when it is not constant. A node whose args are all constant
    (and which is foldable and small) becomes a CONST node of `graph`, computed without torch
    when it only moves values, else by its runtime kernel on the CPU."""

    def __init__(self, graph: MergeGraph):
        super().__init__(graph.node, "cpu")
        self.graph, self.wide = graph, graph.compute_dtype == "float64"

    def load(self, step: Step, n: Node) -> None:
        return None

    def output(self, step: Step, n: Node, value: Any) -> None:
        return None

    def run_node(self, step: Step, n: Node, args: list[Node | None]) -> Node | None:
        if n.op is Op.CONST:
            return n
        if (n.op not in FOLDABLE or not n.args or n.op is Op.ASSERT or n.type.numel > FOLD_LIMIT
                or any(a is None for a in args)):
            return None
        value = _fold_structural(n, args, self.wide)  # type: ignore[arg-type]
        if value is None:  # arithmetic: run the kernel (imports torch, only when something folds)
            value = as_python(self.kernel(n, self.consts(args), "cpu"))  # type: ignore[arg-type]
        folded = Node(Op.CONST, (), Attrs(value=value, type=n.type), n.type, n.span)
        self.graph.set_node(step.nid, folded)
        return folded

    def consts(self, args: list[Node]) -> list[Any]:
        """The CONST nodes' tensors, as the executor makes them (float64 from the Python
        numbers with compute_dtype float64)."""
        consts = [self.kernel(a, [], "cpu") for a in args]
        if self.wide:
            import torch

            consts = [torch.tensor(a.attrs["value"], dtype=torch.float64).reshape(c.shape)
                      if c.dtype == torch.float32 else c for a, c in zip(args, consts)]
        return consts


def _f32(x: Any) -> float:
    """`x` rounded to float32, as a CONST's float32 tensor holds it."""
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


def _fold_structural(n: Node, args: list[Node], wide: bool = False) -> Any:
    """Reshape, stack and index of constants without torch: they only move values (rounded to
    float32 as the kernels' tensors would be); the same attr value the kernel path gives (flat,
    float or bool). None: not such a node, or a value it does not handle."""
    dtype = n.type.dtype
    if n.op not in (Op.RESHAPE, Op.STACK, Op.INDEX) or dtype not in ("float32", "bool"):
        return None
    flats = []
    for a in args:
        v = a.attrs["value"]
        v = v if isinstance(v, tuple) else (v,)
        if a.type.dtype != dtype or not all(isinstance(x, (bool, int, float)) for x in v):
            return None
        try:
            flats.append(tuple(bool(x) if dtype == "bool" else float(x) if wide else _f32(x) for x in v))
        except OverflowError:
            return None
    if n.op is Op.INDEX:
        m, k = n.type.numel, args[0].type.models or 1
        i = n.attrs["i"] % k
        vals = flats[0][i * m:(i + 1) * m]
    else:
        vals = tuple(x for f in flats for x in f)
    if len(vals) != n.type.numel:
        return None
    return vals[0] if not n.type.full_shape else vals


def _is_const(g: MergeGraph, nid: int, value: float) -> bool:
    n = g.node(nid)
    if n.op is not Op.CONST or n.type.dtype != "float32":
        return False
    v = n.attrs["value"]
    return all(x == value for x in v) if isinstance(v, tuple) else v == value


def _simplify(g: MergeGraph) -> MergeGraph:
    """Algebraic identities that keep types: x*1, 1*x, x+0, 0+x, x-0, x/1, where(true, a, b)."""
    for nid in g.topo_order():
        n = g.node(nid)
        keep: int | None = None
        if n.op is Op.MUL:
            a, b = n.args
            keep = a if _is_const(g, b, 1.0) else b if _is_const(g, a, 1.0) else None
        elif n.op is Op.ADD:
            a, b = n.args
            keep = a if _is_const(g, b, 0.0) else b if _is_const(g, a, 0.0) else None
        elif n.op in (Op.SUB, Op.DIV):
            a, b = n.args
            keep = a if _is_const(g, b, 0.0 if n.op is Op.SUB else 1.0) else None
        elif n.op is Op.WHERE:
            c = g.node(n.args[0])
            if c.op is Op.CONST and isinstance(c.attrs["value"], bool):
                keep = n.args[1] if c.attrs["value"] else n.args[2]
        if keep is not None and g.node(keep).type == n.type:
            g.replace_uses(nid, keep)
    return g


def _cse(g: MergeGraph) -> MergeGraph:
    """Common-subexpression elimination: nodes with the same (op, args, attrs) are merged."""
    seen: dict[tuple, int] = {}
    for nid in g.topo_order():
        n = g.node(nid)
        if n.op is Op.OUTPUT:
            continue
        key = n.key()
        first = seen.get(key)
        if first is None:
            seen[key] = nid
        else:
            g.replace_uses(nid, first)
    return g


def _dce(g: MergeGraph) -> MergeGraph:
    """Dead-code elimination: drop every node no output depends on."""
    live = g.needed(g.outputs())
    g.remove_nodes_from([nid for nid in list(g.nodes) if nid not in live])
    return g


def _pure(inplace: Pass) -> Pass:
    def run(g: MergeGraph) -> MergeGraph:
        return inplace(g.clone())

    run.__name__ = inplace.__name__.lstrip("_")
    run.__doc__ = inplace.__doc__
    run.inplace = inplace  # type: ignore[attr-defined]
    return run


fold_constants = _pure(_fold_constants)
simplify = _pure(_simplify)
cse = _pure(_cse)
dce = _pure(_dce)

PIPELINE: tuple[Pass, ...] = (fold_constants, simplify, cse, dce)


def optimize(g: MergeGraph, check: Callable[[MergeGraph], None] | None = None) -> MergeGraph:
    """Run `PIPELINE` on one copy of `g` (each pass in place: cloning a 70B-shaped graph per
    pass was a third of compile time); `check` (e.g. graph.verify) runs after every pass."""
    g = g.clone()
    for p in PIPELINE:
        g = p.inplace(g)  # type: ignore[attr-defined]
        if check is not None:
            check(g)
    return g


def as_python(t: Any) -> Any:
    """A small constant tensor as a hashable attr value (float, bool or tuple)."""
    import torch

    if t.dim() == 0:
        return bool(t) if t.dtype == torch.bool else float(t)
    return tuple(bool(v) if t.dtype == torch.bool else float(v) for v in t.reshape(-1).tolist())
