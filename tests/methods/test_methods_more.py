"""Parity of breadcrumbs, breadcrumbs_ties, magmax, model_stock and nearswap with the plain-torch
references in reference_more.py, with edge cases (magnitude ties, tensors smaller than 1/gamma,
1-D tensors, zero and colinear task vectors, negative weights)."""

from __future__ import annotations

import pytest
import torch

import mergelang as ml
import reference_more as ref

SHAPES = {"w": (8, 16), "b": (32,), "s": (1,), "c": (4, 4, 2), "tiny": (7,)}


def sd(seed, shapes=SHAPES, quantize=False):
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    if quantize:  # many exact ties in magnitude
        out = {k: torch.round(v * 2) / 2 for k, v in out.items()}
    return out


def close(out, want, rtol=1e-6, atol=1e-6):
    assert set(out) == set(want)
    for k in want:
        torch.testing.assert_close(out[k], want[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


# ---- breadcrumbs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.3, 0.1), (0.9, 0.2), (0.95, 0.1),
                                           (1.0, 0.1), (0.0, 0.1)])
@pytest.mark.parametrize("quantize", [False, True])
def test_breadcrumbs(method, consensus, density, gamma, quantize):
    base, a, b = sd(0), sd(1, quantize=quantize), sd(2, quantize=quantize)
    if quantize:
        base = {k: torch.zeros_like(v) for k, v in base.items()}
    out = ml.merge(f"{method}(base, [a, b], weights = [1, -0.5], density = {density}, "
                   f"gamma = {gamma}, lambda = 0.8)", base=base, a=a, b=b)
    want = {}
    for k in base:
        taus = ref.task_vectors(base[k], [a[k], b[k]])
        taus = [torch.where(ref.band_keep(t, density, gamma), t, 0.0) for t in taus]
        want[k] = ref.gta_mix(base[k], taus, [1, -0.5], consensus, False, 0.8)
    close(out, want)


def test_breadcrumbs_small_gamma_drops_no_top_entries():
    # n = 7, gamma = 0.01: int(gamma n) = 0, so the band is the top int(density n) entries
    base = {"x": torch.zeros(7)}
    a = {"x": torch.tensor([7.0, -6.0, 5.0, -4.0, 3.0, -2.0, 1.0])}
    out = ml.merge("breadcrumbs(base, [a], density = 0.5)", base=base, a=a)
    assert torch.equal(out["x"], torch.tensor([7.0, -6.0, 5.0, 0.0, 0.0, 0.0, 0.0]))
    # gamma = 0.2: int(1.4) = 1 top entry dropped, then 3 kept
    out = ml.merge("breadcrumbs(base, [a], density = 0.5, gamma = 0.2)", base=base, a=a)
    assert torch.equal(out["x"], torch.tensor([0.0, -6.0, 5.0, -4.0, 0.0, 0.0, 0.0]))
    # the band runs past the end: fewer top entries are dropped, still int(density n) kept
    out = ml.merge("breadcrumbs(base, [a], density = 0.9, gamma = 0.3)", base=base, a=a)
    assert torch.equal(out["x"], torch.tensor([0.0, -6.0, 5.0, -4.0, 3.0, -2.0, 1.0]))


def test_breadcrumbs_ties_in_magnitude_lowest_index_first():
    base = {"x": torch.zeros(6)}
    a = {"x": torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0])}
    out = ml.merge("breadcrumbs(base, [a], density = 0.5, gamma = 0.2)", base=base, a=a)
    assert torch.equal(out["x"], torch.tensor([0.0, -1.0, 1.0, 1.0, 0.0, 0.0]))


def test_breadcrumbs_per_model_density():
    base, a, b = sd(0), sd(1), sd(2)
    out = ml.merge("breadcrumbs(base, [a, b], density = [0.4, 0.8], gamma = 0.1)",
                   base=base, a=a, b=b)
    want = {}
    for k in base:
        taus = ref.task_vectors(base[k], [a[k], b[k]])
        taus = [torch.where(ref.band_keep(t, d, 0.1), t, 0.0) for t, d in zip(taus, (0.4, 0.8))]
        want[k] = ref.gta_mix(base[k], taus, [1, 1], False, False, 1.0)
    close(out, want)


# ---- magmax --------------------------------------------------------------------------------------

@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_magmax(lam):
    base, a, b, c = sd(0), sd(1), sd(2), sd(3)
    out = ml.merge(f"magmax(base, [a, b, c], lambda = {lam})", base=base, a=a, b=b, c=c)
    close(out, {k: ref.magmax(base[k], [a[k], b[k], c[k]], lam) for k in base})


def test_magmax_ties_later_model_wins():
    base = {"x": torch.zeros(4)}
    a = {"x": torch.tensor([2.0, -3.0, 1.0, 0.0])}
    b = {"x": torch.tensor([-2.0, 3.0, -0.5, 0.0])}
    out = ml.merge("magmax(base, [a, b])", base=base, a=a, b=b)
    assert torch.equal(out["x"], torch.tensor([-2.0, 3.0, 1.0, 0.0]))
    close(out, {"x": ref.magmax(base["x"], [a["x"], b["x"]])})


# ---- model_stock ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(n, filter_wise):
    shapes = {k: v for k, v in SHAPES.items() if k != "s"}  # see the one-entry test below
    base = sd(0, shapes)
    models = [sd(1 + i, shapes) for i in range(n)]
    names = [f"m{i}" for i in range(n)]
    out = ml.merge(f"model_stock(base, [{', '.join(names)}], filter_wise = "
                   f"{str(filter_wise).lower()})", base=base, **dict(zip(names, models)))
    want = {k: ref.model_stock(base[k], [m[k] for m in models], filter_wise) for k in base}
    # rows of 2 entries give t = N c / (1 + (N - 1) c) with a denominator near 0 for some rows:
    # float32 vs float64 conditioning, hence the looser tolerance there
    tol = 2e-4 if filter_wise else 1e-5
    close(out, want, rtol=tol, atol=tol)


