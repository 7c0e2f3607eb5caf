"""Parity of the stdlib merge methods with the independent references in tests/reference.py.

`ml.merge(expr, **state_dicts)` evaluates the recipe expression for every tensor name; the
references are applied tensor by tensor on the same float32 inputs and must agree to 1e-6
(relative), masks exactly.
"""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergelang as ml
import reference as ref

SHAPES = {
    "model.embed.weight": (8, 16),
    "layers.0.mlp.bias": (32,),
    "norm.weight": (3,),
    "scalar": (1,),
    "conv.weight": (4, 4, 2),
}
RTOL = 1e-6
ATOL = 1e-6


def make_sd(seed: int, scale: float = 1.0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: (scale * torch.randn(shape, generator=g)).to(dtype)
            for name, shape in SHAPES.items()}


def f32(sd):
    return {k: v.to(torch.float32) for k, v in sd.items()}


def check(out, expected, *, dtype=torch.float32, rtol=RTOL, atol=ATOL):
    """Compare a merge result with the per-name reference results (float32 tensors)."""
    assert isinstance(out, dict)
    assert set(out) == set(expected)
    for name, exp in expected.items():
        got = out[name]
        assert got.shape == exp.shape, name
        assert got.dtype == dtype, (name, got.dtype)
        if dtype == torch.float32:
            torch.testing.assert_close(got, exp, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        else:
            # the reference, computed on the upcast float32 inputs, then cast to the output dtype;
            # allow one ulp of the narrow dtype for double-rounding differences
            want = exp.to(dtype).to(torch.float32)
            ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
            torch.testing.assert_close(got.to(torch.float32), want, rtol=ulp, atol=1e-5,
                                       msg=lambda m: f"{name}: {m}")


def per_name(fn, *sds):
    return {name: fn(*(sd[name] for sd in sds)) for name in sds[0]}


@pytest.fixture
def sds():
    base = make_sd(0)
    return base, make_sd(1), make_sd(2), make_sd(3)


# ---- linear -------------------------------------------------------------------------------------

def test_linear_weights(sds):
    _, a, b, c = sds
    out = ml.merge("linear([a, b, c], weights = [1, 2, 3])", a=a, b=b, c=c)
    check(out, per_name(lambda x, y, z: ref.linear([x, y, z], [1, 2, 3]), a, b, c))


def test_linear_default_weights(sds):
    _, a, b, c = sds
    out = ml.merge("linear([a, b, c])", a=a, b=b, c=c)
    check(out, per_name(lambda x, y, z: ref.linear([x, y, z]), a, b, c))


def test_linear_no_normalize(sds):
    _, a, b, _ = sds
    out = ml.merge("linear([a, b], weights = [0.3, 0.7], normalize = false)", a=a, b=b)
    check(out, per_name(lambda x, y: ref.linear([x, y], [0.3, 0.7], normalize=False), a, b))


def test_linear_negative_weights(sds):
    _, a, b, c = sds
    out = ml.merge("linear([a, b, c], weights = [2, -0.5, 1])", a=a, b=b, c=c)
    check(out, per_name(lambda x, y, z: ref.linear([x, y, z], [2, -0.5, 1]), a, b, c))


def test_linear_zero_tensor(sds):
    _, a, b, _ = sds
    a = dict(a)
    a["conv.weight"] = torch.zeros(SHAPES["conv.weight"])
    out = ml.merge("linear([a, b], weights = [1, 3])", a=a, b=b)
    check(out, per_name(lambda x, y: ref.linear([x, y], [1, 3]), a, b))


@pytest.mark.parametrize("weights", ["[1, -1]", "[0.5, -0.5]", "[0, 0]", "[1, 2, -3]"])
def test_linear_weights_sum_to_zero_is_an_error(sds, weights):
    _, a, b, c = sds
    n = weights.count(",") + 1
    names = "abc"[:n]
    sds_by_name = {"a": a, "b": b, "c": c}
    with pytest.raises(ml.MergelangError) as info:
        ml.merge(f"linear([{', '.join(names)}], weights = {weights})",
                 **{nm: sds_by_name[nm] for nm in names})
    assert "E204" in info.value.codes


def test_linear_weights_sum_to_zero_without_normalize_is_fine(sds):
    _, a, b, _ = sds
    out = ml.merge("linear([a, b], weights = [1, -1], normalize = false)", a=a, b=b)
    check(out, per_name(lambda x, y: ref.linear([x, y], [1, -1], normalize=False), a, b))


# ---- slerp --------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.3, 0.5, 0.9])
def test_slerp(sds, t):
    _, a, b, _ = sds
    out = ml.merge(f"slerp(a, b, t = {t})", a=a, b=b)
    check(out, per_name(lambda x, y: ref.slerp(x, y, t), a, b))


def test_slerp_t0_gives_a_exactly(sds):
    _, a, b, _ = sds
    out = ml.merge("slerp(a, b, t = 0)", a=a, b=b)
    for name in a:
        assert torch.equal(out[name], a[name]), name


def test_slerp_t1_gives_b(sds):
    _, a, b, _ = sds
    out = ml.merge("slerp(a, b, t = 1)", a=a, b=b)
    check(out, b)


def _edge_pair(kind: str, seed: int = 7):
    a = make_sd(seed)
    if kind == "colinear":
        b = {k: 2 * v for k, v in a.items()}
    elif kind == "antiparallel":
        b = {k: -v for k, v in a.items()}
    elif kind == "antiparallel_scaled":
        b = {k: -3 * v for k, v in a.items()}
    elif kind == "a_zero":
        b = a
        a = {k: torch.zeros_like(v) for k, v in b.items()}
    elif kind == "b_zero":
        b = {k: torch.zeros_like(v) for k, v in a.items()}
    elif kind == "both_zero":
        a = {k: torch.zeros_like(v) for k, v in a.items()}
        b = dict(a)
    elif kind == "a_tiny":
        # ‖a‖ ≤ 1e-8: a is not normalised, so d ≈ 0 and the trig path runs with θ ≈ π/2
        b = a
        a = {k: v / torch.linalg.vector_norm(v) * 1e-10 for k, v in make_sd(seed + 1).items()}
    else:
        raise AssertionError(kind)
    return a, b


@pytest.mark.parametrize("kind", ["colinear", "antiparallel", "antiparallel_scaled", "a_zero",
                                  "b_zero", "both_zero", "a_tiny"])
@pytest.mark.parametrize("t", [0.0, 0.25, 0.7, 1.0])
def test_slerp_edge_cases(kind, t):
    a, b = _edge_pair(kind)
    out = ml.merge(f"slerp(a, b, t = {t})", a=a, b=b)
    check(out, per_name(lambda x, y: ref.slerp(x, y, t), a, b))


def test_slerp_colinear_is_lerp():
    a, b = _edge_pair("colinear")
    out = ml.merge("slerp(a, b, t = 0.3)", a=a, b=b)
    check(out, {k: 1.3 * v for k, v in a.items()})


def test_slerp_mixed_paths_in_one_state_dict(sds):
    # different tensors of one checkpoint take different branches
    _, a, b, _ = sds
    b = dict(b)
    b["model.embed.weight"] = 2 * a["model.embed.weight"]      # lerp (d ≈ 1)
    b["layers.0.mlp.bias"] = -a["layers.0.mlp.bias"]            # lerp (d ≈ −1)
    b["norm.weight"] = torch.zeros(3)                           # zero vector
    out = ml.merge("slerp(a, b, t = 0.4)", a=a, b=b)
    check(out, per_name(lambda x, y: ref.slerp(x, y, 0.4), a, b))


# ---- passthrough --------------------------------------------------------------------------------

def test_passthrough(sds):
    _, a, _, _ = sds
    check(ml.merge("passthrough(a)", a=a), a)
    check(ml.merge("passthrough(a, scale = 2)", a=a), per_name(lambda x: ref.passthrough(x, 2), a))
    check(ml.merge("passthrough(a, scale = -0.25)", a=a),
          per_name(lambda x: ref.passthrough(x, -0.25), a))


# ---- task arithmetic ----------------------------------------------------------------------------

def test_task_arithmetic(sds):
    base, a, b, _ = sds
    out = ml.merge("task_arithmetic(base, [a, b], weights = [1, 0.5], lambda = 0.8)",
                   base=base, a=a, b=b)
    check(out, per_name(lambda z, x, y: ref.task_arithmetic(z, [x, y], [1, 0.5], lam=0.8),
                        base, a, b))


def test_task_arithmetic_defaults(sds):
    base, a, b, c = sds
    out = ml.merge("task_arithmetic(base, [a, b, c])", base=base, a=a, b=b, c=c)
    check(out, per_name(lambda z, x, y, w: ref.task_arithmetic(z, [x, y, w]), base, a, b, c))


def test_task_arithmetic_negative_weights(sds):
    base, a, b, _ = sds
    out = ml.merge("task_arithmetic(base, [a, b], weights = [1, -1], lambda = 1.5)",
                   base=base, a=a, b=b)
    check(out, per_name(lambda z, x, y: ref.task_arithmetic(z, [x, y], [1, -1], lam=1.5),
                        base, a, b))


def test_task_arithmetic_zero_task_vectors(sds):
    base = sds[0]
    out = ml.merge("task_arithmetic(base, [a, b], weights = [0.5, 0.5])",
                   base=base, a=dict(base), b=dict(base))
    check(out, base)


# ---- ties ---------------------------------------------------------------------------------------

def check_mask_pattern(out, base, expected):
    """Which entries moved away from base must match exactly (masks, not just values)."""
    for name in expected:
        moved = out[name].to(torch.float32) != base[name].to(torch.float32)
        want = expected[name] != base[name].to(torch.float32)
        assert torch.equal(moved, want), name


def test_ties_three_models(sds):
    base, a, b, c = sds
    out = ml.merge("ties(base, [a, b, c], weights = [1, 1, 1], density = 0.5)",
                   base=base, a=a, b=b, c=c)
    exp = per_name(lambda z, x, y, w: ref.ties(z, [x, y, w], [1, 1, 1], density=0.5),
                   base, a, b, c)
    check(out, exp)
    check_mask_pattern(out, base, exp)


def test_ties_no_normalize_lambda(sds):
    base, a, b, _ = sds
    out = ml.merge("ties(base, [a, b], density = 0.3, lambda = 1.2, normalize = false)",
                   base=base, a=a, b=b)
    exp = per_name(lambda z, x, y: ref.ties(z, [x, y], density=0.3, lam=1.2, normalize=False),
                   base, a, b)
    check(out, exp)
    check_mask_pattern(out, base, exp)


def test_ties_defaults_density_one(sds):
    base, a, b, c = sds
    out = ml.merge("ties(base, [a, b, c])", base=base, a=a, b=b, c=c)
    check(out, per_name(lambda z, x, y, w: ref.ties(z, [x, y, w]), base, a, b, c))


@pytest.mark.parametrize("weights", [[2, 1, 0.5], [1, -1, 0.5], [-1, -2, 3]])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9, 1.0])
def test_ties_weights_density_grid(sds, weights, density):
    base, a, b, c = sds
    w = ", ".join(str(x) for x in weights)
    out = ml.merge(f"ties(base, [a, b, c], weights = [{w}], density = {density})",
                   base=base, a=a, b=b, c=c)
    exp = per_name(lambda z, x, y, v: ref.ties(z, [x, y, v], weights, density=density),
                   base, a, b, c)
    check(out, exp)
    check_mask_pattern(out, base, exp)


