"""Parity of sce, consensus, nuslerp, multislerp and karcher with reference_more.py."""

from __future__ import annotations

import pytest
import torch

import mergelang as ml
import reference_more as ref

SHAPES = {"w": (8, 16), "b": (32,), "s": (1,), "c": (4, 4, 2)}


def sd(seed, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def close(out, want, rtol=1e-5, atol=1e-5):
    assert set(out) == set(want)
    for k in want:
        torch.testing.assert_close(out[k], want[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def models(n, start=1, shapes=SHAPES):
    return {f"m{i}": sd(start + i, shapes) for i in range(n)}


def names(ms):
    return ", ".join(ms)


# ---- sce -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
def test_sce(n, topk):
    base, ms = sd(0), models(n)
    out = ml.merge(f"sce(base, [{names(ms)}], select_topk = {topk})", base=base, **ms)
    close(out, {k: ref.sce(base[k], [m[k] for m in ms.values()], topk) for k in base},
          rtol=1e-6, atol=1e-6)


def test_sce_zero_task_vectors_and_ties():
    base = sd(0)
    same = {k: v.clone() for k, v in base.items()}
    ms = {"m0": same, "m1": sd(1)}
    ms["m1"]["b"][:8] = base["b"][:8]                 # zero variance entries
    out = ml.merge("sce(base, [m0, m1], select_topk = 0.5)", base=base, **ms)
    close(out, {k: ref.sce(base[k], [m[k] for m in ms.values()], 0.5) for k in base},
          rtol=1e-6, atol=1e-6)
    out = ml.merge("sce(base, [m0, m0])", base=base, m0=same)   # all task vectors zero
    close(out, base)


# ---- consensus -----------------------------------------------------------------------------------

@pytest.mark.parametrize("k,lam_tall,lam", [(2, 0.4, 1.0), (1, 0.2, 0.7), (3, 0.6, 1.0),
                                            (0, 0.4, 1.0)])
def test_consensus(k, lam_tall, lam):
    base, ms = sd(0), models(3)
    out = ml.merge(f"consensus(base, [{names(ms)}], k = {k}, lam_tall = {lam_tall}, "
                   f"lambda = {lam})", base=base, **ms)
    close(out, {key: ref.consensus(base[key], [m[key] for m in ms.values()], k, lam_tall, lam)
                for key in base}, rtol=1e-6, atol=1e-6)


# ---- nuslerp -------------------------------------------------------------------------------------

@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0], [1.0, -1.0]])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp(flatten, row_wise, weights, with_base):
    shapes = {"w": (8, 16), "b": (32,), "s": (1,)}
    base, a, b = sd(0, shapes), sd(1, shapes), sd(2, shapes)
    w = "" if weights is None else f", weights = [{weights[0]}, {weights[1]}]"
    bs = ", base = base" if with_base else ""
    out = ml.merge(f"nuslerp([a, b]{w}{bs}, nuslerp_flatten = {str(flatten).lower()}, "
                   f"nuslerp_row_wise = {str(row_wise).lower()})", base=base, a=a, b=b)
    close(out, {k: ref.nuslerp([a[k], b[k]], weights, base[k] if with_base else None, flatten,
                               row_wise) for k in base})


@pytest.mark.parametrize("seed", range(8))
def test_nuslerp_colinear_and_zero(seed):
    g = torch.Generator().manual_seed(seed)
    a = {"x": torch.randn(4, 5, generator=g), "z": torch.zeros(6)}
    b = {"x": 3 * a["x"], "z": torch.randn(6, generator=g)}
    b["x"][1] = -a["x"][1]            # one antiparallel row
    b["x"][2] = -0.5 * a["x"][2]      # and a scaled one
    for flat in ("true", "false"):
        out = ml.merge(f"nuslerp([a, b], weights = [1, 3], nuslerp_flatten = {flat})", a=a, b=b)
        close(out, {k: ref.nuslerp([a[k], b[k]], [1, 3], None, flat == "true") for k in a})


def test_nuslerp_needs_two_models():
    a, b, c = sd(1), sd(2), sd(3)
    with pytest.raises(ml.MergelangError) as info:
        ml.merge("nuslerp([a, b, c])", a=a, b=b, c=c)
    assert "E203" in info.value.codes


# ---- multislerp ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("weights", [None, "inc", "neg"])
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp(n, weights, with_base):
    base, ms = sd(0), models(n)
    ws = None if weights is None else [float(i + 1) for i in range(n)] if weights == "inc" \
        else [2.0] + [-0.5] * (n - 1)
    w = "" if ws is None else f", weights = [{', '.join(map(str, ws))}]"
    bs = ", base = base" if with_base else ""
    out = ml.merge(f"multislerp([{names(ms)}]{w}{bs})", base=base, **ms)
    close(out, {k: ref.multislerp([m[k] for m in ms.values()], ws,
                                  base[k] if with_base else None) for k in base})


def test_multislerp_no_normalize_and_antipodal_pair():
    a = sd(1)
    b = {k: -v for k, v in a.items()}
    out = ml.merge("multislerp([a, b])", a=a, b=b)        # mean direction 0: lerp of the pair
    close(out, {k: ref.multislerp([a[k], b[k]]) for k in a})
    c = sd(3)
    out = ml.merge("multislerp([a, c], weights = [0.3, 0.5], normalize_weights = false)", a=a, c=c)
    close(out, {k: ref.multislerp([a[k], c[k]], [0.3, 0.5], None, False) for k in a})


def test_multislerp_degenerate_three_models_is_an_error():
    a = sd(1)
    b = {k: -v for k, v in a.items()}
    with pytest.raises(ml.MergelangError) as info:
        ml.merge("multislerp([a, b, a], weights = [1, 2, 1])", a=a, b=b)
    assert "E501" in info.value.codes


# ---- karcher -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("weights", [None, "inc"])
@pytest.mark.parametrize("max_iter", [0, 1, 3, 10, 50])
def test_karcher(n, weights, max_iter):
    ms = models(n)
    ws = None if weights is None else [float(i + 1) for i in range(n)]
    w = "" if ws is None else f", weights = [{', '.join(map(str, ws))}]"
    out = ml.merge(f"karcher([{names(ms)}]{w}, max_iter = {max_iter})", **ms)
    close(out, {k: ref.karcher([m[k] for m in ms.values()], ws, max_iter) for k in ms["m0"]},
          rtol=2e-5, atol=2e-5)


def test_karcher_edge_cases():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 6, generator=g)
    cases = {
        "colinear": [x, 2 * x, 0.5 * x],
        "one_zero": [x, torch.zeros_like(x), torch.randn(5, 6, generator=g)],
        "all_zero": [torch.zeros_like(x)] * 3,
        "tiny": [x * 1e-7, torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)],
    }
    for name, ts in cases.items():
        sds = {f"m{i}": {"x": t} for i, t in enumerate(ts)}
        out = ml.merge("karcher([m0, m1, m2], weights = [1, 2, 3])", **sds)
        torch.testing.assert_close(out["x"], ref.karcher(ts, [1, 2, 3]), rtol=2e-5, atol=2e-5,
                                   msg=lambda m: f"{name}: {m}")


def test_karcher_uniform_matches_mergekit_default():
    # weights omitted: alphas 1/N, as mergekit
    ms = models(3)
    out = ml.merge("karcher([m0, m1, m2])", **ms)
    close(out, {k: ref.karcher([m[k] for m in ms.values()]) for k in ms["m0"]}, rtol=2e-5, atol=2e-5)
