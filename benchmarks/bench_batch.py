#!/usr/bin/env python3
"""Launches per tensor, batched (passes/batch.py) against unbatched, on a Llama-shaped model.

Every ATen op that reaches a kernel is counted (a TorchDispatchMode sees each one; on a GPU each
is at least one kernel launch, on the CPU one kernel call), over one in-memory merge
(`Recipe.evaluate`) of base + 2 models, per method, then divided by the number of merged tensors.
Unbatched: MERGELANG_BATCH=0 with fusion off (the GPU's plan: torch's kernels one op at a time);
batched: MERGELANG_BATCH=1. The two results are compared byte for byte. On the CPU the numpy
selection inside a top-k is not an ATen op (on a GPU it is torch.sort/kthvalue: counted there).

    PYTHONPATH=. python3 benchmarks/bench_batch.py [--device cuda] [--layers 8] [--hidden 64]
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mergelang as ml

METHODS = {
    "linear": "linear([base, a, b])",
    "task_arithmetic": "task_arithmetic(base, [a, b], lambda = 0.7)",
    "ties": "ties(base, [a, b], weights = [1, 1], density = 0.5)",
    "dare_ties": "dare_ties(base, [a, b], density = 0.5, seed = 1)",
    "della": "della(base, [a, b], density = 0.5, epsilon = 0.1, seed = 1)",
    "breadcrumbs": "breadcrumbs(base, [a, b], density = 0.9, gamma = 0.05)",
    "slerp": "slerp(a, b, t = 0.4)",
}


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def llama(layers: int, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inter, kv = hidden * 8 // 3, hidden // 4
    sd = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (kv, hidden)),
                            ("self_attn.v_proj", (kv, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                            ("mlp.down_proj", (hidden, inter))):
            sd[p + name + ".weight"] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    return sd


def run(expr: str, models: dict, device: str, batched: bool) -> tuple[dict, int, float]:
    os.environ["MERGELANG_BATCH"] = "1" if batched else "0"
    os.environ["MERGELANG_FUSE"] = "0"
    r = ml.compile('model base = "x"\nmodel a = "y"\nmodel b = "z"\n'
                   f'merge from base {{ "*" => {expr} }}', **models)
    r.evaluate(device)  # warm-up (and kernels loaded)
    with Count() as c:
        out = r.evaluate(device)
    times = []
    for _ in range(3):  # timed without the counter (it costs a Python call per op)
        t = time.perf_counter()
        r.evaluate(device)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    dt = min(times)
    r.close()
    return out, sum(c.ops.values()), dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = llama(args.layers, args.hidden, 0)
    models = {"base": base}
    for k, m in ((1, "a"), (2, "b")):
        models[m] = {n: (v.float() + 0.01 * t.float()).to(torch.bfloat16)
                     for (n, v), t in zip(base.items(), llama(args.layers, args.hidden, k).values())}
    n = len(base)
    print(f"{n} tensors ({args.layers} layers x 7 projections, hidden {args.hidden}), base + 2 models, "
          f"device {args.device}; ATen ops per merged tensor (one evaluate; fusion off)")
    print(f"{'method':16} {'unbatched':>10} {'batched':>8} {'ratio':>6} {'unbatched s':>12} "
          f"{'batched s':>10}  same bytes")
    for method in args.methods.split(","):
        plain, n0, t0 = run(METHODS[method], models, args.device, False)
        got, n1, t1 = run(METHODS[method], models, args.device, True)
        same = all(torch.equal(plain[k].view(torch.int16), got[k].view(torch.int16)) for k in plain)
        print(f"{method:16} {n0 / n:10.1f} {n1 / n:8.1f} {n0 / max(n1, 1):6.1f} {t0:12.4f} {t1:10.4f}  {same}")


if __name__ == "__main__":
    main()
