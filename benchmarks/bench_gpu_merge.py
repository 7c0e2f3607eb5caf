#!/usr/bin/env python3
"""Models that fill the card (issue 33, items 4 and 6): base + 2 Llama-shaped bf16 checkpoints,
merged by whole `mergelang run` processes on one device, batched (MERGELANG_BATCH=1: batching is
opt-in on every device) and unbatched (MERGELANG_BATCH=0), and by mergekit-yaml
(--cuda on a GPU) when given, the three alternating run after run on the same inputs.

Per method: best wall time of each, peak GPU memory of the mergelang process
(torch.cuda.max_memory_allocated, via benchmarks/cuda_peak.py), the ratio to the I/O floor (a
python process that reads the 3 inputs and writes 1 output with safetensors, no fsync; mergelang
runs with --no-fsync, as mergekit never fsyncs) and to mergekit.

    PYTHONPATH=. python3 benchmarks/bench_gpu_merge.py --dir /tmp/mlg --size 3B --device cuda \
        --methods linear,ties,dare_ties,della,slerp --mergekit /tmp/mk/bin/mergekit-yaml
    PYTHONPATH=. python3 benchmarks/bench_gpu_merge.py --dir /tmp/mlg --size tiny --device cpu   # a check
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import bench_merge as bm

bm.SIZES.setdefault("3B", (3072, 8192, 28, 24, 8, 128256))  # Llama-3.2-3B: 3 x 6.4 GB in bf16
bm.SIZES.setdefault("tiny", (64, 176, 2, 4, 2, 512))

RECIPES = {**bm.RECIPES,
           "dare_ties": 'merge from base {\n    "*" => dare_ties(base, [a, b], weights = [1, 1], density = 0.5, seed = 1)\n}\n',
           "della": 'merge from base {\n    "*" => della(base, [a, b], weights = [1, 1], density = 0.5, epsilon = 0.1, seed = 1)\n}\n',
           "slerp": 'merge from base {\n    "*" => slerp(a, b, t = 0.3)\n}\n'}
_TV = """\
    merge_method: {method}
    base_model: {{root}}/base
    dtype: bfloat16
    models:
      - model: {{root}}/a
        parameters: {{{{weight: 1.0, density: 0.5{extra}}}}}
      - model: {{root}}/b
        parameters: {{{{weight: 1.0, density: 0.5{extra}}}}}
    """
MERGEKIT = {**bm.MERGEKIT,
            "dare_ties": _TV.format(method="dare_ties", extra=""),
            "della": _TV.format(method="della", extra=", epsilon: 0.1"),
            "slerp": """\
                merge_method: slerp
                base_model: {root}/a
                dtype: bfloat16
                parameters: {{t: 0.3}}
                models:
                  - model: {root}/a
                  - model: {root}/b
                """}


def mergelang_run(root: Path, method: str, device: str, batched: bool) -> tuple[float, float]:
    """(wall s, peak GPU MiB) of one `mergelang run --no-fsync` process."""
    recipe = root / f"{method}.mrg"
    recipe.write_text("".join(f'model {m} = "{root / m}"\n' for m in ("base", "a", "b")) + RECIPES[method])
    out = root / f"out-{method}"
    bm.drop_output(out)
    env = bm._env()
    env["MERGELANG_BATCH"] = "1" if batched else "0"
    with tempfile.NamedTemporaryFile("r", suffix=".peak") as peak:
        env["MERGELANG_PEAK_FILE"] = peak.name
        dt = bm.timed_child([sys.executable, str(bm.REPO / "benchmarks" / "cuda_peak.py"), "run", str(recipe),
                             "-o", str(out), "--force", "--quiet", "--no-fsync", "--device", device], env)[0]
        mib = int(open(peak.name).read() or 0) / 2**20
    bm.drop_output(out)
    return dt, mib


def mergekit_run(root: Path, method: str, device: str, exe: str) -> float:
    cfg = root / f"mergekit-{method}.yml"
    cfg.write_text(textwrap.dedent(MERGEKIT[method]).format(root=root))
    out = root / f"mk-{method}"
    bm.drop_output(out)
    argv = [exe, str(cfg), str(out), "--no-copy-tokenizer"] + (["--cuda"] if device == "cuda" else [])
    dt = bm.timed_child(argv)[0]
    bm.drop_output(out)
    return dt


def bench(root: Path, methods: list[str], device: str, repeat: int, mergekit: str | None) -> None:
    models = [str(root / m) for m in ("base", "a", "b")]
    floor_out = root / "floor-out"
    floors = []
    for _ in range(repeat + 1):  # the first warms the page cache
        floors.append(bm.timed_child([sys.executable, "-c", bm.IO_FLOOR, *models, str(floor_out)])[0])
        bm.drop_output(floor_out)
    floor = min(floors[1:])
    print(f"I/O floor: {floor:.2f} s; device {device}; {os.cpu_count()} cores")
    if device == "cpu":
        print("(on the CPU, `unbatched` is the default path: fused loops; `batched` is forced)")
    print(f"{'method':10} {'batched s':>10} {'x floor':>8} {'GPU MiB':>8} {'unbatched s':>12} {'x floor':>8} "
          f"{'GPU MiB':>8} {'mergekit s':>11} {'mk / batched':>13}")
    for method in methods:
        runs: dict[str, list] = {"b": [], "u": [], "mk": []}
        for _ in range(repeat):  # alternating: batched, unbatched, mergekit
            for key, fn in (("b", lambda: mergelang_run(root, method, device, True)),
                            ("u", lambda: mergelang_run(root, method, device, False)),
                            ("mk", lambda: mergekit_run(root, method, device, mergekit) if mergekit else None)):
                try:
                    runs[key].append(fn())
                except Exception as exc:  # one failing run must not end the table
                    print(f"  {method} {key}: failed: {str(exc)[-400:]}")
        b = min(runs["b"], default=(float("nan"), 0.0))
        u = min(runs["u"], default=(float("nan"), 0.0))
        mk = min([r for r in runs["mk"] if r is not None], default=None)
        mk_s = f"{mk:11.2f} {mk / b[0]:13.2f}" if mk else f"{'n/a':>11} {'n/a':>13}"
        print(f"{method:10} {b[0]:10.2f} {b[0] / floor:8.2f} {b[1]:8.0f} {u[0]:12.2f} {u[0] / floor:8.2f} "
              f"{u[1]:8.0f} {mk_s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--size", default="3B", choices=sorted(bm.SIZES))
    ap.add_argument("--methods", default="linear,ties,dare_ties,della,slerp")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--mergekit", default=None, metavar="EXE")
    ap.add_argument("--make-only", action="store_true", help="only write the checkpoints")
    args = ap.parse_args()
    root = args.dir.resolve() / args.size
    if not (root / "b" / "config.json").is_file():
        t = time.perf_counter()
        bm.make_model(root / "base", args.size, 0)
        bm.make_model(root / "a", args.size, 1, base=root / "base")
        bm.make_model(root / "b", args.size, 2, base=root / "base")
        print(f"made 3 {args.size} checkpoints in {time.perf_counter() - t:.0f} s")
    if args.make_only:
        return
    bench(root, args.methods.split(","), args.device, args.repeat, args.mergekit)


if __name__ == "__main__":
    main()
