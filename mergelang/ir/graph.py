"""The merge graph: a `networkx.DiGraph` whose node payload is one typed :class:`Node`.

Argument order lives in `Node.args` (like torch.fx); edges mirror the args so networkx's
algorithms (topological order, ancestors, reachability) apply. `verify` checks the invariants and
runs after every pass in tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import networkx as nx

from mergelang.diagnostics import Span
from mergelang.ir.ops import ARITY, Attrs, Op, TypeRuleError, infer
from mergelang.ir.types import TType

PAYLOAD = "node"


@dataclass(frozen=True)
class Node:
    op: Op
    args: tuple[int, ...]
    attrs: Attrs
    type: TType
    span: Span | None = field(default=None, compare=False, repr=False)

    def key(self) -> tuple:
        """What makes two nodes interchangeable (for CSE)."""
        return (self.op, self.args, self.attrs)

    def with_args(self, args: tuple[int, ...]) -> "Node":
        return replace(self, args=args)


#: the networkx versions `NetworkxFastPaths` is written for, [lowest, first unsupported):
#: tests/ir/test_graph_networkx.py fails outside it and checks each fast path against the public API
NETWORKX_SUPPORTED = ((3, 0), (4, 0))
#: networkx >= 3.3 caches backend conversions per graph; its own add_* methods clear that cache
_clear_cache = getattr(nx, "_clear_cache", lambda g: None)


class NetworkxFastPaths(nx.DiGraph):
    """The one place that touches networkx internals: DiGraph's dicts `_node`, `_succ`, `_pred`
    and `nx._clear_cache`. Compiling a MoE recipe of 20k tensors per model adds 52k nodes and
    reads payloads 520k times; with networkx's public add_node/add_edge/nodes[...] instead, it
    takes ~20 % more CPU time (benchmarks/bench_graph_fastpaths.py). Each method
    does what its public equivalent (named in its docstring) does, minus the checks;
    tests/ir/test_graph_networkx.py keeps them equal."""

    def _insert(self, nid: int, node: Node) -> None:
        """add_node(nid, node=node), then add_edge(a, nid) per argument `a` (which must exist)."""
        succ, pred = self._succ, self._pred
        succ[nid] = {}
        preds = pred[nid] = {}
        self._node[nid] = {PAYLOAD: node}
        for a in node.args:
            if a not in succ:
                raise KeyError(f"internal: argument {a} of a new node is not in the graph")
            d = preds.get(a)
            if d is None:
                d = preds[a] = {}
            succ[a][nid] = d
        _clear_cache(self)

    def node(self, nid: int) -> Node:
        """The payload of node `nid`: self.nodes[nid][PAYLOAD]."""
        return self._node[nid][PAYLOAD]

    def items(self) -> Iterable[tuple[int, Node]]:
        """(id, payload) per node in insertion order: self.nodes(data=PAYLOAD)."""
        for nid, data in self._node.items():
            yield nid, data[PAYLOAD]

    def _sorted_if_topological(self) -> list[int] | None:
        """sorted(self) when every edge runs from a smaller id to a larger one, else None."""
        order = sorted(self._node)
        pred = self._pred
        return order if all(a < nid for nid in order for a in pred[nid]) else None

    def _copy_into(self, g: nx.DiGraph) -> None:
        """Into an empty `g`: g.add_nodes_from(self.nodes(data=True)) (attribute dicts copied,
        payloads shared), then g.add_edges_from(self.edges) (no edge data)."""
        g._node.update((nid, dict(data)) for nid, data in self._node.items())
        succ = {u: {v: {} for v in nbrs} for u, nbrs in self._succ.items()}
        pred: dict = {v: {} for v in self._pred}
        for u, nbrs in succ.items():
            for v, d in nbrs.items():
                pred[v][u] = d
        g._succ.update(succ)
        g._pred.update(pred)
        _clear_cache(g)


class MergeGraph(NetworkxFastPaths):
    """A DiGraph of `Node`s with typed accessors. Node ids are ints, unique per graph."""

    def __init__(self, incoming_graph_data=None, **attr):
        super().__init__(incoming_graph_data, **attr)
        self.graph.setdefault("next_id", 0)

    # -- building
    def add(self, node: Node) -> int:
        # the hot path of elaboration (NetworkxFastPaths)
        nid = self.graph["next_id"]
        self.graph["next_id"] = nid + 1
        self._insert(nid, node)
        return nid

    def make(self, op: Op, args: Iterable[int] = (), attrs: Attrs | None = None,
             span: Span | None = None) -> int:
        """Add a node, typing it with the op's type rule (raises TypeRuleError)."""
        args = tuple(args)
        attrs = attrs if attrs is not None else Attrs()
        ty = infer(op, attrs, [self.node(a).type for a in args])
        return self.add(Node(op, args, attrs, ty, span))

    def set_node(self, nid: int, node: Node) -> None:
        """Replace a node's payload, rewiring its incoming edges."""
        old = self.node(nid)
        for a in set(old.args):
            self.remove_edge(a, nid)
        self.nodes[nid][PAYLOAD] = node
        for a in node.args:
            self.add_edge(a, nid)

    def replace_uses(self, old: int, new: int) -> None:
        """Point every user of `old` at `new` (`old` stays, unused)."""
        for user in list(self.successors(old)):
            n = self.node(user)
            self.set_node(user, n.with_args(tuple(new if a == old else a for a in n.args)))

    # -- reading (node and items: NetworkxFastPaths)
    def outputs(self) -> list[int]:
        """OUTPUT node ids in output order."""
        outs = [nid for nid, n in self.items() if n.op is Op.OUTPUT]
        return sorted(outs, key=lambda nid: self.node(nid).attrs["order"])

    def needed(self, roots: Iterable[int]) -> set[int]:
        """`roots` and every node they depend on (the argument closure)."""
        seen: set[int] = set()
        stack = list(roots)
        while stack:
            nid = stack.pop()
            if nid in seen:
                continue
            seen.add(nid)
            stack.extend(self.node(nid).args)
        return seen

    def topo_order(self) -> list[int]:
        """networkx's lexicographical topological order (smallest ready id first). Builders
        create arguments before their users and passes only rewire uses to older nodes, so
        this is usually just the sorted ids: checked in O(edges), else networkx computes it."""
        order = self._sorted_if_topological()
        return order if order is not None else list(nx.lexicographical_topological_sort(self))

    @property
    def compute_dtype(self) -> str:
        """The dtype float values are computed in: "float32", or "float64" when the recipe asks
        for it (option compute_dtype; the compiler sets it, clones and copies keep it)."""
        return self.graph.get("compute_dtype", "float32")

    def fresh_copy(self) -> "MergeGraph":
        g = MergeGraph()
        g.graph.update(self.graph)
        return g

    def clone(self) -> "MergeGraph":
        """A copy sharing the (immutable) Node payloads; edges carry no data."""
        g = MergeGraph()
        g.graph.update(self.graph)
        self._copy_into(g)
        return g


