"""inspect's one-pass bracket selection for large tensors (tools/inspect_select.py) against a
straightforward float64 torch computation (τ² sorted): random and quantised task vectors (many
equal τ²), a bracket missed on purpose and a list that overflows (the bucket-method fallback
runs and gives the same numbers), NaN / Inf, ±0 and float64 inputs, parts > 1 like parts = 1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergelang.tools import inspect_select as sel
from mergelang.tools.inspect_kernels import fused_stats
from mergelang.tools.inspect_stats import FRACTIONS, flat


def reference(base: torch.Tensor, xs: list[torch.Tensor]) -> tuple[list[tuple], list[tuple]]:
    b = base.double().reshape(-1)
    n = b.numel()
    taus = [x.double().reshape(-1) - b for x in xs]
    models = []
    for t in taus:
        sq = torch.sort(t * t, descending=True).values
        energy = [float(sq[:min(n, max(1, math.ceil(f * n)))].sum()) for f in FRACTIONS]
        models.append((float(t @ t), float(b @ b), float(t.abs().max()), int((t == 0).sum()), energy))
    pairs = []
    for i in range(len(taus)):
        for j in range(i + 1, len(taus)):
            p = taus[i] * taus[j]
            pairs.append((float(p.sum()), int((p > 0).sum()), int((p != 0).sum())))
    return models, pairs


def run(base: torch.Tensor, xs: list[torch.Tensor], parts: int = 1, **kw) -> tuple[list, list]:
    dtype = base.dtype if base.dtype in (torch.bfloat16, torch.float64) else torch.float32
    return sel.bracket_stats(flat(base, dtype), [flat(x, dtype) for x in xs], FRACTIONS,
                             dtype == torch.bfloat16, parts, **kw)


def same(got: tuple[list, list], want: tuple[list, list], rel: float = 1e-9) -> None:
    (gm, gp), (wm, wp) = got, want
    assert len(gm) == len(wm) and len(gp) == len(wp)
    for g, w in zip(gm, wm):
        assert g[0] == pytest.approx(w[0], rel=rel, nan_ok=True)
        assert g[1] == pytest.approx(w[1], rel=rel, nan_ok=True)
        assert g[2] == w[2] or (math.isnan(g[2]) and math.isnan(w[2]))
        assert g[3] == w[3]
        assert g[4] == pytest.approx(w[4], rel=rel, nan_ok=True)
    for g, w in zip(gp, wp):
        assert g[0] == pytest.approx(w[0], rel=rel, abs=1e-300, nan_ok=True) and g[1:] == w[1:]


def counted(*args, **kw) -> tuple[tuple[list, list], dict[str, int]]:
    """run(*args, **kw) and how often each path ran in it."""
    before = dict(sel.COUNTS)
    r = run(*args, **kw)
    return r, {k: sel.COUNTS[k] - before[k] for k in before}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_random_task_vectors(dtype):
    g = torch.Generator().manual_seed(0)
    for n in (20_000, 150_000):
        base = torch.randn(n, generator=g).to(dtype)
        xs = [(base.double() + s * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)
              for s in (0.01, 0.003, 0.05)]
        r, c = counted(base, xs)
        same(r, reference(base, xs))
        assert c == {"bracket": 1, "fallback": 0}


def test_quantised_task_vectors_with_many_ties():
    """τ from a few values (most entries tied at the boundaries of every fraction), zeros too."""
    g = torch.Generator().manual_seed(1)
    n = 200_000
    base = torch.randn(n, generator=g)
    for levels in ((0.0, 0.5, -0.5, 1.0), (0.25, -0.25), (0.0,) * 9 + (2.0,)):
        lv = torch.tensor(levels)
        xs = [base + lv[torch.randint(len(levels), (n,), generator=g)] * s for s in (1.0, 0.125)]
        r, c = counted(base, xs)
        same(r, reference(base, xs))
        assert c == {"bracket": 1, "fallback": 0}
    bf = base.to(torch.bfloat16)  # bfloat16 fine-tunes: τ quantised by the stored precision
    xs = [(bf.float() + 0.01 * torch.randn(n, generator=g)).to(torch.bfloat16) for _ in range(2)]
    same(run(bf, xs), reference(bf, xs))


def test_a_missed_bracket_or_an_overflowing_list_falls_back(monkeypatch):
    g = torch.Generator().manual_seed(2)
    n = 100_000
    base = torch.randn(n, generator=g)
    xs = [base + 0.01 * torch.randn(n, generator=g) for _ in range(2)]
    want = reference(base, xs)

    def adversarial(smp: np.ndarray) -> None:  # a sample that sees only the smallest τ²
        smp[:] = np.sort(smp[:, :1], axis=1)

    for tamper in (adversarial, lambda smp: smp.__imul__(4.0), lambda smp: smp.__imul__(0.25)):
        r, c = counted(base, xs, tamper=tamper)
        same(r, want)
        assert c == {"bracket": 0, "fallback": 1}
    monkeypatch.setattr(sel, "LIST_SCALE", 0.0)
    monkeypatch.setattr(sel, "LIST_SLACK", sel.CHUNK)
    r, c = counted(base, xs, parts=2)
    same(r, want)
    assert c == {"bracket": 0, "fallback": 1}


def test_non_finite_signed_zero_and_float64_inputs():
    g = torch.Generator().manual_seed(3)
    n = 50_000
    base = torch.randn(n, generator=g)
    nan, inf = base.clone(), base.clone()
    nan[77] = float("nan")
    inf[123] = float("inf")
    for xs in ([nan, base + 0.1], [inf, base + 0.1], [inf, nan]):
        b, arrs = flat(base, torch.float32), [flat(x, torch.float32) for x in xs]
        got = sel.bracket_stats(b, arrs, FRACTIONS, False, 2)
        same(got, fused_stats(b, arrs, FRACTIONS, False, 2), rel=0)  # today's results, exactly
    zero = torch.zeros(n)
    negz = torch.full((n,), -0.0)
    xs = [negz, zero, zero + 1e-3 * torch.randn(n, generator=g)]
    same(run(zero, xs), reference(zero, xs))
    assert run(zero, xs)[0][0][3] == n  # −0 − 0 is a zero of τ
    b64 = torch.randn(n, generator=g, dtype=torch.float64)
    xs = [b64 + 1e-170 * torch.randn(n, generator=g, dtype=torch.float64), b64.clone()]
    xs[1][:10] += 1e-9
    same(run(b64, xs), reference(b64, xs))  # τ² that underflow to 0 are not zeros of τ


def test_parts_equal_one_part():
    g = torch.Generator().manual_seed(4)
    n = 123_457
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    xs = [(base.float() + 0.02 * torch.randn(n, generator=g)).to(torch.bfloat16) for _ in range(3)]
    one = run(base, xs, parts=1)
    for parts in (2, 5):
        same(run(base, xs, parts=parts), one, rel=1e-12)
    same(one, reference(base, xs))


def test_periodic_and_sparse_task_vectors_take_the_one_pass(monkeypatch):
    """A layout period equal to the sampling step (only every 64th entry changed, or every
    64th kept), rows of very different scales and sparse τ (1 % non-zero: the 1 % fraction's
    k-th largest at the edge of the zeros): exact, and no fallback (the sample is stratified
    at hashed places, not every 64th entry)."""
    monkeypatch.setattr(sel, "SAMPLE_MIN", 1024)  # step 64 at this size, as for large tensors
    g = torch.Generator().manual_seed(5)
    r, c = 512, 256
    base = torch.randn(r, c, generator=g)
    idx = torch.arange(r * c).reshape(r, c)
    noise = 1e-2 * torch.randn(r, c, generator=g)
    scales = 10.0 ** (torch.arange(r) % 7).float().unsqueeze(1) * 1e-3
    for tau in ((idx % 64 == 0) * noise, (idx % 64 != 0) * noise, scales * noise / 1e-2,
                (torch.rand(r, c, generator=g) < 0.01) * noise):
        for dtype in (torch.float32, torch.bfloat16):
            b, xs = base.to(dtype), [(base + tau).to(dtype)]
            assert sel.sample_step(b.numel()) == sel.SAMPLE_STEP == 64
            got, c_ = counted(b, xs, parts=2)
            same(got, reference(b, xs))
            assert c_ == {"bracket": 1, "fallback": 0}
