#!/usr/bin/env python3
"""The k-th largest value per row (the threshold of every top-k mask): the sort-free radix select
(`order.kth_largest_radix`: two 65536-bin histograms per row) against torch.kthvalue, torch.sort,
torch.topk and, on the CPU, numpy's introselect (`np.partition`), per size, on one device; and
which one `order.kth_largest` picks there (its rule: `order.RADIX_MIN_ROW`, `order.LONG_ROW`).

    PYTHONPATH=. python3 benchmarks/bench_select.py [--device cuda] [--max-log2 26]

Prints one line per (rows, row length): milliseconds per call (best of --repeat), the fastest,
what the rule picks, and whether every method gave the same value (they must: it is one element).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mergelang.runtime.kernels import order


def timed(fn, device: str, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def methods(x: torch.Tensor, k: int) -> dict:
    n = x.shape[-1]
    out = {"kthvalue": lambda: torch.kthvalue(x, n - k + 1, dim=-1, keepdim=True).values,
           "sort": lambda: torch.sort(x, dim=-1).values[..., n - k:n - k + 1],
           "topk": lambda: torch.topk(x, k, dim=-1).values[..., -1:],
           "radix": lambda: order.kth_largest_radix(x, k)}
    if x.device.type == "cpu":
        out["partition"] = lambda: torch.from_numpy(
            np.ascontiguousarray(np.partition(x.numpy(), n - k, axis=-1)[..., n - k:n - k + 1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-log2", type=int, default=22, help="longest row: 2**N entries")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    dev = args.device
    names = list(methods(torch.zeros(1, 4), 1))
    print(f"k-th largest per row on {dev}, ms per call (best of {args.repeat}); k = n / 5")
    print(f"{'rows':>5} {'n':>10} " + " ".join(f"{m:>10}" for m in names) + f"  {'fastest':>10} {'rule':>10} same")
    g = torch.Generator().manual_seed(0)
    for log2 in range(12, args.max_log2 + 1, 2):
        n = 1 << log2
        for rows in (1, 8, 64):
            if rows * n > (1 << args.max_log2):
                continue
            x = torch.randn(rows, n, generator=g).to(dev)
            k = n // 5
            fns = methods(x, k)
            ms = {m: timed(f, dev, args.repeat) * 1e3 for m, f in fns.items()}
            vals = [f() for f in fns.values()]
            same = all(torch.equal(v.cpu(), vals[0].cpu()) for v in vals)
            fastest = min(ms, key=ms.__getitem__)
            print(f"{rows:>5} {n:>10} " + " ".join(f"{ms[m]:10.3f}" for m in names)
                  + f"  {fastest:>10} {order.select_method(x, k):>10} {same}")


if __name__ == "__main__":
    main()
