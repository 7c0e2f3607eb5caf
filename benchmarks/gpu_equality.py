#!/usr/bin/env python3
"""CUDA against CPU, method by method, on small random models held in memory: for each stdlib
method, the largest absolute difference between `evaluate("cuda")` and `evaluate("cpu")` and
whether the outputs are bit-identical. Exact methods (linear, task arithmetic, selections, sign
election, DARE's counter-based randomness) should be identical; SVD- and acos-based ones within a
float tolerance. Prints one line per method; exit 1 if an exact method differs or any fails.

    PYTHONPATH=. python3 benchmarks/gpu_equality.py
"""

from __future__ import annotations

import sys
import traceback

import torch

import mergelang as ml

#: (expression, exact): exact methods must be bit-identical on CUDA and CPU
CASES = [
    ("linear([a, b, c])", True),
    ("task_arithmetic(base, [a, b, c], lambda = 0.7)", True),
    ("ties(base, [a, b, c], density = 0.3)", True),
    ("dare_ties(base, [a, b, c], density = 0.5, seed = 3)", True),
    ("dare_linear(base, [a, b, c], density = 0.5, seed = 3)", True),
    ("breadcrumbs(base, [a, b, c], density = 0.6, gamma = 0.05)", True),
    ("della(base, [a, b, c], density = 0.5, epsilon = 0.1)", True),
    ("magmax(base, [a, b, c])", True),
    ("consensus(base, [a, b, c])", True),
    ("sce(base, [a, b, c])", False),
    ("slerp(a, b, t = 0.3)", False),
    ("model_stock(base, [a, b, c])", False),
    ("tsv_merge(base, [a, b, c])", False),
    ("iso_c(base, [a, b, c])", False),
    ("wudi(base, [a, b, c])", False),
    ("karcher([a, b, c])", False),
    ("karcher([a, b, c], max_iter = 1200, tol = 1e-10)", False),
    ("ram(base, [a, b, c])", True),
    ("ramplus_tl(base, [a, b, c])", True),
    ("arcee_fusion(base, [a])", False),
]


def models(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"layers.0.q.weight": (256, 256), "layers.0.mlp.weight": (512, 256),
              "layers.1.q.weight": (256, 256), "norm.weight": (256,), "embed.weight": (1000, 256)}
    base = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    out = {"base": base}
    for name in "abc":
        out[name] = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
                     for k, v in base.items()}
    return out


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"  # "cpu" tries the script itself
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to compare")
        return 0
    sds = models()
    bad = 0
    print(f"{'method':<58} {'max |cuda - cpu|':>18} {'identical':>10}")
    for expr, exact in CASES:
        try:
            cpu = ml.merge(expr, **sds)
            names = list(sds)
            lines = [f'model {n} = "<memory>"' for n in names]
            src = "\n".join(lines) + f'\nmerge from base {{\n    "*" => {expr}\n}}\n'
            gpu = ml.compile(src, **sds).evaluate(device)
            diff = max(float((gpu[k].float().cpu() - cpu[k].float()).abs().max()) for k in cpu)
            same = all(torch.equal(gpu[k].cpu(), cpu[k]) for k in cpu)
            flag = "" if same or not exact else "  <-- expected identical"
            bad += int(exact and not same)
            print(f"{expr:<58} {diff:>18.3g} {str(same):>10}{flag}")
        except Exception:  # noqa: BLE001 - report and go on
            bad += 1
            print(f"{expr:<58} FAILED\n{traceback.format_exc()}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
