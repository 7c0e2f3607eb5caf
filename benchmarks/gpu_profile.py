#!/usr/bin/env python3
"""Where a GPU ties merge spends its time (issue 19): the k-th largest selection of one long row
by torch.kthvalue (one thread block per row) against a device-wide sort, and a torch.profiler
summary of `ties` on large random tensors held in GPU-resident state dicts.

    PYTHONPATH=. python3 benchmarks/gpu_profile.py
"""

from __future__ import annotations

import time

import torch

import mergelang as ml


def timed(fn, repeat: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat


def main() -> None:
    from mergelang.runtime.kernels.order import kth_largest_radix

    print("== k-th largest (ms): kthvalue | sort | topk | radix select (2 histograms)")
    for rows, n in ((1, 1 << 20), (1, 1 << 24), (1, 1 << 26), (64, 1 << 18)):
        x = torch.randn(rows, n, device="cuda")
        k = n // 5
        a = timed(lambda: torch.kthvalue(x, n - k + 1, dim=-1).values)
        b = timed(lambda: torch.sort(x, dim=-1).values[..., n - k])
        c = timed(lambda: torch.topk(x, k, dim=-1).values[..., -1])
        d = timed(lambda: kth_largest_radix(x, k))
        want = torch.kthvalue(x, n - k + 1, dim=-1, keepdim=True).values
        same = bool(torch.equal(torch.sort(x, dim=-1).values[..., n - k:n - k + 1], want)) and \
            bool(torch.equal(kth_largest_radix(x, k), want))
        print(f"{rows:>3} x {n:>9}  {a * 1e3:9.2f} {b * 1e3:9.2f} {c * 1e3:9.2f} {d * 1e3:9.2f}"
              f"  same value: {same}")
    print("== ties on 3 x 8 tensors of 4096 x 4096 (float32, in memory)")
    g = torch.Generator().manual_seed(0)
    shapes = {f"w{i}": (4096, 4096) for i in range(8)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    a = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    b = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    r = ml.compile('model base = "x"\nmodel a = "y"\nmodel b = "z"\n'
                   'merge from base { "*" => ties(base, [a, b], density = 0.2) }', base=base, a=a, b=b)
    r.evaluate("cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    r.evaluate("cuda")
    torch.cuda.synchronize()
    print(f"ties evaluate on cuda: {time.perf_counter() - t:.3f} s for {8 * 3 * 64} MiB of inputs")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        r.evaluate("cuda")
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))
    r.close()


if __name__ == "__main__":
    main()
