"""MergeGraph's fast paths (ir/graph.NetworkxFastPaths) write networkx's internal dicts: pinned
to the networkx versions they are written for, and each one checked against the public API it
stands for (same graph, caches cleared so networkx's views and algorithms see new edges)."""

from __future__ import annotations

import re

import networkx as nx
import pytest

from mergelang.ir.graph import NETWORKX_SUPPORTED, PAYLOAD, MergeGraph, Node
from mergelang.ir.ops import Attrs, Op


def version(text: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


def test_networkx_version_is_supported() -> None:
    low, high = NETWORKX_SUPPORTED
    assert low <= version(nx.__version__) < high, (
        f"networkx {nx.__version__} is outside {NETWORKX_SUPPORTED}: check NetworkxFastPaths "
        "against its source (DiGraph.add_node/add_edge, nx._clear_cache), then widen the range")


#: (args) per node: a diamond, a node using one argument twice, a late user of an early node
SHAPES = [(), (), (0, 1), (2,), (2, 2), (3, 4), (0, 5)]


def fast_graph() -> MergeGraph:
    g = MergeGraph()
    for args in SHAPES:
        g.add(Node(Op.CONST, args, Attrs(), None))
    return g


def public_graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for nid, args in enumerate(SHAPES):
        g.add_node(nid, **{PAYLOAD: Node(Op.CONST, args, Attrs(), None)})
        for a in args:
            g.add_edge(a, nid)
    return g


def same(a: nx.DiGraph, b: nx.DiGraph) -> None:
    assert list(a.nodes(data=True)) == list(b.nodes(data=True))
    assert sorted(a.edges(data=True)) == sorted(b.edges(data=True))
    assert {n: dict(a.succ[n]) for n in a} == {n: dict(b.succ[n]) for n in b}
    assert {n: dict(a.pred[n]) for n in a} == {n: dict(b.pred[n]) for n in b}
    assert list(nx.lexicographical_topological_sort(a)) == list(nx.lexicographical_topological_sort(b))
    assert all(a.succ[u][v] is a.pred[v][u] for u, v in a.edges)  # one data dict per edge


def test_add_builds_the_graph_add_node_and_add_edge_build() -> None:
    g, ref = fast_graph(), public_graph()
    same(g, ref)
    assert [(nid, n) for nid, n in g.items()] == list(ref.nodes(data=PAYLOAD))
    assert all(g.node(nid) is g.nodes[nid][PAYLOAD] for nid in g)
    assert g.succ[2] == {3: {}, 4: {}} and list(g.predecessors(4)) == [2]
    with pytest.raises(KeyError):
        g.add(Node(Op.CONST, (99,), Attrs(), None))


def test_caches_see_edges_added_on_the_fast_path() -> None:
    g = MergeGraph()
    a = g.add(Node(Op.CONST, (), Attrs(), None))
    assert dict(g.succ[a]) == {} and list(nx.topological_sort(g)) == [a]
    b = g.add(Node(Op.CONST, (a,), Attrs(), None))
    assert dict(g.succ[a]) == {b: {}} and dict(g.adj[a]) == {b: {}} and dict(g.pred[b]) == {a: {}}
    assert list(nx.topological_sort(g)) == [a, b] and nx.ancestors(g, b) == {a}
    assert g.nodes[b][PAYLOAD].args == (a,) and len(g.edges) == 1
    if hasattr(g, "__networkx_cache__"):  # networkx >= 3.3: per-graph cache of backend results
        g.__networkx_cache__["probe"] = 1
        g.add(Node(Op.CONST, (b,), Attrs(), None))
        assert "probe" not in g.__networkx_cache__


def test_clone_is_a_copy_made_with_the_public_api() -> None:
    g = fast_graph()
    g.graph["compute_dtype"] = "float64"
    c = g.clone()
    same(c, g)
    assert c.graph == g.graph and type(c) is MergeGraph
    assert all(c.nodes[n] is not g.nodes[n] and c.node(n) is g.node(n) for n in g)
    c.add_edge(0, 3)  # the copy's structure is its own
    assert not g.has_edge(0, 3) and c.has_edge(0, 3) and list(c.predecessors(3)) == [2, 0]
    new = c.add(Node(Op.CONST, (6,), Attrs(), None))
    assert new not in g and c.topo_order()[-1] == new


def test_topo_order_matches_networkx() -> None:
    g = fast_graph()
    assert g.topo_order() == list(nx.lexicographical_topological_sort(g)) == sorted(g)
    g.add_edge(6, 0)  # an edge from a newer node to an older one: networkx decides
    g.remove_edge(0, 6)
    g.remove_edge(0, 2)
    assert g.topo_order() == list(nx.lexicographical_topological_sort(g)) != sorted(g)
