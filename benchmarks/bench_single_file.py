"""The cost of `run -o FILE.safetensors` against `run -o FOLDER` (io/singlefile.py: the same merge
into a private folder, then one more copy of the output bytes into one file), measured side by
side in one process, alternating, on synthetic models built in a temporary folder.

    python benchmarks/bench_single_file.py [--mb 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import mergelang as ml


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=64, help="size of each input model, MB (float32)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-single-"))
    rows = args.mb * (1 << 20) // 4 // 1024 // 8
    for seed, name in enumerate(("base", "a", "b")):
        g = torch.Generator().manual_seed(seed)
        (root / name).mkdir()
        save_file({f"layers.{i}.w": torch.randn(rows, 1024, generator=g) for i in range(8)},
                  str(root / name / "model.safetensors"))
    (root / "r.mrg").write_text('model base = "base"\nmodel a = "a"\nmodel b = "b"\n'
                                'merge from base { "*" => linear([a, b], weights = [0.5, 0.5]) }\n')
    times: dict[str, list[float]] = {"folder": [], "file": []}
    for k in range(args.repeat + 1):
        for kind, out in (("folder", root / f"out{k}"), ("file", root / f"out{k}.safetensors")):
            r = ml.compile(root / "r.mrg")
            t0 = time.perf_counter()
            r.run(out, model_card=False)
            dt = time.perf_counter() - t0
            r.close()
            if k:  # the first round warms caches and the loops
                times[kind].append(dt)
    best = {k: min(v) for k, v in times.items()}
    print(f"machine: {platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} threads)")
    print(f"inputs: 3 x {args.mb} MB float32, output {args.mb} MB; best of {args.repeat}")
    print(f"folder {best['folder']:.2f} s, single file {best['file']:.2f} s, "
          f"ratio {best['file'] / best['folder']:.2f}x, overhead {best['file'] - best['folder']:.2f} s")


if __name__ == "__main__":
    main()
