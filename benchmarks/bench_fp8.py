#!/usr/bin/env python3
"""Merging block-scaled FP8 checkpoints (issue 21, item 1), whole `mergelang run` processes,
side by side in one run:

- fused: the CPU loops read each FP8 weight as stored (1 byte per element) with its block
  scales and decode in the loop (`fp8:` inputs of numba_codegen);
- unfused (`MERGELANG_FUSE=0`): the source dequantizes each weight to float32 (torch), then
  torch's kernels run op by op;

for a linear merge and a TIES merge of two DeepSeek-shaped FP8 models (DeepSeek-V3 expert and
attention shapes), written back as block-scaled FP8 (the default) and as bfloat16 (--dtype).

    python benchmarks/bench_fp8.py --dir /tmp/mlfp8 [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"mlp.gate_proj.weight": (2048, 7168), "mlp.up_proj.weight": (2048, 7168),
          "mlp.down_proj.weight": (7168, 2048), "self_attn.o_proj.weight": (7168, 4096)}


def write_model(folder: Path, seed: int, layers: int) -> None:
    g = torch.Generator().manual_seed(seed)
    sd = {"model.norm.weight": torch.ones(7168, dtype=torch.bfloat16)}
    for i in range(layers):
        for k, (r, c) in SHAPES.items():
            w = torch.randn(r, c, generator=g) * 0.02
            blocks = w.reshape(r // 128, 128, c // 128, 128).abs().amax(dim=(1, 3)) / 448.0
            s = blocks.repeat_interleave(128, 0).repeat_interleave(128, 1)
            sd[f"model.layers.{i}.{k}"] = (w / s).clamp(-448, 448).to(torch.float8_e4m3fn)
            sd[f"model.layers.{i}.{k}_scale_inv"] = blocks
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "deepseek_v3", "torch_dtype": "bfloat16", "num_hidden_layers": layers,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}))


def run(recipe: Path, out: Path, fuse: bool, dtype: str | None, device: str = "cpu") -> float:
    env = {**os.environ, "MERGELANG_FUSE": "1" if fuse else "0"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    cmd = [sys.executable, "-m", "mergelang", "run", str(recipe), "-o", str(out), "-q", "--no-fsync", "--force",
           "--device", device] + (["--dtype", dtype] if dtype else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mlfp8"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cuda: codes copied and dequantized on the GPU "
                    "(BLOCK_DEQUANT) against MERGELANG_FUSE=0, which on a GPU is the same plan")
    args = ap.parse_args()
    a, b = args.dir / "a", args.dir / "b"
    if not (b / "config.json").is_file():
        if a.exists() or b.exists():
            sys.exit(f"{a} or {b} exists but is not this benchmark's pair: choose another --dir")
        write_model(a, 0, args.layers)
        write_model(b, 1, args.layers)
    size = (a / "model.safetensors").stat().st_size
    print(f"two FP8 models of {size / 1e6:.0f} MB ({args.layers} layers of DeepSeek-V3 shapes)")
    rules = {"linear": "linear([a, b], weights = [0.6, 0.4])", "ties": "ties(a, [b], density = 0.3)"}
    for name, rule in rules.items():
        recipe = args.dir / f"{name}.mrg"
        recipe.write_text(f'model a = "{a}"\nmodel b = "{b}"\nmerge from a {{ "*" => {rule} }}\n')
        for dtype in (None, "bfloat16"):
            run(recipe, args.dir / "out", True, dtype, args.device)  # warm: page cache, numba cache
            best = {}
            for fuse in (True, False):
                best[fuse] = min(run(recipe, args.dir / "out", fuse, dtype, args.device)
                                 for _ in range(args.repeat))
            print(f"{name:7s} -> {dtype or 'fp8 (re-quantized)':18s} fused {best[True]:6.2f} s   "
                  f"unfused {best[False]:6.2f} s   ratio {best[True] / best[False]:.2f}x")


if __name__ == "__main__":
    main()
