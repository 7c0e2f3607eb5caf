#!/usr/bin/env python3
"""What MergeGraph's fast paths into networkx (ir/graph.NetworkxFastPaths) are worth: compile
a DeepSeek-V3-shaped pair of header-only checkpoints (bench_moe_overhead.py's layout, 16 layers:
~20k tensors per model) with the fast paths, then with networkx's public API in their place
(add_node/add_edge, nodes[...], add_nodes_from/add_edges_from). CPU time of `api.compile`,
best of --reps, each variant in its own process, the variants interleaved --rounds times.

    python benchmarks/bench_graph_fastpaths.py --dir /tmp/mlgraph
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

CHILD = r'''
import sys, time
from pathlib import Path
import networkx as nx
from mergelang.ir import graph as G

if sys.argv[2] == "public":
    def add(self, node):
        nid = self.graph["next_id"]
        self.graph["next_id"] = nid + 1
        for a in node.args:
            if a not in self:
                raise KeyError(a)
        self.add_node(nid, **{G.PAYLOAD: node})
        for a in node.args:
            self.add_edge(a, nid)
        return nid

    def clone(self):
        g = G.MergeGraph()
        g.graph.update(self.graph)
        g.add_nodes_from((n, dict(d)) for n, d in self.nodes(data=True))
        g.add_edges_from(self.edges)
        return g

    def topo_order(self):
        order = sorted(self)
        if all(a < nid for nid in order for a in self.pred[nid]):
            return order
        return list(nx.lexicographical_topological_sort(self))

    G.MergeGraph.add, G.MergeGraph.clone, G.MergeGraph.topo_order = add, clone, topo_order
    G.MergeGraph.node = lambda self, nid: self.nodes[nid][G.PAYLOAD]
    G.MergeGraph.items = lambda self: iter(self.nodes(data=G.PAYLOAD))

import mergelang.api as api
recipe = Path(sys.argv[1])
if sys.argv[2] == "count":  # how often one compile adds a node and reads a payload
    calls = {"add": 0, "node": 0}

    def counted(name, f):
        def wrapper(*args):
            calls[name] += 1
            return f(*args)
        return wrapper

    G.MergeGraph.add = counted("add", G.MergeGraph.add)
    G.MergeGraph.node = counted("node", G.MergeGraph.node)
    api.compile(recipe)
    print(calls["add"], calls["node"])
    sys.exit(0)
api.compile(recipe)  # warm: imports, the parser
times = []
for _ in range(int(sys.argv[3])):
    t = time.process_time()
    api.compile(recipe)
    times.append(time.process_time() - t)
print(min(times))
'''


def main() -> None:
    from bench_moe_overhead import DENSE_LAYERS, EXPERTS, sparse_safetensors, v3_shapes, with_scales

    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/mlgraph")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    d = Path(args.dir) / f"v3_{args.layers}"
    shapes = with_scales(v3_shapes(args.layers))
    for m in ("a", "b"):
        if not (d / m / "config.json").exists():
            sparse_safetensors(d / m / "model.safetensors", shapes)
            (d / m / "config.json").write_text(json.dumps(
                {"model_type": "deepseek_v3", "num_hidden_layers": args.layers, "n_routed_experts": EXPERTS,
                 "first_k_dense_replace": DENSE_LAYERS, "quantization_config": {
                     "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}))
    recipe = d / "r.mrg"
    recipe.write_text(f'model a = "{d}/a"\nmodel b = "{d}/b"\nmerge from a {{\n'
                      '    "model.layers.{i}.mlp.experts.{e}.*" => b\n    "*" => linear([a, b])\n}\n')
    print(f"compile of a {args.layers}-layer DeepSeek-V3 pair, {len(shapes)} tensors per model "
          f"(CPU s, best of {args.reps})")
    run = [sys.executable, "-c", CHILD, str(recipe)]
    adds, reads = subprocess.run([*run, "count", "0"], capture_output=True, text=True,
                                 check=True).stdout.split()[-2:]
    print(f"one compile adds {int(adds)} nodes and reads a node's payload {int(reads)} times")
    best: dict[str, list[float]] = {"fast": [], "public": []}
    for r in range(args.rounds):
        for variant in best:
            out = subprocess.run([*run, variant, str(args.reps)], capture_output=True, text=True,
                                 check=True).stdout
            best[variant].append(float(out.split()[-1]))
        print(f"round {r + 1}: fast paths {best['fast'][-1]:.2f} s, public API {best['public'][-1]:.2f} s")
    f, p = min(best["fast"]), min(best["public"])
    print(f"best: fast paths {f:.2f} s, public API {p:.2f} s: the public API takes {(p / f - 1) * 100:.0f} % more")


if __name__ == "__main__":
    main()