def _small(values_by_name):
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values_by_name.items()}


def test_ties_weights_applied_before_election():
    # element 0: unweighted Στ = −1 would elect −; weighted Σ wτ = 0 elects +
    base = _small({"x": [0.0, 0.0, 0.0, 0.0]})
    a = _small({"x": [1.0, -2.0, 3.0, -4.0]})
    b = _small({"x": [-2.0, 1.0, 1.0, 4.0]})
    out = ml.merge("ties(base, [a, b], weights = [2, 1])", base=base, a=a, b=b)
    check(out, {"x": torch.tensor([1.0, -2.0, 7 / 3, -4.0])})
    out = ml.merge("ties(base, [a, b], weights = [2, 1], normalize = false)", base=base, a=a, b=b)
    check(out, {"x": torch.tensor([2.0, -4.0, 7.0, -8.0])})


def test_ties_negative_weights_zero_divisor():
    base = _small({"x": [0.0, 0.0, 0.0, 0.0]})
    a = _small({"x": [1.0, -2.0, 3.0, -4.0]})
    b = _small({"x": [-2.0, 1.0, 1.0, 4.0]})
    out = ml.merge("ties(base, [a, b], weights = [1, -1])", base=base, a=a, b=b)
    exp = {"x": ref.ties(base["x"], [a["x"], b["x"]], [1, -1])}
    torch.testing.assert_close(exp["x"], torch.tensor([3.0, -3.0, 3.0, -8.0]))
    check(out, exp)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.34, 0.5, 0.7, 0.9])
