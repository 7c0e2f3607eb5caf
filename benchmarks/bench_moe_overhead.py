#!/usr/bin/env python3
"""Per-tensor overhead on MoE-sized checkpoints (issue 21, item 2), whole processes:

1. `mergelang check` of a DeepSeek-V3-shaped pair (61 layers, 256 routed experts from layer 3,
   ~90k tensors per model) made of header-only sparse safetensors files (no tensor bytes are
   written: the files are truncated to their full size, so nothing is read but the headers);
2. compile time against the tensor count (the same layout cut to 8, 16, 32, 61 layers): the
   slope per 1000 tensors;
3. a run of 20k tiny tensors (one float each), linear of two models.

    python benchmarks/bench_moe_overhead.py --dir /tmp/mlmoe
Targets (issue 21): check of the pair under 10 s, the 20k-tensor run under 10 s.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
H, I_DENSE, I_MOE, EXPERTS, DENSE_LAYERS = 7168, 18432, 2048, 256, 3


def v3_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (129280, H), "model.norm.weight": (H,),
                                     "lm_head.weight": (129280, H)}
    for i in range(layers):
        p = f"model.layers.{i}."
        s.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                  p + "self_attn.q_a_proj.weight": (1536, H), p + "self_attn.q_a_layernorm.weight": (1536,),
                  p + "self_attn.q_b_proj.weight": (24576, 1536),
                  p + "self_attn.kv_a_proj_with_mqa.weight": (576, H),
                  p + "self_attn.kv_a_layernorm.weight": (512,), p + "self_attn.kv_b_proj.weight": (32768, 512),
                  p + "self_attn.o_proj.weight": (H, 16384)})
        if i < DENSE_LAYERS:
            mlps = [("mlp.", I_DENSE)]
        else:
            mlps = [(f"mlp.experts.{e}.", I_MOE) for e in range(EXPERTS)] + [("mlp.shared_experts.", I_MOE)]
            s.update({p + "mlp.gate.weight": (EXPERTS, H), p + "mlp.gate.e_score_correction_bias": (EXPERTS,)})
        for m, inter in mlps:
            s.update({p + m + "gate_proj.weight": (inter, H), p + m + "up_proj.weight": (inter, H),
                      p + m + "down_proj.weight": (H, inter)})
    return s


def with_scales(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """DeepSeek-V3's FP8 layout: a `weight_scale_inv` (one float per 128 x 128 block) beside
    every 2-D linear weight (stored as float8_e4m3fn) — what makes it ~90k tensors per model."""
    out = dict(shapes)
    for name, shape in shapes.items():
        if len(shape) == 2 and "embed" not in name and "lm_head" not in name and ".gate.weight" not in name:
            out[name[: -len("weight")] + "weight_scale_inv"] = (-(-shape[0] // 128), -(-shape[1] // 128))
    return out


def sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A valid safetensors file whose data region is a hole (sparse): header only on disk."""
    header, off = {}, 0
    for name, shape in shapes.items():
        dtype = "F32" if name.endswith("_scale_inv") else \
            "F8_E4M3" if name + "_scale_inv" in shapes else "BF16"
        n = {"BF16": 2, "F32": 4, "F8_E4M3": 1}[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + off)


def timed(argv: list[str]) -> float:
    import os

    # as installed: bytecode cached (a process that may not write .pyc recompiles ~1 s of modules)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    t = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/mlmoe")
    args = ap.parse_args()
    root = Path(args.dir)
    cli = [sys.executable, "-m", "mergelang"]
    print("== compile time against the tensor count (mergelang check, whole process)")
    points = []
    for layers in (8, 16, 32, 61):
        d = root / f"v3_{layers}"
        shapes = with_scales(v3_shapes(layers))
        for m in ("a", "b"):
            if not (d / m / "config.json").exists() or "n_routed" not in (d / m / "config.json").read_text():
                sparse_safetensors(d / m / "model.safetensors", shapes)
                (d / m / "config.json").write_text(json.dumps(  # DeepSeek-V3's block-scaled FP8
                    {"model_type": "deepseek_v3", "num_hidden_layers": layers, "n_routed_experts": EXPERTS,
                     "first_k_dense_replace": DENSE_LAYERS, "quantization_config": {
                        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}))
        recipe = d / "r.mrg"
        recipe.write_text(f'model a = "{d}/a"\nmodel b = "{d}/b"\nmerge from a {{\n'
                          '    "model.layers.{i}.mlp.experts.{e}.*" => b\n    "*" => linear([a, b])\n}\n')
        secs = timed([*cli, "check", str(recipe)])
        points.append((len(shapes), secs))
        print(f"{layers:3d} layers, {len(shapes):6d} tensors per model: check {secs:6.2f} s")
    (n0, t0), (n1, t1) = points[0], points[-1]
    print(f"slope: {(t1 - t0) / (n1 - n0) * 1000:.3f} s per 1000 tensors "
          f"(target for the 90k pair: under 10 s; measured {t1:.2f} s)")
    print("== a run of 20k tiny tensors (linear of two models, float32, one value each)")
    d = root / "tiny20k"
    if not (d / "b" / "model.safetensors").exists():
        import torch
        from safetensors.torch import save_file

        for k, m in enumerate(("a", "b")):
            (d / m).mkdir(parents=True, exist_ok=True)
            save_file({f"model.layers.{i // 100}.w{i % 100}": torch.full((1,), float(k + i)) for i in range(20000)},
                      str(d / m / "model.safetensors"))
    (d / "r.mrg").write_text(f'model a = "{d}/a"\nmodel b = "{d}/b"\nmerge from a {{ "*" => linear([a, b]) }}\n')
    secs = timed([*cli, "run", str(d / "r.mrg"), "-o", str(d / "out"), "--force", "-q", "--no-fsync"])
    print(f"20000 tensors: run {secs:.2f} s (target: under 10 s)")


if __name__ == "__main__":
    main()
