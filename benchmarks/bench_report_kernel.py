"""ns per entry of run --report's sums kernel (tools.merge_report.run_sums) and of inspect's
large-tensor statistics (tools.inspect_select.bracket_stats, one pass, and the bucket method
it falls back to, tools.inspect_kernels.fused_stats), on synthetic bfloat16 tensors (no files).

    python benchmarks/bench_report_kernel.py              # 16M entries, base + 2 inputs + output

Prints, per kernel: wall and CPU time (process, all threads) per entry, single-thread (one
part) and threaded (run_sums as run --report calls it: parts on the inspect pool), and the
report's two loops side by side on one thread (float64 sums, and the bfloat16 loop's float32
partial sums, report_kernels.py) and the float64 loop compiled without reassociation, as the
merge's own generated kernels are (their bits are torch's): what the same sums would cost inside
the merge's loop. Best of --repeat. On a shared machine CPU time is the steadier measure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def best(fn, repeat: int) -> tuple[float, float]:  # noqa: ANN001
    fn()  # compile / warm
    runs = []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - t0, time.process_time() - c0))
    return min(runs)


def main() -> None:
    import numpy as np
    import torch

    from mergelang.tools import inspect_stats as st
    from mergelang.tools.inspect_kernels import fused_stats
    from mergelang.tools.inspect_select import bracket_stats
    from mergelang.tools.merge_report import run_sums
    from mergelang.tools.report_kernels import merge_fused, merge_fused_bf16

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=1 << 24)
    ap.add_argument("--inputs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = args.entries
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    xs = [(base.float() + 0.01 * torch.randn(n, generator=g)).to(torch.bfloat16) for _ in range(args.inputs)]
    out = torch.stack([x.float() for x in xs]).mean(0).to(torch.bfloat16)
    b = st.flat(base, torch.bfloat16)
    arrs = [st.flat(x, torch.bfloat16) for x in xs]
    ob = st.flat(out, torch.bfloat16)
    saved = st.workers
    for label, w in (("1 thread", 1), (f"{saved()} threads", saved())):
        st.workers = lambda w=w: w  # noqa: E731  (run_sums / fused_stats split by workers())
        wall, cpu = best(lambda: run_sums(base, xs, out), args.repeat)
        print(f"run_sums      {label:10s} {n} entries x {args.inputs} inputs: "
              f"{1e9 * wall / n:6.2f} ns/entry wall, {1e9 * cpu / n:6.2f} ns/entry CPU")
    for fn in (fused_stats, bracket_stats):
        for label, w in (("1 thread", 1), (f"{saved()} threads", saved())):
            def inspect(w: int = w, fn=fn) -> None:  # noqa: ANN001
                fn(b, arrs, st.FRACTIONS, True, w, lambda f, a: list(st.pool().map(lambda x: f(*x), a)))
            wall, cpu = best(inspect, args.repeat)
            print(f"{fn.__name__:14s}{label:10s} {n} entries x {args.inputs} models: "
                  f"{1e9 * wall / n:6.2f} ns/entry wall, {1e9 * cpu / n:6.2f} ns/entry CPU")
    st.workers = saved
    acc = np.zeros((args.inputs, 10))
    # the float64 loop compiled as the merge's generated kernels are (no reassociation: their
    # results are torch's bits), i.e. what the same sums would cost inside the merge's own loop
    import types

    from numba import njit

    from mergelang.tools import report_kernels as rk

    scope = dict(vars(rk))
    for name in ("_merge_chunk", "_merge_pair", "merge_fused"):
        fn = getattr(rk, name).py_func
        scope[name] = njit(nogil=True, boundscheck=False, error_model="numpy")(
            types.FunctionType(fn.__code__, scope, name))
    exact = scope["merge_fused"]
    for label, kernel in (("float64", merge_fused), ("bf16/f32", merge_fused_bf16), ("no-reassoc", exact)):
        wall, cpu = best(lambda k=kernel: k(b, tuple(arrs), ob, 0, n, acc), args.repeat)
        print(f"report loop  {label:10s} {n} entries x {args.inputs} inputs, 1 thread: "
              f"{1e9 * wall / n:6.2f} ns/entry wall, {1e9 * cpu / n:6.2f} ns/entry CPU")


if __name__ == "__main__":
    main()
