"""Hand-computed checks of tests/reference.py, so the references are proven on their own."""

from __future__ import annotations

import math

import pytest
import torch

import reference as ref


def T(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def eq(actual, expected, atol=1e-7):
    expected = expected if isinstance(expected, torch.Tensor) else torch.tensor(expected)
    torch.testing.assert_close(actual, expected.to(torch.float32), rtol=1e-6, atol=atol)


# ---- linear -------------------------------------------------------------------------------------

def test_linear_weighted_mean():
    x, y, z = T(1, 1), T(2, 0), T(3, -1)
    # (1·1 + 2·2 + 3·3) / 6 = 14/6 ; (1 + 0 − 3) / 6 = −2/6
    eq(ref.linear([x, y, z], [1, 2, 3]), [14 / 6, -2 / 6])
    eq(ref.linear([x, y, z], [1, 2, 3], normalize=False), [14, -2])
    eq(ref.linear([x, y]), [1.5, 0.5])


def test_linear_negative_weights_and_zero_sum():
    x, y = T(1, 2), T(3, 5)
    eq(ref.linear([x, y], [2, -1]), [-1, -1])  # (2x − y) / 1
    eq(ref.linear([x, y], [1, -1], normalize=False), [-2, -3])
    with pytest.raises(ValueError):
        ref.linear([x, y], [1, -1])
    with pytest.raises(ValueError):
        ref.linear([x, y], [0.5, -0.5])


# ---- slerp --------------------------------------------------------------------------------------

def test_slerp_orthogonal():
    r = math.sqrt(0.5)
    eq(ref.slerp(T(1, 0), T(0, 1), 0.5), [r, r])
    # raw tensors are combined, not the unit vectors
    eq(ref.slerp(T(2, 0), T(0, 1), 0.5), [2 * r, r])
    # t = 1/3 of a right angle: (sin 60°, sin 30°)
    eq(ref.slerp(T(1, 0), T(0, 1), 1 / 3), [math.sqrt(3) / 2, 0.5])


def test_slerp_endpoints():
    a, b = T(1, 2, 3), T(-1, 0.5, 2)
    assert torch.equal(ref.slerp(a, b, 0.0), a)
    eq(ref.slerp(a, b, 1.0), b)


def test_slerp_colinear_and_antiparallel_lerp():
    a = T(1, -2, 3)
    eq(ref.slerp(a, 2 * a, 0.3), 1.3 * a)  # 0.7a + 0.6a
    eq(ref.slerp(a, -a, 0.5), [0, 0, 0])
    eq(ref.slerp(a, -a, 0.25), 0.5 * a)  # 0.75a − 0.25a


def test_slerp_zero_and_tiny_vectors():
    # a zero vector is not normalised: d = 0, θ = π/2 → sin(tπ/2)·b
    b = T(0, 3)
    eq(ref.slerp(T(0, 0), b, 0.5), [0, 3 * math.sqrt(0.5)], atol=1e-6)
    eq(ref.slerp(T(0, 0), T(0, 0), 0.5), [0, 0])
    # a tiny (‖a‖ ≤ 1e-8) vector is also left unnormalised: d ≈ 0 → θ ≈ π/2
    a = T(1e-9, 0)
    eq(ref.slerp(a, T(1, 0), 0.5), [math.sqrt(0.5), 0], atol=1e-6)
    # whereas a small vector above the threshold is normalised: colinear → lerp
    eq(ref.slerp(T(1e-6, 0), T(1, 0), 0.5), [0.5 + 0.5e-6, 0])


def test_slerp_obtuse_angle():
    # 135° between a and b; t = 0.5 → direction at 67.5°, on the raw tensors with |a|=|b|=1
    a = T(1, 0)
    b = T(-math.sqrt(0.5), math.sqrt(0.5))
    th = 3 * math.pi / 4
    c = math.sin(th / 2) / math.sin(th)
    eq(ref.slerp(a, b, 0.5), [c * (1 - math.sqrt(0.5)), c * math.sqrt(0.5)], atol=1e-6)
    eq(ref.slerp(a, b, 0.5), [math.cos(3 * math.pi / 8), math.sin(3 * math.pi / 8)], atol=1e-6)


# ---- passthrough --------------------------------------------------------------------------------

def test_passthrough():
    eq(ref.passthrough(T(1, -2)), [1, -2])
    eq(ref.passthrough(T(1, -2), 2), [2, -4])


# ---- magnitude trim -----------------------------------------------------------------------------

def test_magnitude_trim_ties_broken_by_index():
    tau = T(1, -1, 1, -1, 2, -2)
    eq(ref.magnitude_trim(tau, 0.5), [1, 0, 0, 0, 2, -2])      # k = 3
    eq(ref.magnitude_trim(tau, 0.34), [0, 0, 0, 0, 2, -2])     # k = int(2.04) = 2
    eq(ref.magnitude_trim(tau, 0.2), [0, 0, 0, 0, 2, 0])       # k = 1
    eq(ref.magnitude_trim(tau, 0.7), [1, -1, 0, 0, 2, -2])     # k = 4
    eq(ref.magnitude_trim(tau, 0.1), [0, 0, 0, 0, 0, 0])       # k = 0
    eq(ref.magnitude_trim(tau, 1.0), tau)
    eq(ref.magnitude_trim(tau, 1.5), tau)


def test_magnitude_trim_nd_and_single_element():
    tau = torch.tensor([[0.5, -3.0], [3.0, 0.1]])
    eq(ref.magnitude_trim(tau, 0.5), [[0, -3.0], [3.0, 0]])
    eq(ref.magnitude_trim(tau, 0.25), [[0, -3.0], [0, 0]])     # tie: index 1 before index 2
    eq(ref.magnitude_trim(T(5), 0.5), [0])                     # n = 1 → k = 0


# ---- task arithmetic ----------------------------------------------------------------------------

def test_task_arithmetic():
    base, a, b = T(1, 2), T(2, 2), T(0, 5)
    # τa = (1, 0), τb = (−1, 3); 1·τa + 0.5·τb = (0.5, 1.5); ×0.8 = (0.4, 1.2)
    eq(ref.task_arithmetic(base, [a, b], [1, 0.5], lam=0.8), [1.4, 3.2])
    # default weights 1, λ 1, no normalisation: base + τa + τb
    eq(ref.task_arithmetic(base, [a, b]), [1, 5])


def test_task_arithmetic_zero_task_vectors():
    base = T(1, 2, 3)
    eq(ref.task_arithmetic(base, [base.clone(), base.clone()], [1, 1]), base)


# ---- ties ---------------------------------------------------------------------------------------

TAU1 = T(1, -2, 3, -4)
TAU2 = T(-2, 1, 1, 4)


def test_ties_trim_elect_disjoint_mean():
    base = T(1, 1, 1, 1)
    a, b = base + TAU1, base + TAU2
    # density 0.5 (k=2): τ1 → (0, 0, 3, −4); τ2 → (−2, 0, 0, 4)
    # Σ = (−2, 0, 3, 0) → elected (−, +, +, +)   [0 counts as +]
    # mask1 = (F, F, T, F); mask2 = (T, F, F, T)
    # mixed = (−2, 0, 3, 4); div = (1, 0→1, 1, 1)
    eq(ref.ties(base, [a, b], density=0.5), base + T(-2, 0, 3, 4))
    eq(ref.ties(base, [a, b], density=0.5, lam=0.5), base + T(-1, 0, 1.5, 2))


def test_ties_weights_before_election():
    base = torch.zeros(4)
    a, b = TAU1.clone(), TAU2.clone()
    # W1 = (2, −4, 6, −8), W2 = (−2, 1, 1, 4); Σ = (0, −3, 7, −4) → elected (+, −, +, −)
    # (unweighted Σ would be (−1, −1, 4, 0) → element 0 elects −: weights matter)
    # mask1 = (T, T, T, T); mask2 = (F, F, T, F)
    # mixed = (2, −4, 7, −8); div = (2, 2, 3, 2)
    eq(ref.ties(base, [a, b], [2, 1]), [1, -2, 7 / 3, -4])
    eq(ref.ties(base, [a, b], [2, 1], normalize=False), [2, -4, 7, -8])
    eq(ref.ties(base, [a, b], [2, 1], lam=0.5, normalize=False), [1, -2, 3.5, -4])


def test_ties_negative_weights():
    base = torch.zeros(4)
    a, b = TAU1.clone(), TAU2.clone()
    # W1 = (1, −2, 3, −4), W2 = (2, −1, −1, −4); Σ = (3, −3, 2, −8) → (+, −, +, −)
    # mask1 = all T; mask2 = (T, T, F, T)
    # mixed = (3, −3, 3, −8); div = (0→1, 0→1, 1, 0→1)
    eq(ref.ties(base, [a, b], [1, -1]), [3, -3, 3, -8])


def test_ties_exact_magnitude_ties():
    base = torch.zeros(6)
    a = T(1, -1, 1, -1, 2, -2)
    b = T(-1, -1, -1, 1, 1, 1)
    # density 0.5 → k = 3: τa → (1, 0, 0, 0, 2, −2); τb (all |1|) → (−1, −1, −1, 0, 0, 0)
    # Σ = (0, −1, −1, 0, 2, −2) → elected (+, −, −, +, +, −)
    # mask_a = (T, F, F, F, T, T); mask_b = (F, T, T, F, F, F)
    eq(ref.ties(base, [a, b], density=0.5), [1, -1, -1, 0, 2, -2])


def test_ties_zero_task_vectors_and_zero_sum():
    base = T(1, 2, 3)
    # all τ zero: elected +, nothing matches, div 0 → 1 → base
    eq(ref.ties(base, [base.clone(), base.clone()], density=0.5), base)
    # τ cancel exactly: Σ = 0 → elected +, only the positive one survives
    eq(ref.ties(torch.zeros(1), [T(2), T(-2)]), [2])
    # n = 1, density 0.5 → k = 0 → base
    eq(ref.ties(T(1), [T(5), T(7)], density=0.5), [1])


def test_ties_density_one_single_model_is_task_arithmetic():
    base, a = T(1, -2, 0.5), T(3, -2, -1.5)
    eq(ref.ties(base, [a], lam=0.7), base + 0.7 * (a - base))
    eq(ref.ties(base, [a], [-3], lam=0.7), base + 0.7 * (a - base))


def test_outputs_are_float32():
    x = torch.ones(3, dtype=torch.bfloat16)
    for r in (ref.linear([x, x]), ref.slerp(x, x, 0.5), ref.passthrough(x),
              ref.task_arithmetic(x, [x]), ref.ties(x, [x, x], density=0.5)):
        assert r.dtype == torch.float32