def test_ties_exact_magnitude_ties(density):
    # repeated |τ| values: the trim keeps the lowest indices first
    base = _small({"v": [0.5] * 6, "m": [[0.0] * 4] * 3})
    a = _small({"v": [1.5, -0.5, 1.5, -0.5, 2.5, -1.5],
                "m": [[1, -1, 1, -1], [2, -2, 2, -2], [1, 1, -1, -1]]})
    b = _small({"v": [-0.5, -0.5, -0.5, 1.5, 1.5, 1.5],
                "m": [[-1, -1, -1, -1], [1, 1, 1, 1], [2, 2, 2, 2]]})
    out = ml.merge(f"ties(base, [a, b], density = {density})", base=base, a=a, b=b)
    exp = per_name(lambda z, x, y: ref.ties(z, [x, y], density=density), base, a, b)
    check(out, exp, rtol=0, atol=0)
    check_mask_pattern(out, base, exp)


def test_ties_exact_tie_hand_computed():
    base = _small({"v": [0.0] * 6})
    a = _small({"v": [1.0, -1.0, 1.0, -1.0, 2.0, -2.0]})
    b = _small({"v": [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]})
    out = ml.merge("ties(base, [a, b], density = 0.5)", base=base, a=a, b=b)
    check(out, {"v": torch.tensor([1.0, -1.0, -1.0, 0.0, 2.0, -2.0])}, rtol=0, atol=0)


