"""The numbers behind docs/methods.md's precision notes (issue 28 items 14 and 15):

    python benchmarks/probe_precision.py

1. arcee_fusion on fine-tunes a small step from their base: the fraction of entries that the
   formula computed in float32 picks differently from the same formula in float64, and the same
   for mergelang (its KL in float64).
2. Iso-C's plain formula mean(S) U Vh on a task vector with dead units (zero rows and a zero
   column, one rank-2 fine-tune): what it writes into the dead rows in float32 and in float64,
   and how far its two precisions are apart; then mergelang's iso_c (undetermined directions
   written as 0) in both compute dtypes.
"""

from __future__ import annotations

import numpy as np
import torch

import mergelang as ml


def arcee_keep(base: torch.Tensor, model: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    b, m = base.to(dtype), model.to(dtype)
    p = torch.softmax(m, -1) + 1e-8
    q = torch.softmax(b, -1) + 1e-8
    imp = ((m - b).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)).reshape(-1).numpy()
    s = np.sort(imp)
    n = s.size
    qv = lambda f: s[int(np.floor(f * (n - 1)))]  # noqa: E731
    return imp >= qv(0.5) + 1.5 * (qv(0.75) - qv(0.25))


def arcee() -> None:
    g = torch.Generator().manual_seed(0)
    for rows, cols, step in [(64, 256, 1e-3), (128, 512, 1e-4), (256, 1024, 1e-3)]:
        base = torch.randn(rows, cols, generator=g) * 0.02
        a = base + torch.randn(rows, cols, generator=g) * step * 0.02
        out = ml.merge("arcee_fusion(base, [a])", base={"w": base}, a={"w": a})["w"]
        got = (out != base).reshape(-1).numpy()
        m64, m32 = arcee_keep(base, a, torch.float64), arcee_keep(base, a, torch.float32)
        print(f"arcee {rows}x{cols} step {step:g}: float32 formula vs float64 formula "
              f"{(m32 != m64).mean():.1%} of entries; mergelang vs float64 formula "
              f"{int((got != m64).sum())} of {got.size}")


def iso_c_dead_units() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "methods"))
    from test_methods_rank_deficient import DEAD_ROWS, _models, _run  # the tests' example

    models = _models(3, low_rank=2)
    plain = {}
    for dt in (torch.float32, torch.float64):
        tv = sum(models[k]["w"].to(dt) - models["base"]["w"].to(dt) for k in models if k != "base")
        u, s, vh = torch.linalg.svd(tv, full_matrices=False)
        plain[dt] = (s.mean() * u @ vh).double()
        print(f"plain Iso-C in {str(dt)[6:]}: up to {plain[dt][DEAD_ROWS].abs().max():.3g} written into "
              f"the dead rows (largest merged value {plain[dt].abs().max():.3g})")
    print(f"plain Iso-C, float32 vs float64: {(plain[torch.float32] - plain[torch.float64]).abs().max():.3g}")
    base = models["base"]["w"].double()
    outs = {cd: _run("iso_c(base, [MODELS])", models, cd) - base for cd in ("float32", "float64")}
    for cd, o in outs.items():
        print(f"mergelang iso_c ({cd}): dead rows {o[DEAD_ROWS].abs().max():.3g}")
    print(f"mergelang iso_c, float32 vs float64: {(outs['float32'] - outs['float64']).abs().max():.3g}")


if __name__ == "__main__":
    arcee()
    iso_c_dead_units()
