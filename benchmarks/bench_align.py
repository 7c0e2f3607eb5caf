#!/usr/bin/env python3
"""Alignment time for a Llama-shaped pair (random weights, no disk).

    PYTHONPATH=. python benchmarks/bench_align.py --preset 1b [--device cuda]
    PYTHONPATH=. python benchmarks/bench_align.py --preset small      # what fits a busy laptop

Model `a` has random weights; `b` is `a` with every group of the built-in spec randomly permuted
plus gaussian noise (`--noise`, relative to each tensor's std), so there is a right answer.
Reports the weight-matching time (cost matmuls + linear assignments, all sweeps), the number of
sweeps, whether the permutations were recovered, and the matmul work per sweep (so a size that
was not run can be estimated: time ~ GFLOP/sweep x sweeps / machine GFLOP/s, plus the
assignments, which are O(n^3) in the group size). `--flops-only` prints that estimate without
allocating the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mergelang.sources.align import apply_permutations, random_permutations, spec_for, weight_matching  # noqa: E402

PRESETS = {  # Llama-3.2-1B's shape, and smaller ones with the same layout (GQA 4:1)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256),
    "medium": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=4, head_dim=64, vocab_size=32000),
    "small": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64, vocab_size=8192),
}


def shapes_of(cfg: dict) -> dict[str, tuple[int, ...]]:
    D, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, KV, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    out = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(cfg["num_hidden_layers"]):
        L = f"model.layers.{i}."
        out.update({L + "self_attn.q_proj.weight": (H * d, D), L + "self_attn.k_proj.weight": (KV * d, D),
                    L + "self_attn.v_proj.weight": (KV * d, D), L + "self_attn.o_proj.weight": (D, H * d),
                    L + "mlp.gate_proj.weight": (I, D), L + "mlp.up_proj.weight": (I, D),
                    L + "mlp.down_proj.weight": (D, I), L + "input_layernorm.weight": (D,),
                    L + "post_attention_layernorm.weight": (D,)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--flops-only", action="store_true")
    ap.add_argument("--max-sweeps", type=int, default=None,
                    help="stop after this many sweeps (time per sweep at sizes where convergence takes too long)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(PRESETS[args.preset], model_type="llama")
    shapes = shapes_of(cfg)
    spec = spec_for(cfg, shapes)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    numel = {k: torch.Size(s).numel() for k, s in shapes.items()}
    gflop = sum(2 * g.size * numel[m.tensor] for g in spec.groups for m in g.members) / 1e9
    report = {"preset": args.preset, "params": params, "groups": len(spec.groups),
              "largest_group": max(g.size for g in spec.groups), "gflop_per_sweep": round(gflop, 1),
              "device": args.device, "threads": torch.get_num_threads()}
    if args.flops_only:
        print(json.dumps(report))
        return 0
    gen = torch.Generator().manual_seed(0)
    a = {k: torch.randn(s, generator=gen) / (s[-1] ** 0.5 if len(s) > 1 else 1.0) for k, s in shapes.items()}
    perms = random_permutations(spec, 1)
    b = apply_permutations(a, spec, perms)
    b = {k: v + args.noise * v.std() * torch.randn(v.shape, generator=gen) for k, v in b.items()}
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    kw = {"max_sweeps": args.max_sweeps} if args.max_sweeps else {}
    res = weight_matching(a, b, spec, seed=0, device=args.device, **kw)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    report["align_s"] = round(time.perf_counter() - t0, 2)
    report["sweeps"] = res.sweeps
    report["max_sweeps"] = args.max_sweeps
    report["converged"] = res.converged
    report["recovered_groups"] = sum(torch.equal(perms[g][res.perms[g]], torch.arange(len(perms[g])))
                                     for g in perms)
    report["s_per_sweep"] = round(report["align_s"] / res.sweeps, 2)
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