def test_model_stock_edge_cases():
    g = torch.Generator().manual_seed(4)
    base = {"x": torch.randn(6, 5, generator=g), "y": torch.randn(9, generator=g)}
    tau = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    colinear = ({k: base[k] + tau[k] for k in base}, {k: base[k] + 2 * tau[k] for k in base})
    zero = ({k: base[k].clone() for k in base}, {k: base[k] + tau[k] for k in base})
    for a, b in (colinear, zero):
        for fw in ("false", "true"):
            out = ml.merge(f"model_stock(base, [a, b], filter_wise = {fw})", base=base, a=a, b=b)
            close(out, {k: ref.model_stock(base[k], [a[k], b[k]], fw == "true") for k in base},
                  rtol=1e-5, atol=1e-5)
    # colinear task vectors: cos = 1, t = 1, the plain average
    out = ml.merge("model_stock(base, [a, b])", base=base, a=colinear[0], b=colinear[1])
    close(out, {k: (colinear[0][k] + colinear[1][k]) / 2 for k in base}, rtol=1e-5, atol=1e-5)


def test_model_stock_opposite_one_entry_task_vectors_is_an_error():
    base, a, b = {"s": torch.tensor([0.0])}, {"s": torch.tensor([1.0])}, {"s": torch.tensor([-2.0])}
    with pytest.raises(ml.MergelangError) as info:
        ml.merge("model_stock(base, [a, b])", base=base, a=a, b=b)
    assert "E501" in info.value.codes


def test_model_stock_needs_two_models():
    base, a = sd(0), sd(1)
    with pytest.raises(ml.MergelangError) as info:
        ml.merge("model_stock(base, [a])", base=base, a=a)
    assert "E203" in info.value.codes


# ---- nearswap ------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.0, 0.001, 0.1, 0.5, 3.0])
def test_nearswap(t):
    base, other = sd(0), sd(1)
    other["w"][0, :4] = base["w"][0, :4]            # equal entries: w = 1 (any t > 0)
    other["w"][1, :4] = base["w"][1, :4] + 1e-8     # nearly equal
    out = ml.merge(f"nearswap(base, other, t = {t})", base=base, other=other)
    close(out, {k: ref.nearswap(base[k], other[k], t) for k in base})


# ---- ties: PEFT's majority_sign_method ----------------------------------------------------------

@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("weights,density", [([1.0, 1.0, 1.0], 1.0), ([2.0, -1.0, 0.5], 0.5),
                                             ([0.3, 0.3, 0.4], 0.2)])
def test_ties_peft_majority_sign(method, weights, density):
    base, a, b, c = sd(0), sd(1, quantize=True), sd(2), sd(3, quantize=True)
    w = ", ".join(map(str, weights))
    out = ml.merge(f'ties(base, [a, b, c], weights = [{w}], density = {density}, lambda = 0.9, '
                   f'majority_sign_method = "{method}")', base=base, a=a, b=b, c=c)
    close(out, {k: ref.peft_ties(base[k], [a[k], b[k], c[k]], weights, density, method, 0.9)
                for k in base})


def test_ties_frequency_and_total_differ():
    base = {"x": torch.zeros(1)}
    a, b, c = {"x": torch.tensor([5.0])}, {"x": torch.tensor([-1.0])}, {"x": torch.tensor([-1.0])}
    total = ml.merge('ties(base, [a, b, c], majority_sign_method = "total")', base=base, a=a, b=b, c=c)
    freq = ml.merge('ties(base, [a, b, c], majority_sign_method = "frequency")', base=base, a=a, b=b,
                    c=c)
    assert torch.equal(total["x"], torch.tensor([5.0]))
    assert torch.equal(freq["x"], torch.tensor([-1.0]))
    with pytest.raises(ml.MergelangError) as info:
        ml.merge('ties(base, [a, b], majority_sign_method = "count")', base=base, a=a, b=b)
    assert "E203" in info.value.codes


# ---- lines ---------------------------------------------------------------------------------------

def test_lines_scales_by_layer_index():
    names = {"model.embed_tokens.weight": (4, 3), "model.layers.0.mlp.weight": (3, 3),
             "model.layers.3.mlp.weight": (3, 3), "model.layers.12.self_attn.q.weight": (3,),
             "lm_head.weight": (4, 3)}
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in names.items()}
    a = {k: torch.randn(s, generator=g) for k, s in names.items()}
    out = ml.merge("base + lines(a - base, alpha = 0.3, beta = 0.6, num_layers = 13)", base=base, a=a)
    for k in names:
        layer = next((int(p) for p in k.split(".") if p.isdigit()), None)
        scale = 0.3 if layer is None else 0.3 + 0.6 * layer / 12
        want = (base[k].double() + scale * (a[k].double() - base[k].double())).float()
        torch.testing.assert_close(out[k], want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_lines_explicit_layer_from_a_capture():
    base = {"blocks.x.w": torch.zeros(3)}
    a = {"blocks.x.w": torch.ones(3)}
    out = ml.merge("lines(a - base, alpha = 0.0, beta = 1.0, num_layers = 5, layer = 2)", base=base, a=a)
    assert torch.equal(out["blocks.x.w"], torch.full((3,), 0.5))
