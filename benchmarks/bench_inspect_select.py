"""Where inspect's one-pass bracket selection (tools/inspect_select.bracket_stats) spends its
time on one large tensor: synthetic bfloat16 data like bench_inspect.py's (base ~ N(0, 1), each
model base + 0.01·N(0, 1), stored as bfloat16), one thread.

    python benchmarks/bench_inspect_select.py                  # 2883584 entries (a 0.27B MLP), 2 models

Prints ns per entry (best of --repeat) of: the bucket method (fused_stats), bracket_stats as a
whole, its sample and sort, the planning of the cuts, and its pass without cuts, with the cuts
(counts), and with the cuts and the span listing; and the plan's shape (cuts, spans, the share
of entries the sample predicts will be listed).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def best(fn, repeat: int) -> float:
    fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return min(runs)


def main() -> None:
    import numpy as np
    import torch

    from mergelang.tools import inspect_select as sel
    from mergelang.tools.inspect_kernels import fused_stats
    from mergelang.tools.inspect_stats import FRACTIONS, flat

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=2883584)
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n, r = args.entries, args.repeat
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    xs = [(base.float() + 0.01 * torch.randn(n, generator=g)).to(torch.bfloat16) for _ in range(args.models)]
    b, arrs = flat(base, torch.bfloat16), [flat(x, torch.bfloat16) for x in xs]
    xt = tuple(arrs)

    def show(label: str, secs: float) -> None:
        print(f"{label:34s} {1e9 * secs / n:6.2f} ns/entry ({args.models} models, 1 thread)")

    show("fused_stats (buckets)", best(lambda: fused_stats(b, arrs, FRACTIONS, True), r))
    show("bracket_stats", best(lambda: sel.bracket_stats(b, arrs, FRACTIONS, True), r))
    step = sel.sample_step(n)
    smp = np.empty((len(xt), n // step))
    show("  sample", best(lambda: sel.sample_sq(b, xt, step, smp, 0, smp.shape[1]), r))
    show("  sort", best(lambda: np.sort(smp, axis=1), r))
    smp.sort(axis=1)
    ks = [min(n, max(1, math.ceil(f * n))) for f in FRACTIONS]
    show("  plan", best(lambda: [sel.plan_cuts(row, n, ks) for row in smp], r))
    plans = [sel.plan_cuts(row, n, ks) for row in smp]

    def one_pass(cuts: bool, spans: bool) -> None:
        c, wsum, sp, spb, acc, st, mxb, pairs, buf, fill = sel.tables(plans, 1, n)
        ncut = np.array([len(p.cuts) if cuts else 0 for p in plans], np.int64)
        nspan = np.array([len(p.spans) if spans else 0 for p in plans], np.int64)
        if not spans:
            sp[:] = 0
        sel.bracket_pass(b, xt, 0, n, c, ncut, wsum, sp, spb, nspan, acc[0], st[0], mxb[0], pairs[0],
                         buf[0], fill[0])

    show("  pass: loads and sums", best(lambda: one_pass(False, False), r))
    show("  pass: + cut counts", best(lambda: one_pass(True, False), r))
    show("  pass: + cut counts + span listing", best(lambda: one_pass(True, True), r))
    for j, p in enumerate(plans):
        print(f"model {j}: {len(p.cuts)} cuts ({sum(p.wsum)} with sums), {len(p.spans)} spans, "
              f"{100 * p.inside * step / n:.2f} % of the entries listed (sample's estimate)")


if __name__ == "__main__":
    main()