class VerifyError(AssertionError):
    pass


def verify(g: MergeGraph) -> None:
    """Check the graph invariants; raises VerifyError naming the first broken one."""
    if not nx.is_directed_acyclic_graph(g):
        raise VerifyError("graph has a cycle")
    names: set[str] = set()
    chunks: dict[str, list[tuple[int, int, int]]] = {}
    orders: list[int] = []
    for nid, data in g.nodes(data=True):
        node = data.get(PAYLOAD)
        if not isinstance(node, Node) or set(data) != {PAYLOAD}:
            raise VerifyError(f"node {nid} must carry exactly one Node payload, has {sorted(data)}")
        if not isinstance(node.op, Op) or not isinstance(node.attrs, Attrs):
            raise VerifyError(f"node {nid}: bad op or attrs")
        arity = ARITY[node.op]
        if arity is not None and len(node.args) != arity:
            raise VerifyError(f"node {nid} ({node.op.value}) has {len(node.args)} args, wants {arity}")
        if set(g.predecessors(nid)) != set(node.args):
            raise VerifyError(f"node {nid}: edges {sorted(g.predecessors(nid))} != args {node.args}")
        try:
            expected = infer(node.op, node.attrs, [g.node(a).type for a in node.args])
        except TypeRuleError as exc:
            raise VerifyError(f"node {nid} ({node.op.value}): {exc}") from None
        if expected != node.type:
            raise VerifyError(f"node {nid} ({node.op.value}): type {node.type} != inferred {expected}")
        if node.op is Op.OUTPUT:
            if g.out_degree(nid):
                raise VerifyError(f"output node {nid} has users")
            name = node.attrs["name"]
            rows = node.attrs.get("rows")
            if rows is not None:  # a row chunk of an output (chunking.py)
                if name not in chunks:
                    orders.append(node.attrs["order"])
                chunks.setdefault(name, []).append(rows)
                continue
            if name in names:
                raise VerifyError(f"two outputs named {name!r}")
            names.add(name)
            orders.append(node.attrs["order"])
    for name, parts in chunks.items():
        parts.sort()
        total = parts[0][2]
        if name in names or [a for a, _, _ in parts] != [0] + [b for _, b, _ in parts[:-1]] \
                or parts[-1][1] != total or any(t != total for _, _, t in parts):
            raise VerifyError(f"the row chunks of {name!r} do not cover its rows once")
    if sorted(orders) != list(range(len(orders))):
        raise VerifyError("output orders are not 0..n-1")
    if g.graph.get("next_id", 0) <= max(g.nodes, default=-1):
        raise VerifyError("next_id would reuse an existing node id")


