"""Property tests for the torch kernels: the exact top-k mask and the reductions over each scope,
against independent references (a stable argsort; per-slice Python/float64 loops)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergelang as ml
from mergelang.runtime.kernels.table import reduce, topk_mask_rows

# small integers produce many ties in magnitude; floats in between exercise the general case
VALUES = st.one_of(st.integers(-3, 3).map(float),
                   st.floats(-4, 4, allow_nan=False, allow_subnormal=False, width=32))
DENSITY = st.one_of(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 1.0]),
                    st.floats(0, 1, allow_nan=False))


def reference_mask(x: list[float], density: float) -> list[bool]:
    """Keep exactly int(density * n) entries with the largest |x|; ties: lowest index first."""
    n = len(x)
    k = int(density * n)
    order = sorted(range(n), key=lambda i: (-abs(x[i]), i))  # Python's sort is stable anyway
    kept = set(order[:k])
    return [i in kept for i in range(n)]


@settings(max_examples=150, deadline=None)
@given(x=st.lists(VALUES, min_size=1, max_size=40), density=DENSITY)
def test_topk_mask_exact(x: list[float], density: float):
    t = torch.tensor(x, dtype=torch.float32).abs()
    k = int(density * len(x))
    mask = topk_mask_rows(t.reshape(1, -1), k).reshape(-1)
    assert int(mask.sum()) == k
    kept, dropped = t[mask], t[~mask]
    if len(kept) and len(dropped):
        assert kept.min() >= dropped.max()
    assert mask.tolist() == reference_mask(t.tolist(), density)
    # the same as a stable descending argsort
    order = torch.argsort(t, descending=True, stable=True)
    ref = torch.zeros(len(x), dtype=torch.bool)
    ref[order[:k]] = True
    assert torch.equal(mask, ref)


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 9), data=st.data(), density=DENSITY)
def test_topk_mask_rows(rows: int, cols: int, data, density: float):
    x = data.draw(st.lists(VALUES, min_size=rows * cols, max_size=rows * cols))
    t = torch.tensor(x, dtype=torch.float32).reshape(rows, cols).abs()
    k = int(density * cols)
    mask = topk_mask_rows(t, k)
    assert mask.shape == t.shape and mask.dtype == torch.bool
    for r in range(rows):
        assert mask[r].tolist() == reference_mask(t[r].tolist(), density)
        assert int(mask[r].sum()) == k


@settings(max_examples=40, deadline=None)
@given(data=st.data(), density=st.sampled_from([0.0, 0.2, 0.5, 0.75, 1.0]))
def test_topk_mask_through_the_language(data, density: float):
    """`where(topk_mask(abs(x), d), x, 0)` per model of a stack (each model its own top-k)."""
    n = 12
    xs = [torch.tensor(data.draw(st.lists(VALUES, min_size=n, max_size=n)),
                       dtype=torch.float32).reshape(3, 4) for _ in range(2)]
    out = ml.merge(f"sum(where(topk_mask(abs([a, b]), {density}), [a, b], 0), over = \"models\")",
                   a={"t": xs[0]}, b={"t": xs[1]})["t"]
    expected = torch.zeros(3, 4)
    for x in xs:
        m = torch.tensor(reference_mask(x.reshape(-1).tolist(), density)).reshape(3, 4)
        expected += torch.where(m, x, torch.zeros(()))
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------
# reductions


def _py_reduce(kind: str, xs: list[float]) -> float:
    if kind == "sum":
        return math.fsum(xs)
    if kind == "mean":
        return math.fsum(xs) / len(xs)
    if kind == "max":
        return max(xs)
    if kind == "min":
        return min(xs)
    if kind == "count":
        return float(sum(1 for v in xs if v != 0))
    if kind == "l1":
        return math.fsum(abs(v) for v in xs)
    if kind == "l2":
        return math.sqrt(math.fsum(v * v for v in xs))
    raise ValueError(kind)


def reference_reduce(x: torch.Tensor, kind: str, over: str, stacked: bool) -> torch.Tensor:
    """Per-slice Python reductions in float64; shapes: models -> element shape, tensor -> one
    value (per model for a stack), rows -> (..., r, 1), cols -> (..., 1, c)."""
    xd = x.double()
    if over == "models":
        m = xd.shape[0]
        flat = xd.reshape(m, -1)
        vals = [_py_reduce(kind, flat[:, j].tolist()) for j in range(flat.shape[1])]
        return torch.tensor(vals, dtype=torch.float64).reshape(xd.shape[1:])
    if over == "tensor":
        if stacked:
            return torch.tensor([_py_reduce(kind, xd[i].reshape(-1).tolist())
                                 for i in range(xd.shape[0])], dtype=torch.float64)
        return torch.tensor(_py_reduce(kind, xd.reshape(-1).tolist()), dtype=torch.float64)
    if over == "cols":
        return reference_reduce(xd.transpose(-1, -2), kind, "rows", stacked).transpose(-1, -2)
    lead = xd.shape[:-1]
    rows = xd.reshape(-1, xd.shape[-1])
    vals = [_py_reduce(kind, rows[i].tolist()) for i in range(rows.shape[0])]
    return torch.tensor(vals, dtype=torch.float64).reshape(*lead, 1)


KINDS = ["sum", "mean", "max", "min", "count", "l1", "l2"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("over", ["models", "tensor", "rows", "cols"])
@pytest.mark.parametrize("stacked", [True, False])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_reduce_matches_reference(kind: str, over: str, stacked: bool, data):
    if over == "models" and not stacked:
        return
    m, r, c = (data.draw(st.integers(1, 4)) for _ in range(3))
    shape = (m, r, c) if stacked else (r, c)
    n = math.prod(shape)
    x = torch.tensor(data.draw(st.lists(VALUES, min_size=n, max_size=n)),
                     dtype=torch.float32).reshape(shape)
    got = reduce(x, kind, over, stacked)
    want = reference_reduce(x, kind, over, stacked)
    assert got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_reduce_through_the_language(kind: str):
    """The language's reductions over every scope on a stack and on one tensor."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    a[0, 0] = 0.0  # count sees a zero
    stack = torch.stack([a, b])
    exprs = {
        f'{kind}([a, b], over = "models")': reference_reduce(stack, kind, "models", True),
        f'a * 0 + {kind}(a, over = "tensor")': reference_reduce(a, kind, "tensor", False).expand(3, 5),
        f'a * 0 + {kind}(b, over = "rows")': reference_reduce(b, kind, "rows", False).expand(3, 5),
        f'a * 0 + {kind}(a, over = "cols")': reference_reduce(a, kind, "cols", False).expand(3, 5),
        f'sum({kind}([a, b], over = "rows") + b * 0, over = "models")':
            reference_reduce(stack, kind, "rows", True).expand(2, 3, 5).sum(0),
        f'sum({kind}([a, b], over = "tensor") * [1, 1], over = "models") + a * 0':
            reference_reduce(stack, kind, "tensor", True).sum().expand(3, 5),
    }
    for expr, want in exprs.items():
        got = ml.merge(expr, a={"t": a}, b={"t": b})["t"]
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5,
                                   msg=lambda msg: f"{expr}: {msg}")