def test_ties_single_element_density_half_keeps_nothing():
    base = _small({"s": [1.0], "t": [0.0, 0.0, 0.0]})
    a = _small({"s": [5.0], "t": [1.0, -3.0, 2.0]})
    b = _small({"s": [7.0], "t": [2.0, 1.0, -4.0]})
    out = ml.merge("ties(base, [a, b], density = 0.5)", base=base, a=a, b=b)
    # "s": n = 1 → k = 0 → base.  "t": k = int(1.5) = 1: a keeps index 1 (−3), b keeps index 2
    # (−4); Σ = (0, −3, −4) → elected (+, −, −) → out (0, −3, −4)
    check(out, {"s": torch.tensor([1.0]), "t": torch.tensor([0.0, -3.0, -4.0])}, rtol=0, atol=0)


def test_ties_zero_model_and_zero_task_vectors(sds):
    base, a, b, _ = sds
    a = dict(a)
    b = dict(b)
    a["conv.weight"] = torch.zeros(SHAPES["conv.weight"])   # a model tensor that is all zero
    b["norm.weight"] = base["norm.weight"].clone()          # task vector all zero in b
    b["scalar"] = base["scalar"].clone()
    a["scalar"] = base["scalar"].clone()                    # all task vectors zero → base
    out = ml.merge("ties(base, [a, b], density = 0.5)", base=base, a=a, b=b)
    exp = per_name(lambda z, x, y: ref.ties(z, [x, y], density=0.5), base, a, b)
    check(out, exp)
    check_mask_pattern(out, base, exp)
    assert torch.equal(out["scalar"], base["scalar"])


def test_ties_all_zero_task_vectors(sds):
    base = sds[0]
    out = ml.merge("ties(base, [a, b], weights = [1, 2], density = 0.7)",
                   base=base, a=dict(base), b=dict(base))
    for name in base:
        assert torch.equal(out[name], base[name]), name


# ---- dtypes -------------------------------------------------------------------------------------

def test_bf16_linear_output_is_bf16():
    a, b = make_sd(1, dtype=torch.bfloat16), make_sd(2, dtype=torch.bfloat16)
    out = ml.merge("linear([a, b], weights = [0.3, 0.7])", a=a, b=b)
    check(out, per_name(lambda x, y: ref.linear([x, y], [0.3, 0.7]), f32(a), f32(b)),
          dtype=torch.bfloat16)


def test_bf16_ties_output_is_bf16():
    base = make_sd(0, dtype=torch.bfloat16)
    a, b, c = (make_sd(s, dtype=torch.bfloat16) for s in (1, 2, 3))
    out = ml.merge("ties(base, [a, b, c], weights = [1, 1, 1], density = 0.5)",
                   base=base, a=a, b=b, c=c)
    exp = per_name(lambda z, x, y, w: ref.ties(z, [x, y, w], [1, 1, 1], density=0.5),
                   f32(base), f32(a), f32(b), f32(c))
    check(out, exp, dtype=torch.bfloat16)


def test_bf16_slerp_output_is_bf16():
    a, b = make_sd(1, dtype=torch.bfloat16), make_sd(2, dtype=torch.bfloat16)
    out = ml.merge("slerp(a, b, t = 0.3)", a=a, b=b)
    check(out, per_name(lambda x, y: ref.slerp(x, y, 0.3), f32(a), f32(b)), dtype=torch.bfloat16)


