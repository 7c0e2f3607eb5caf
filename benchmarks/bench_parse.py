#!/usr/bin/env python3
"""Checking time against recipe size: `mergelang check` (a whole process) of recipes with N
`param` declarations, and the time per declaration at each size. Linear checking keeps the
per-declaration time flat; the quadratic scope copy fixed in the hardening issue made 25k params
take 32 s (5.8 s at 13k).

    PYTHONPATH=. python benchmarks/bench_parse.py            # N = 2k, 4k, 8k, 16k, 32k
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,4000,8000,16000,32000")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "base").mkdir()
        save_file({"w": torch.zeros(2)}, str(root / "base" / "model.safetensors"))
        rows = []
        for n in (int(x) for x in args.sizes.split(",")):
            text = 'model base = "base"\n' + "".join(f"param p{i} = {i} * 2 + 1\n" for i in range(n))
            (root / "r.mrg").write_text(text + 'merge from base { "*" => base }\n')
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "mergelang", "check", "r.mrg"], cwd=root,
                                  env=env, capture_output=True, text=True)
            secs = time.perf_counter() - t
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            rows.append((n, secs, len(text)))
        print(f"{'params':>8} {'bytes':>10} {'check s':>9} {'us/param':>9}")
        for n, secs, size in rows:
            print(f"{n:>8} {size:>10} {secs:>9.2f} {secs / n * 1e6:>9.1f}")
        (n0, s0, _), (n1, s1, _) = rows[0], rows[-1]
        print(f"time ratio {s1 / s0:.1f}x for {n1 / n0:.0f}x the declarations "
              f"(linear: ~{n1 / n0:.0f}x, less the fixed start-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
