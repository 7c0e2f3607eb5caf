"""The cost of `run --report` over a plain run, side by side.

    python benchmarks/bench_report.py --dir /tmp/mlinspect                  # 0.05B-shaped, quick
    python benchmarks/bench_report.py --dir /tmp/mlinspect --size 0.27B

Uses (or builds) the bf16 base + two fine-tunes of bench_inspect.py, and runs two recipes (ties
of the fine-tunes on the base, density 0.5; a linear mean) to an output folder in --dir, with
and without `report=True`, alternating, --repeat times each, in this process (compiled once per
recipe; warm page cache). Prints the best times, their ratio and the report's own measuring
time (`seconds` in mergelang_report.json), and the CPU time of the process (all threads) of
both: on a machine shared with other jobs the steadier measure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

RECIPES = {
    "ties": 'merge from base {\n    "*" => ties(base, [ft1, ft2], density = 0.5)\n}\n',
    "linear": 'merge from base {\n    "*" => linear([ft1, ft2])\n}\n',
}


def main() -> None:
    from bench_inspect import SIZES, build, llama_shapes

    import mergelang as ml

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--size", choices=sorted(SIZES), default="0.05B")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    paths = build(args.dir / args.size, llama_shapes(args.size))
    out = args.dir / "report-out"
    for name, rules in RECIPES.items():
        text = "".join(f'model {p.name} = "{p}"\n' for p in paths) + rules
        recipe = ml.compile(text)
        recipe.run(out, device="cpu", force=True)  # warm-up: kernels, page cache
        plain, rep, measured = [], [], 0.0
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            recipe.run(out, device="cpu", force=True)
            plain.append((time.perf_counter() - t0, time.process_time() - c0))
            t0, c0 = time.perf_counter(), time.process_time()
            recipe.run(out, device="cpu", force=True, report=True)
            rep.append((time.perf_counter() - t0, time.process_time() - c0))
            measured = json.loads((out / "mergelang_report.json").read_text())["seconds"]
        (p, pc), (r, rc) = min(plain), min(rep)
        print(f"{args.size} {name:7s} plain {p:7.2f} s   --report {r:7.2f} s   ratio {r / p:.3f} "
              f"(+{100 * (r / p - 1):.1f} %; measuring {measured:.2f} s)   CPU {pc:.2f} s vs "
              f"{rc:.2f} s: +{100 * (rc / pc - 1):.1f} %")
        recipe.close()


if __name__ == "__main__":
    main()
