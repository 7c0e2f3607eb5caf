"""WIDEN against a plain per-model reference written from the paper's procedure (column
magnitudes and directions, within-model ranks / n, softmax over models with above-average
calibration; 1-D tensors scored by |tau|; embeddings transposed)."""

from __future__ import annotations

import pytest
import torch

import mergelang as ml


def ref_scores(sig: torch.Tensor, ratio: float, calib: float) -> torch.Tensor:
    scores = torch.softmax(sig, dim=0)
    avg = sig.mean(dim=1, keepdim=True)
    return torch.where(sig > avg * ratio, torch.tensor(calib), scores)


def ref_rank(diff: torch.Tensor) -> torch.Tensor:
    n = diff.shape[1]
    out = torch.zeros_like(diff)
    for i in range(diff.shape[0]):
        order = sorted(range(n), key=lambda j: (float(diff[i, j]), j))  # stable ascending
        for r, j in enumerate(order):
            out[i, j] = r / n
    return out


def ref_widen(base, models, ratio=1.0, calib=1.0, embedding=False):
    taus = torch.stack([m - base for m in models])
    if base.dim() == 1:
        w = ref_scores(taus.abs(), ratio, calib)
        return base + (taus * w).sum(0)
    t = (lambda x: x.T) if embedding else (lambda x: x)
    b = t(base)
    mags, dirs = [], []
    for m in models:
        mm = t(m)
        mag = mm.norm(dim=0)
        mags.append(mag)
        dirs.append(mm / mag)
    mag0 = b.norm(dim=0)
    dir0 = b / mag0
    dm = torch.stack([(mg - mag0).abs() for mg in mags])
    dd = torch.stack([1 - torch.cosine_similarity(d, dir0, dim=0) for d in dirs])
    w = 0.5 * (ref_scores(ref_rank(dm), ratio, calib) + ref_scores(ref_rank(dd), ratio, calib))
    merged = t(b + (torch.stack([t(x) for x in taus]) * w.unsqueeze(1)).sum(0))
    return merged


SHAPES = {"w": (12, 7), "n": (7,), "e": (9, 5)}


def sd(seed, base=None):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g) if base is None else base[k] + 0.3 * torch.randn(s, generator=g))
            for k, s in SHAPES.items()}


@pytest.mark.parametrize("ratio,calib", [(1.0, 1.0), (0.5, 0.8), (1.5, 2.0)])
def test_widen_matches_reference(ratio, calib):
    base = sd(0)
    a, b, c = sd(1, base), sd(2, base), sd(3, base)
    expr = f"widen(base, [a, b, c], above_average_value_ratio = {ratio}, score_calibration_value = {calib})"
    out = ml.merge(expr, base=base, a=a, b=b, c=c)
    for k in ("w", "n"):
        want = ref_widen(base[k], [a[k], b[k], c[k]], ratio, calib)
        torch.testing.assert_close(out[k], want, rtol=1e-5, atol=1e-6)


def test_widen_embedding_rows():
    base = sd(0)
    a, b = sd(1, base), sd(2, base)
    r = ml.compile('model base = "x"\nmodel a = "y"\nmodel b = "z"\nmerge from base {\n'
                   '  "e" => widen(base, [a, b], embedding = true)\n  "*" => widen(base, [a, b])\n}',
                   base=base, a=a, b=b)
    out = r.evaluate()
    r.close()
    torch.testing.assert_close(out["e"], ref_widen(base["e"], [a["e"], b["e"]], embedding=True),
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out["e"], ref_widen(base["e"], [a["e"], b["e"]]))  # the axis matters


def test_widen_ties_in_rank_by_index():
    base = {"w": torch.full((4, 6), 0.5)}
    a = {"w": base["w"] + 1}  # every column changes alike: ranks by index only
    b = {"w": base["w"] * 3}
    out = ml.merge("widen(base, [a, b])", base=base, a=a, b=b)
    want = ref_widen(base["w"], [a["w"], b["w"]])
    assert not torch.isnan(want).any()
    torch.testing.assert_close(out["w"], want, rtol=1e-6, atol=1e-6)
