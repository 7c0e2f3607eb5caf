"""Multi-output EMR: one run with named outputs vs one single-output run per output.

    python benchmarks/bench_multiout.py --dir /tmp/emrbench

Writes base + 3 fine-tunes (8 tensors of 512x512 float32 each) to --dir, then times, with
`Recipe.run` to disk: `merge ["a", "b", "c"] from base { "*" => emr(base, [a, b, c]) }` (one
run), three named blocks `emr(base, [a, b, c])[i]` (one run) and three single-output runs of
`emr(base, [a, b, c])[i]`. Reports wall time, the bytes the plans read (statistics pass + merge
pass) and the number of model-wide statistics, and checks that all three give identical bytes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mergelang as ml  # noqa: E402

HEAD = 'model base = "base"\nmodel a = "a"\nmodel b = "b"\nmodel c = "c"\n'


def make(root: Path, n: int = 8, size: int = 512) -> None:
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.weight" for i in range(n)]
    base = {k: torch.randn(size, size, generator=g) for k in names}
    for m in ("base", "a", "b", "c"):
        (root / m).mkdir(parents=True, exist_ok=True)
        sd = base if m == "base" else {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(sd, root / m / "model.safetensors")


def run(root: Path, text: str, out: Path) -> tuple[float, int, int]:
    shutil.rmtree(out, ignore_errors=True)
    (root / "r.mrg").write_text(text)
    r = ml.compile(root / "r.mrg")
    plan = r.compilation.plan
    reads = plan.read_bytes + sum(pp.read_bytes for pp in plan.prepasses)
    t = time.perf_counter()
    r.run(out, device="cpu")
    return time.perf_counter() - t, reads, len(plan.stats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    root = args.dir
    make(root)
    multi = HEAD + 'merge ["a", "b", "c"] from base { "*" => emr(base, [a, b, c]) }\n'
    blocks = HEAD + "".join(f'merge "{n}" from base {{ "*" => emr(base, [a, b, c])[{i}] }}\n'
                            for i, n in enumerate("abc"))
    singles = [HEAD + f'merge from base {{ "*" => emr(base, [a, b, c])[{i}] }}\n' for i in range(3)]
    for _ in range(args.repeat):
        dt, reads, nst = run(root, multi, root / "out_multi")
        print(f"list form, one run:        {dt:6.2f}s  reads {reads / 2**20:6.1f} MiB  {nst} statistics")
        dt, reads, nst = run(root, blocks, root / "out_blocks")
        print(f"three named blocks:        {dt:6.2f}s  reads {reads / 2**20:6.1f} MiB  {nst} statistics")
        total = [run(root, s, root / f"out_single{i}") for i, s in enumerate(singles)]
        print(f"three single-output runs:  {sum(t[0] for t in total):6.2f}s  "
              f"reads {sum(t[1] for t in total) / 2**20:6.1f} MiB")
    for i, n in enumerate("abc"):
        x = load_file(root / "out_multi" / n / "model-00001-of-00001.safetensors")
        for other in (root / "out_blocks" / n, root / f"out_single{i}"):
            y = load_file(other / "model-00001-of-00001.safetensors")
            assert all(torch.equal(x[k], y[k]) for k in x), (n, other)
    print("all forms give identical outputs")


if __name__ == "__main__":
    main()