def test_output_dtype_follows_base():
    base = make_sd(0, dtype=torch.bfloat16)
    a, b = make_sd(1), make_sd(2)  # float32 models
    out = ml.merge("task_arithmetic(base, [a, b], weights = [1, 0.5], lambda = 0.8)",
                   base=base, a=a, b=b)
    exp = per_name(lambda z, x, y: ref.task_arithmetic(z, [x, y], [1, 0.5], lam=0.8),
                   f32(base), a, b)
    check(out, exp, dtype=torch.bfloat16)

    base32 = make_sd(0)
    a16 = make_sd(1, dtype=torch.bfloat16)
    out = ml.merge("task_arithmetic(base, [a, b])", a=a16, b=b, base=base32)
    check(out, per_name(lambda z, x, y: ref.task_arithmetic(z, [x, y]), base32, f32(a16), b))


def test_output_dtype_follows_first_keyword_without_base():
    a16, b32 = make_sd(1, dtype=torch.float16), make_sd(2)
    out = ml.merge("linear([a, b])", a=a16, b=b32)
    check(out, per_name(lambda x, y: ref.linear([x, y]), f32(a16), b32), dtype=torch.float16)


# ---- properties ---------------------------------------------------------------------------------

_values = st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=1, max_size=24)
_weight = st.floats(0.05, 20, allow_nan=False).map(lambda w: round(w, 3)).filter(lambda w: w > 0)


def fmt(xs):
    return "[" + ", ".join(repr(float(x)) for x in xs) + "]"


@settings(max_examples=40, deadline=None)
@given(values=_values, weights=st.lists(_weight, min_size=1, max_size=4))
def test_prop_linear_of_identical_models_is_the_model(values, weights):
    x = {"x": torch.tensor(values, dtype=torch.float32)}
    names = "abcd"[:len(weights)]
    out = ml.merge(f"linear([{', '.join(names)}], weights = {fmt(weights)})",
                   **{n: x for n in names})
    torch.testing.assert_close(out["x"], x["x"], rtol=RTOL, atol=ATOL)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), lam=st.floats(-2, 2, allow_nan=False).map(lambda v: round(v, 3)),
       w=st.sampled_from([1.0, 0.5, 3.0, -1.0, -0.25]))
def test_prop_ties_density_one_single_model_is_base_plus_lambda_tau(data, lam, w):
    base_v = data.draw(_values)
    n = len(base_v)
    model_v = data.draw(st.lists(st.floats(-100, 100, allow_nan=False, width=32),
                                 min_size=n, max_size=n))
    base = {"x": torch.tensor(base_v, dtype=torch.float32)}
    a = {"x": torch.tensor(model_v, dtype=torch.float32)}
    out = ml.merge(f"ties(base, [a], weights = [{w!r}], density = 1, lambda = {lam!r})",
                   base=base, a=a)
    tau = (a["x"] - base["x"]).to(torch.float64)
    expected = (base["x"].to(torch.float64) + lam * tau).to(torch.float32)
    # values up to 100: allow float32 rounding of base + λτ
    torch.testing.assert_close(out["x"], expected, rtol=RTOL, atol=1e-4)
    torch.testing.assert_close(out["x"], ref.ties(base["x"], [a["x"]], [w], lam=lam),
                               rtol=RTOL, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), density=st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0]),
       weights=st.lists(st.sampled_from([1.0, 2.0, 0.5, -1.0]), min_size=2, max_size=3))
def test_prop_ties_matches_reference_on_small_integers(data, density, weights):
    # small integer task vectors: many exact magnitude ties and exact zero sums
    n = data.draw(st.integers(1, 12))
    ints = st.lists(st.integers(-3, 3), min_size=n, max_size=n)
    base = {"x": torch.tensor(data.draw(ints), dtype=torch.float32)}
    names = "abc"[:len(weights)]
    models = {nm: {"x": torch.tensor(data.draw(ints), dtype=torch.float32)} for nm in names}
    out = ml.merge(f"ties(base, [{', '.join(names)}], weights = {fmt(weights)}, "
                   f"density = {density!r})", base=base, **models)
    exp = ref.ties(base["x"], [models[nm]["x"] for nm in names], weights, density=density)
    torch.testing.assert_close(out["x"], exp, rtol=RTOL, atol=ATOL)