# ---------------------------------------------------------------- text form (--emit graph)
def format_graph(g: MergeGraph, models: dict[str, str] | None = None) -> str:
    """Stable text: nodes renumbered %0.. in a deterministic topological order, per output."""
    order = _emit_order(g)
    local = {nid: i for i, nid in enumerate(order)}
    lines = []
    for nid in order:
        n = g.node(nid)
        args = ", ".join(f"%{local[a]}" for a in n.args)
        attrs = _attrs_text(n)
        loc = f"  @{_short_path(n.span)}:{n.span.line}:{n.span.col}" if n.span else ""
        parts = [f"%{local[nid]} = {n.op.value}"]
        if args:
            parts.append(args)
        if attrs:
            parts.append(attrs)
        lines.append(" ".join(parts) + f" : {n.type}{loc}")
    return "\n".join(lines) + ("\n" if lines else "")


def _short_path(span: Span) -> str:
    """`stdlib/x.mrg` for library files, the bare file name for user files (stable goldens)."""
    src = span.source
    return src.display_path if src.library else src.path.rsplit("/", 1)[-1]


def _attrs_text(n: Node) -> str:
    a = dict(n.attrs)
    if n.op in (Op.LOAD, Op.CONST, Op.STAT_VALUE, Op.PARAM):
        a.pop("type", None)
    if n.op is Op.LOAD:
        return f"{a['model']}[{a['tensor']!r}] from {a['src_dtype']}"
    if n.op is Op.PARAM:
        from mergelang.ir.paramexpr import render

        return render(a["expr"])
    if n.op is Op.LOOP:
        return (f"fn={a['fn']!r} times={a['times']} body=<{len(a['body'])} nodes, "
                f"{', '.join(sorted({b.op.value for b in a['body']}))}>")
    if n.op is Op.BATCH:  # passes/batch.py: the ops that run once on the stack, in order
        ops = " ".join(b.op.value for b in a["body"] if b.op is not Op.ARG)
        return f"tensors={a['batch']} loads_each={a['loads']} ops=<{ops}>"
    if n.op is Op.UNBATCH:
        return f"index={a['index']}"
    return " ".join(f"{k}={v!r}" for k, v in sorted(a.items()))


def postorder(g: MergeGraph, root: int, seen: set[int], done: Callable[[int], None]) -> None:
    """Depth-first over `root`'s arguments in argument order, skipping `seen` nodes (and adding
    the visited ones to it); `done(nid)` after all of a node's arguments (post-order)."""
    stack = [(root, False)]
    while stack:
        nid, finished = stack.pop()
        if finished:
            done(nid)
            continue
        if nid in seen:
            continue
        seen.add(nid)
        stack.append((nid, True))
        for a in reversed(g.node(nid).args):
            if a not in seen:
                stack.append((a, False))


def _emit_order(g: MergeGraph, eager: bool = False) -> list[int]:
    """Depth-first from each output in output order: a value right before its first use.

    `eager` (statistics passes, whose outputs are feeds that each end a small side branch):
    outputs with more ancestors go first, and as soon as a value is computed, every consumer
    cone that ends in outputs and needs nothing else not yet computed runs right away, so a
    value is not kept alive only for a feed written much later (OPCM's per-model norms beside
    its sequential chain: constant memory in the number of models)."""
    seen: set[int] = set()
    order: list[int] = []
    computed: set[int] = set()  # in `order` (seen also holds nodes whose args are pending)

    def ready_cone(c: int, cone: set[int]) -> bool:
        if c in computed or c in cone:
            return True
        if c in seen or any(a not in computed and a not in cone for a in g.node(c).args):
            return False
        cone.add(c)
        return all(ready_cone(u, cone) for u in g.successors(c))

    def flush(nid: int) -> None:
        for c in sorted(g.successors(nid)):
            if c in seen or any(a not in computed for a in g.node(c).args):
                continue
            cone: set[int] = set()
            if ready_cone(c, cone):
                for x in sorted(cone):
                    visit(x)

    def done(nid: int) -> None:
        order.append(nid)
        computed.add(nid)
        if eager:
            flush(nid)

    def visit(root: int) -> None:
        postorder(g, root, seen, done)

    outs = g.outputs()
    if eager:
        size = {o: len(nx.ancestors(g, o)) for o in outs}
        outs = sorted(outs, key=lambda o: -size[o])
    for out in outs:
        visit(out)
    for nid in sorted(g.nodes):  # unreachable nodes (before DCE) last, in id order
        if nid not in seen:
            visit(nid)
    return order


emit_order = _emit_order
attrs_text = _attrs_text
