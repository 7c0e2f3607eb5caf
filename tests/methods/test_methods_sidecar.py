"""fisher and regmean: statistics from sidecar checkpoints (declared like models), checked against
float64 references written here; shape errors (E210, E202) and a singular Gram sum (E501)."""

from __future__ import annotations

import pytest
import torch

import mergelang as ml


def gen(seed):
    return torch.Generator().manual_seed(seed)


def models(n, seed=0):
    g = gen(seed)
    return [{"w": torch.randn(6, 4, generator=g), "b": torch.randn(7, generator=g)} for _ in range(n)]


def fisher_ref(thetas, fishers, weights):
    num = sum(c * (f.double() + 1e-6) * t.double() for c, f, t in zip(weights, fishers, thetas))
    den = sum(c * (f.double() + 1e-6) for c, f in zip(weights, fishers))
    return (num / den).float()


def regmean_ref(ws, grams, alpha):
    gs = [alpha * g.double() + (1 - alpha) * torch.diag(torch.diag(g.double())) for g in grams]
    lhs = sum(gs)
    rhs = sum(g @ w.double().T for g, w in zip(gs, ws))
    return torch.linalg.solve(lhs, rhs).T.float()


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
def test_fisher(weights):
    ms = models(3)
    g = gen(5)
    fs = [{k: torch.rand(v.shape, generator=g) for k, v in m.items()} for m in ms]
    fs[0]["b"][:3] = 0.0  # zero Fisher entries: the 1e-6 keeps the divisor positive
    w = "" if weights is None else f", weights = [{', '.join(map(str, weights))}]"
    out = ml.merge(f"fisher([a, b, c], [fa, fb, fc]{w})", a=ms[0], b=ms[1], c=ms[2],
                   fa=fs[0], fb=fs[1], fc=fs[2])
    for k in ms[0]:
        want = fisher_ref([m[k] for m in ms], [f[k] for f in fs], weights or [1, 1, 1])
        torch.testing.assert_close(out[k], want, rtol=1e-5, atol=1e-6)


def test_fisher_wrong_sidecar_shape_is_e210():
    ms = models(2)
    fs = [{"w": torch.rand(6, 4), "b": torch.rand(7)}, {"w": torch.rand(4, 6), "b": torch.rand(7)}]
    with pytest.raises(ml.MergelangError) as info:
        ml.merge("fisher([a, b], [fa, fb])", a=ms[0], b=ms[1], fa=fs[0], fb=fs[1])
    assert "E210" in info.value.codes


def test_fisher_missing_sidecar_tensor_is_e302():
    ms = models(2)
    fs = [{"w": torch.rand(6, 4)}, {"w": torch.rand(6, 4), "b": torch.rand(7)}]
    with pytest.raises(ml.MergelangError) as info:
        ml.merge("fisher([a, b], [fa, fb])", a=ms[0], b=ms[1], fa=fs[0], fb=fs[1])
    assert "E302" in info.value.codes


def _grams(n, seed=3, dim=4):
    g = gen(seed)
    out = []
    for _ in range(n):
        x = torch.randn(30, dim, generator=g)
        out.append({"w": x.T @ x})
    return out


@pytest.mark.parametrize("alpha", [0.95, 1.0, 0.5])
@pytest.mark.parametrize("n", [2, 3])
def test_regmean(alpha, n):
    ms = models(n)
    gs = _grams(n)
    names = "abc"[:n]
    kw = {nm: m for nm, m in zip(names, ms)} | {f"g{nm}": g for nm, g in zip(names, gs)}
    out = ml.merge(f"regmean([{', '.join(names)}], [{', '.join('g' + c for c in names)}], "
                   f"alpha = {alpha})", **kw)
    torch.testing.assert_close(out["w"], regmean_ref([m["w"] for m in ms], [g["w"] for g in gs],
                                                     alpha), rtol=1e-4, atol=1e-5)
    # tensors without a Gram matrix: the mean of the models
    torch.testing.assert_close(out["b"], sum(m["b"] for m in ms) / n, rtol=1e-6, atol=1e-6)


def test_regmean_wrong_gram_shape_is_a_shape_error():
    ms = models(2)
    gs = _grams(2, dim=6)  # (6, 6) Gram for a (6, 4) weight: needs (4, 4)
    with pytest.raises(ml.MergelangError) as info:
        ml.merge("regmean([a, b], [ga, gb])", a=ms[0], b=ms[1], ga=gs[0], gb=gs[1])
    assert "E202" in info.value.codes


def test_regmean_singular_gram_sum_is_e501():
    ms = models(2)
    zero = {"w": torch.zeros(4, 4)}
    with pytest.raises(ml.MergelangError) as info:
        ml.merge("regmean([a, b], [ga, gb])", a=ms[0], b=ms[1], ga=zero, gb=zero)
    assert "E501" in info.value.codes
