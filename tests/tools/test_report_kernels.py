"""run --report's sums of bfloat16 data (float32 terms and partial sums, report_kernels.
merge_fused_bf16) against a float64 computation written here: sums of squares to 1e-6 relative,
the signed sums to 1e-6 of the sum of their terms' magnitudes, counts exact; weights float32
cannot square (huge, tiny) summed again in float64 (exact); both paths, parts on threads."""

from __future__ import annotations

import math

import pytest
import torch

from mergelang.tools.merge_report import run_sums

SQUARES = ("sx", "st", "so", "sto", "dist")


def reference(b: torch.Tensor, x: torch.Tensor, o: torch.Tensor) -> dict:
    b, x, o = b.double().reshape(-1), x.double().reshape(-1), o.double().reshape(-1)
    t, to, d = x - b, o - b, o - x
    p = to * t
    return {"sx": (x * x).sum(), "st": (t * t).sum(), "so": (o * o).sum(), "sto": (to * to).sum(),
            "dist": (d * d).sum(), "dox": (o * x).sum(), "dtt": p.sum(),
            "dox_abs": (o * x).abs().sum(), "dtt_abs": p.abs().sum(),
            "nnz": (t != 0).sum(), "kept": (p > 0).sum(), "against": (p < 0).sum()}


def check(got, want: dict, rel: float) -> None:
    for k in SQUARES:
        assert getattr(got, k) == pytest.approx(float(want[k]), rel=rel), k
    for k in ("dox", "dtt"):
        assert abs(getattr(got, k) - float(want[k])) <= rel * float(want[f"{k}_abs"]) + 1e-300, k
    for k in ("nnz", "kept", "against"):
        assert getattr(got, k) == int(want[k]), k


def bf16_case(n: int, models: int, seed: int, scale: float = 1.0, spread: float = 1e-2):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * scale).to(torch.bfloat16)
    xs = []
    for _ in range(models):
        d = torch.randn(n, generator=g) * spread * scale
        d[torch.rand(n, generator=g) < 0.3] = 0  # entries equal to the base: τ = 0
        xs.append((base.float() + d).to(torch.bfloat16))
    out = (base.float() + sum(x.float() - base.float() for x in xs) * 0.7).to(torch.bfloat16)
    return base, xs, out


@pytest.mark.parametrize("n", [7, 1000, 300_001])
@pytest.mark.parametrize("models", [1, 2, 3])
def test_bf16_sums_match_float64(n, models):
    base, xs, out = bf16_case(n, models, seed=n + models)
    for x, s in zip(xs, run_sums(base, xs, out)):
        assert s.numel == n
        check(s, reference(base, x, out), rel=1e-6)


@pytest.mark.parametrize("scale", [1e20, 1e-24])
def test_weights_float32_cannot_square_are_summed_in_float64(scale):
    """|w| ~ 1e20 squares past float32's range, ~1e-24 under its normal range: the tensor is
    summed again in float64, so the report holds the exact sums."""
    base, xs, out = bf16_case(4096, 2, seed=3, scale=scale)
    for x, s in zip(xs, run_sums(base, xs, out)):
        want = reference(base, x, out)
        assert math.isfinite(s.sx) and s.sx > 0
        check(s, want, rel=1e-12)


def test_output_equal_to_an_input_has_distance_zero():
    base, xs, _ = bf16_case(5000, 2, seed=5)
    s = run_sums(base, xs, xs[0])
    assert s[0].dist == 0.0 and s[1].dist > 0
    check(s[1], reference(base, xs[1], xs[0]), rel=1e-6)


def test_non_finite_values_give_non_finite_sums():
    base, xs, out = bf16_case(3000, 2, seed=6)
    xs[0][17] = float("nan")
    out[5] = float("inf")
    s = run_sums(base, xs, out)
    assert math.isnan(s[0].sx) and math.isinf(s[1].so)


def test_float32_inputs_keep_the_float64_loop():
    g = torch.Generator().manual_seed(8)
    base = torch.randn(50_000, generator=g)
    xs = [base + 0.01 * torch.randn(50_000, generator=g) for _ in range(2)]
    out = (xs[0] + xs[1]) / 2
    for x, s in zip(xs, run_sums(base, xs, out)):
        check(s, reference(base, x, out), rel=1e-12)
