"""`iterate` as one LOOP node: the body is elaborated once into a small graph of its own (ARG nodes
for the loop's tensor inputs) and stored in the node's attributes, so compile time and memory do
not grow with the number of rounds (karcher's `max_iter: 1200`). The runtime kernel
(runtime/kernels/loop.py) runs the body up to `times` rounds and stops at a fixed point: once a
round leaves the state bit for bit unchanged every later round would too, since the body is a
pure function of the state and the loop's invariant inputs.

A body that cannot be a loop — it reads a model by its global name, computes model-wide
statistics, or changes the state's type — is unrolled instead, at most MAX_UNROLL rounds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mergelang.ir.graph import MergeGraph, Node
from mergelang.ir.ops import OP_INFO, Attrs, Op
from mergelang.lang.values import Const, ListV, ModelV, TensorV, Value

if TYPE_CHECKING:
    from mergelang.diagnostics import Span

#: rounds `iterate` unrolls when its body cannot be a loop node
MAX_UNROLL = 256


class NotLoopable(Exception):
    """Raised inside a body's elaboration (e.g. a model read by name): unroll instead."""


def build_loop(el: Any, fn: Any, params: list[str], init: Value, args: list[Value], times: int,
               span: Span) -> Value | None:
    """The LOOP node's value, or None when the body cannot be one (the caller unrolls)."""
    if not isinstance(init, (TensorV, ModelV)):
        return None
    outer = [el.to_node(init, span)]
    slots: list[int | Value] = []  # per extra argument: an input index, or a compile-time value
    for a in args:
        if isinstance(a, (TensorV, ModelV)):
            outer.append(el.to_node(a, span))
            slots.append(len(outer) - 1)
        elif isinstance(a, Const) or (isinstance(a, ListV) and a.scalars):
            slots.append(a)
        else:
            return None
    types = [el.graph.node(n).type for n in outer]
    inner = el.body_view()  # its own graph, reads no model (NotLoopable)
    body = inner.graph
    try:
        ins = [body.make(Op.ARG, [], Attrs(index=i, type=t)) for i, t in enumerate(types)]
        vals = [TensorV(ins[0])] + [TensorV(ins[s]) if isinstance(s, int) else s for s in slots]
        result = inner.to_node(inner.apply(fn, dict(zip(params, vals)), span, tag="#loop"), span)
    except NotLoopable:
        return None
    if body.node(result).type != types[0]:
        return None
    program, peak = _program(body, result)
    if any(not OP_INFO[n.op].in_loop for n in program):  # reads, outputs, model-wide statistics
        return None
    return TensorV(el.make(Op.LOOP, outer, Attrs(body=program, times=times, type=types[0],
                                                 fn=fn.name, peak=peak), span))


def _program(g: MergeGraph, result: int) -> tuple[tuple[Node, ...], int]:
    """The nodes `result` needs, in creation (topological) order, args renumbered to positions in
    the tuple, the result last; and the peak bytes of the values live at once in one round."""
    need: set[int] = set()
    todo = [result]
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            todo += g.node(n).args
    order = sorted(need)
    order.remove(result)
    order.append(result)
    pos = {nid: i for i, nid in enumerate(order)}
    nodes = tuple(Node(g.node(nid).op, tuple(pos[a] for a in g.node(nid).args), g.node(nid).attrs,
                       g.node(nid).type) for nid in order)
    last = {a: i for i, n in enumerate(nodes) for a in n.args}
    live = peak = 0
    for i, n in enumerate(nodes):
        if n.op not in (Op.ARG, Op.CONST):
            live += n.type.nbytes
            peak = max(peak, live)
        live -= sum(nodes[a].type.nbytes for a in set(n.args)
                    if last.get(a) == i and nodes[a].op not in (Op.ARG, Op.CONST))
    return nodes, peak
