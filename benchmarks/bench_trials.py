#!/usr/bin/env python3
"""Trial time (issue 33, item 5): `tune`'s TrialRunner (compile once, inputs held, params filled
per trial) on a device, per trial, and the share of a trial spent outside kernels (wall time
minus the device's kernel time from torch.profiler; on the CPU: minus the ATen ops' self time).

    PYTHONPATH=. python3 benchmarks/bench_trials.py --device cuda [--layers 8 --hidden 1024]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mergelang.compiler import compile_recipe
from mergelang.diagnostics import SourceFile
from mergelang.search.trials import TrialRunner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    h = args.hidden
    shapes = {f"layers.{i}.{p}": (h, h) for i in range(args.layers) for p in ("q", "k", "v", "o")}
    base = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    models = {"base": base, **{m: {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
                                    for k, v in base.items()} for m in ("a", "b")}}
    src = ('model base = "<memory>"\nmodel a = "<memory>"\nmodel b = "<memory>"\n'
           'param d = 0.5 in [0.1, 1]\nparam lam = 1.0 in [0, 2]\n'
           'merge from base {\n    "*" => ties(base, [a, b], density = d, lambda = lam)\n}\n')

    def compile_(runtime, fixed):
        return compile_recipe(SourceFile("r.mrg", src), Path.cwd(), {**models, **fixed}, runtime=runtime)

    r = TrialRunner(compile_, ("d", "lam"), args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    try:
        t = time.perf_counter()
        r.run({"d": 0.5, "lam": 1.0})  # the first trial reads the inputs
        sync()
        first = time.perf_counter() - t
        times = []
        for i in range(args.trials):
            t = time.perf_counter()
            r.run({"d": 0.2 + 0.1 * i, "lam": 0.8})
            sync()
            times.append(time.perf_counter() - t)
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            r.run({"d": 0.3, "lam": 1.2})
            sync()
            wall = time.perf_counter() - t
        ev = prof.key_averages()
        if args.device.startswith("cuda"):
            kernel = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in ev) / 1e6
        else:
            kernel = sum(e.self_cpu_time_total for e in ev if e.key.startswith("aten::")) / 1e6  # not the numba loops
        n = sum(v.numel() for v in base.values())
        room = r.room
        print(f"ties trials on {args.device}: {len(shapes)} tensors, {n * 2 * 3 / 2**20:.0f} MiB of bf16 inputs")
        print(f"first trial (reads the inputs): {first:.3f} s; later trials: best {min(times):.3f} s, "
              f"median {sorted(times)[len(times) // 2]:.3f} s")
        print(f"profiled trial: {wall:.3f} s wall, {kernel:.3f} s in kernels, "
              f"{max(0.0, 1 - kernel / wall):.0%} outside kernels")
        if room is not None:
            print(f"inputs resident on the device: room left {room.left / 2**30:.1f} GiB, "
                  f"spilled to host memory {room.spilled / 2**20:.0f} MiB")
    finally:
        r.close()


if __name__ == "__main__":
    main()
