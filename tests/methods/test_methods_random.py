"""Random sparsification: the counter-based stream, DARE (dare_ties, dare_linear) and DELLA.

The stream is checked on its own (Random123 known answers, kept fraction, independence of
tensors / models / seeds, bit-identical reruns); the methods are checked against the plain-torch
references in reference_more.py with the keep-masks read back from the stream, plus statistics
(kept fraction and L1 norm within 1%).
"""

from __future__ import annotations

import pytest
import torch

import mergelang as ml
import reference_more as ref
from mergelang.runtime.rng import philox4x32, random_u32


def sd(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


BIG = {"w": (500, 2000), "v": (1_000_000,)}       # 1M entries: 1% statistics are ~6 sigma
SMALL = {"w": (8, 16), "b": (32,), "s": (1,), "c": (4, 4, 2)}


@pytest.mark.parametrize("ctr,key,want", [
    ((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff,) * 4, (0xffffffff, 0xffffffff), (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
])
def test_philox_known_answers(ctr, key, want):
    # Random123's kat_vectors for philox4x32-10
    got = philox4x32([torch.tensor([c], dtype=torch.int64) for c in ctr], key)
    assert tuple(int(g) for g in got) == want


def test_random_u32_is_uniform_and_prefix_stable():
    u = random_u32(1 << 20, "k")
    assert int(u.min()) >= 0 and int(u.max()) < 2 ** 32
    hist = torch.bincount((u >> 28).to(torch.int64), minlength=16).to(torch.float64)
    expected = u.numel() / 16
    chi2 = float(((hist - expected) ** 2 / expected).sum())
    assert chi2 < 40  # 15 degrees of freedom: p < 1e-3 above ~37.7
    # element e depends only on (key, e): a shorter draw is a prefix of a longer one
    assert torch.equal(random_u32(1001, "k"), u[:1001])
    assert not torch.equal(random_u32(1001, "k2"), u[:1001])


def _mask(expr, **sds):
    out = ml.merge(f"where({expr}, 1, 0)", **sds)
    return {k: v.bool() for k, v in out.items()}


@pytest.mark.parametrize("p", [0.1, 0.3, 0.9])
def test_bernoulli_kept_fraction(p):
    a = sd(0, BIG)
    m = _mask(f"bernoulli(a, {p}, seed = 3)", a=a)
    for name, mask in m.items():
        frac = mask.double().mean().item()
        assert abs(frac - p) < 0.01 * p, (name, frac)


def test_bernoulli_keys():
    a = sd(0, {"x": (100, 100), "y": (100, 100)})
    m = _mask("bernoulli(a, 0.5, seed = 1)", a=a)
    again = _mask("bernoulli(a, 0.5, seed = 1)", a=a)
    other_seed = _mask("bernoulli(a, 0.5, seed = 2)", a=a)
    assert all(torch.equal(m[k], again[k]) for k in m)            # bit-identical reruns
    assert not torch.equal(m["x"], m["y"])                        # tensor name is in the key
    assert not torch.equal(m["x"], other_seed["x"])               # seed is in the key
    # model index is in the key: the two models of a stack get different masks
    b = sd(1, {"x": (100, 100), "y": (100, 100)})
    m0 = _mask("bernoulli([a, b], 0.5, seed = 1)[0]", a=a, b=b)
    m1 = _mask("bernoulli([a, b], 0.5, seed = 1)[1]", a=a, b=b)
    assert not torch.equal(m0["x"], m1["x"])
    # neighbouring entries are uncorrelated
    x = m["x"].double().flatten()
    corr = torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1].item()
    assert abs(corr) < 0.03


def test_bernoulli_does_not_depend_on_values_or_batching():
    # the mask depends on (seed, tensor, model index, element) only, not on the values
    a, b = sd(0, SMALL), sd(5, SMALL)
    assert all(torch.equal(x, y) for x, y in zip(_mask("bernoulli(a, 0.5)", a=a).values(),
                                                  _mask("bernoulli(a, 0.5)", a=b).values()))


def test_bernoulli_edge_probabilities():
    a = sd(0, SMALL)
    assert all(bool(v.all()) for v in _mask("bernoulli(a, 1)", a=a).values())
    assert not any(bool(v.any()) for v in _mask("bernoulli(a, 0)", a=a).values())


# ---- DARE ----------------------------------------------------------------------------------------

def _stack_masks(method_stream, n_models, density, seed, **sds):
    """Keep-masks of each model, read back from the stream the method uses."""
    names = ", ".join(f"m{i}" for i in range(n_models))
    return [_mask(f"bernoulli([{names}] - base, {density}, seed = {seed}, stream = "
                  f"\"{method_stream}\")[{i}]", **sds) for i in range(n_models)]


@pytest.mark.parametrize("method,consensus,normalize", [
    ("dare_ties", True, False), ("dare_linear", False, False), ("dare_ties", True, True)])
@pytest.mark.parametrize("weights,density", [([1.0, 1.0], 0.5), ([0.7, -0.4], 0.3),
                                              ([2.0, 1.0], [0.2, 0.9])])
def test_dare_matches_reference(method, consensus, normalize, weights, density):
    base, m0, m1 = sd(0, SMALL), sd(1, SMALL), sd(2, SMALL)
    dens = density if isinstance(density, list) else [density, density]
    w = ", ".join(map(str, weights))
    out = ml.merge(f"{method}(base, [m0, m1], weights = [{w}], density = {density}, seed = 7, "
                   f"normalize = {str(normalize).lower()}, lambda = 0.9)", base=base, m0=m0, m1=m1)
    masks = _stack_masks("dare", 2, density, 7, base=base, m0=m0, m1=m1)
    for name in base:
        taus = ref.task_vectors(base[name], [m0[name], m1[name]])
        taus = [ref.rescale(t, mk[name], d, True) for t, mk, d in zip(taus, masks, dens)]
        want = ref.gta_mix(base[name], taus, weights, consensus, normalize, 0.9)
        torch.testing.assert_close(out[name], want, rtol=1e-6, atol=1e-6)


def test_dare_l1_rescale_matches_reference():
    base, m0, m1 = sd(0, SMALL), sd(1, SMALL), sd(2, SMALL)
    out = ml.merge('dare_linear(base, [m0, m1], weights = [1, 0.5], density = 0.4, '
                   'rescale = "l1", seed = 2)', base=base, m0=m0, m1=m1)
    masks = _stack_masks("dare", 2, 0.4, 2, base=base, m0=m0, m1=m1)
    for name in base:
        taus = ref.task_vectors(base[name], [m0[name], m1[name]])
        taus = [ref.rescale(t, mk[name], 0.4, "l1") for t, mk in zip(taus, masks)]
        torch.testing.assert_close(out[name], ref.gta_mix(base[name], taus, [1, 0.5], False,
                                                          False, 1.0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rescale", ["true", '"l1"'])
@pytest.mark.parametrize("density", [0.1, 0.5])
def test_dare_statistics(rescale, density):
    base, a = sd(0, BIG), sd(1, BIG)
    out = ml.merge(f"dare_linear(base, [a], density = {density}, rescale = {rescale})",
                   base=base, a=a)
    for name in base:
        tau = a[name] - base[name]
        delta = out[name] - base[name]
        kept = (delta != 0).double().mean().item()
        assert abs(kept - density) < 0.01 * density, (name, kept)
        l1, l1_out = tau.abs().double().sum().item(), delta.abs().double().sum().item()
        assert abs(l1_out - l1) < 0.01 * l1, (name, l1_out, l1)
        moved = delta != 0   # kept entries are the task vector, rescaled by 1 / density
        if rescale == "true":
            torch.testing.assert_close(delta[moved], (tau / density)[moved], rtol=1e-5, atol=1e-5)


def test_dare_is_bit_identical_run_after_run():
    base, a, b = sd(0, SMALL), sd(1, SMALL), sd(2, SMALL)
    expr = "dare_ties(base, [a, b], density = 0.5, seed = 11)"
    one = ml.merge(expr, base=base, a=a, b=b)
    two = ml.merge(expr, base=base, a=a, b=b)
    assert all(torch.equal(one[k], two[k]) for k in one)
    other = ml.merge("dare_ties(base, [a, b], density = 0.5, seed = 12)", base=base, a=a, b=b)
    assert not torch.equal(one["w"], other["w"])


def test_dare_density_one_is_task_arithmetic():
    base, a, b = sd(0, SMALL), sd(1, SMALL), sd(2, SMALL)
    out = ml.merge("dare_linear(base, [a, b], weights = [0.3, 0.6])", base=base, a=a, b=b)
    want = ml.merge("task_arithmetic(base, [a, b], weights = [0.3, 0.6])", base=base, a=a, b=b)
    assert all(torch.equal(out[k], want[k]) for k in out)


def test_dare_bad_rescale_is_an_error():
    base, a = sd(0, SMALL), sd(1, SMALL)
    with pytest.raises(ml.MergelangError) as info:
        ml.merge('dare_linear(base, [a], density = 0.5, rescale = "l2")', base=base, a=a)
    assert "E203" in info.value.codes


# ---- DELLA ---------------------------------------------------------------------------------------

def test_della_prune_single_model_values_and_statistics():
    base, a = sd(0, BIG), sd(1, BIG)
    d, eps = 0.4, 0.1
    out = ml.merge(f"della_linear(base, [a], density = {d}, epsilon = {eps}, seed = 4)",
                   base=base, a=a)
    for name in base:
        tau = (a[name] - base[name]).double()
        delta = (out[name] - base[name]).double()
        moved = delta != 0
        kept = moved.double().mean().item()
        assert abs(kept - d) < 0.01 * d, (name, kept)
        l1, l1_out = tau.abs().sum().item(), delta.abs().sum().item()
        assert abs(l1_out - l1) < 0.01 * l1, (name, l1_out, l1)
        # larger magnitudes are kept more often: lowest-ranked half ~ d - eps/2, top half ~ d + eps/2
        mag = tau.abs().reshape(-1, tau.shape[-1]) if tau.dim() > 1 else tau.abs().reshape(1, -1)
        mv = moved.reshape(mag.shape)
        upper = mag >= mag.median(dim=-1, keepdim=True).values
        assert abs(mv[upper].double().mean().item() - (d + eps / 2)) < 0.01
        assert abs(mv[~upper].double().mean().item() - (d - eps / 2)) < 0.01


def test_della_prune_rescales_by_rank_probability():
    base, a = sd(0, SMALL), sd(1, SMALL)
    out = ml.merge("della_linear(base, [a], density = 0.5, epsilon = 0.2, seed = 1)", base=base, a=a)
    for name in base:
        tau = ref.task_vectors(base[name], [a[name]])[0]
        p = ref.della_probs(tau, 0.5, 0.2)
        delta = out[name].double() - base[name].double()
        moved = out[name] != base[name]
        torch.testing.assert_close(delta[moved], (tau / p)[moved], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,consensus,normalize", [("della", True, True),
                                                        ("della_linear", False, False)])
def test_della_matches_reference(method, consensus, normalize):
    base, m0, m1 = sd(0, SMALL), sd(1, SMALL), sd(2, SMALL)
    out = ml.merge(f"{method}(base, [m0, m1], weights = [1, 0.6], density = 0.5, epsilon = 0.1, "
                   "lambda = 1.1, seed = 3)", base=base, m0=m0, m1=m1)
    _check_della(out, base, m0, m1, (0.5, 0.5), (0.1, 0.1), consensus, normalize, 1.1)


def _check_della(out, base, m0, m1, dens, eps, consensus, normalize, lam):
    """`out` against the reference DELLA: each model pruned with its own density and epsilon
    (the random keep mask taken from della_prune's counter-based stream), then mixed."""
    for name in base:
        taus = ref.task_vectors(base[name], [m0[name], m1[name]])
        pruned = []
        for i, t in enumerate(taus):
            mask = _mask(f"della_prune([m0, m1] - base, [{dens[0]}, {dens[1]}], "
                         f"epsilon = [{eps[0]}, {eps[1]}], seed = 3)[{i}] != 0",
                         base=base, m0=m0, m1=m1)[name]
            pruned.append(ref.rescale(t, mask, ref.della_probs(t, dens[i], eps[i]), True))
        want = ref.gta_mix(base[name], pruned, [1, 0.6], consensus, normalize, lam)
        torch.testing.assert_close(out[name], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("density,epsilon", [(0.5, 0.5), (0.9, 0.15), (0.1, 0.2)])
def test_della_epsilon_out_of_range_is_an_error(density, epsilon):
    base, a = sd(0, SMALL), sd(1, SMALL)
    with pytest.raises(ml.MergelangError) as info:
        ml.merge(f"della(base, [a], density = {density}, epsilon = {epsilon})", base=base, a=a)
    assert "E203" in info.value.codes


def test_della_density_edges():
    base, a = sd(0, SMALL), sd(1, SMALL)
    out = ml.merge("della_linear(base, [a], density = 1)", base=base, a=a)
    for k in out:
        torch.testing.assert_close(out[k], a[k], rtol=1e-6, atol=1e-6)
    out = ml.merge("della_linear(base, [a], density = 0)", base=base, a=a)
    assert all(torch.equal(out[k], base[k]) for k in out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_random_methods_identical_on_gpu():
    from mergelang.runtime.rng import random_u32 as r
    assert torch.equal(r(10_000, "k", device="cuda").cpu(), r(10_000, "k"))


def test_della_per_model_epsilon_matches_reference():
    """Issue 16: mergekit takes `epsilon` per model; each model prunes with its own epsilon."""
    base, m0, m1 = sd(0, SMALL), sd(1, SMALL), sd(2, SMALL)
    out = ml.merge("della(base, [m0, m1], weights = [1, 0.6], density = [0.5, 0.4], "
                   "epsilon = [0.1, 0.3], seed = 3)", base=base, m0=m0, m1=m1)
    _check_della(out, base, m0, m1, (0.5, 0.4), (0.1, 0.3), True, True, 1.0)
    with pytest.raises(ml.MergelangError) as info:  # one model's epsilon out of range
        ml.merge("della(base, [m0, m1], density = 0.5, epsilon = [0.1, 0.5])", base=base, m0=m0, m1=m1)
    assert "E203" in info.value.codes
