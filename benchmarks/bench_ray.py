#!/usr/bin/env python3
"""The Ray executor against the local one, side by side in one run (issue 19's scale model):
a local 2-node Ray cluster (ray.cluster_utils.Cluster on 127.0.0.1, one CPU per node) and the
local executor merge the same float32 models; prints wall times, their ratio, the per-worker
throughput (output bytes / s / worker) and the driver's share.

    python benchmarks/bench_ray.py --dir /tmp/mlray --mb 200 --method ties
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make(root: Path, mb: int) -> None:
    import torch
    from safetensors.torch import save_file

    rows = 1024
    n = max(1, mb * (1 << 20) // (rows * 1024 * 4))
    for k, name in enumerate(("base", "a", "b")):
        d = root / name
        if (d / "model.safetensors").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(k)
        save_file({f"model.layers.{i}.w": torch.randn(rows, 1024, generator=g) for i in range(n)},
                  str(d / "model.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/mlray")
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--method", default="ties")
    ap.add_argument("--nodes", type=int, default=2)
    args = ap.parse_args()
    root = Path(args.dir)
    make(root, args.mb)
    call = {"ties": "ties(base, [a, b], density = 0.3)", "linear": "linear([base, a, b])"}[args.method]
    recipe = root / f"{args.method}.mrg"
    recipe.write_text(f'model base = "{root}/base"\nmodel a = "{root}/a"\nmodel b = "{root}/b"\n'
                      f'merge from base {{ "*" => {call} }}\n')
    import ray
    from ray.cluster_utils import Cluster

    import mergelang as ml

    r = ml.compile(recipe)
    out_bytes = r.compilation.plan.write_bytes
    for d in ("local", "ray"):
        shutil.rmtree(root / d, ignore_errors=True)
    t = time.perf_counter()
    r.run(root / "local", fsync=False)
    local = time.perf_counter() - t
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    for _ in range(args.nodes - 1):
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    try:
        t = time.perf_counter()
        r.run(root / "ray", fsync=False, executor="ray", ray_address=c.address)
        remote = time.perf_counter() - t
    finally:
        ray.shutdown()
        c.shutdown()
    r.close()
    same = all((root / "local" / p.name).read_bytes() == p.read_bytes()
               for p in (root / "ray").glob("*.safetensors"))
    mb = out_bytes / 1e6
    print(f"{args.method}: {mb:.0f} MB out, inputs {3 * mb:.0f} MB; local {local:.2f} s "
          f"({mb / local:.0f} MB/s); ray {args.nodes} workers {remote:.2f} s "
          f"({mb / remote / args.nodes:.0f} MB/s per worker, incl. actor start-up); "
          f"ray / local {remote / local:.2f}; identical bytes: {same}")


if __name__ == "__main__":
    main()
