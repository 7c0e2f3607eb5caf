"""The fast CPU paths are bit-identical to plain torch: the kernels of `kernels_fast.py` against
the torch op they replace, the whole-tensor top-k mask against an independent stable-argsort
reference, the lazy stack sum against `torch.stack(...).sum(0)`, and whole merges with the fast
paths on against the same merges with them off (`MERGELANG_FAST=0` semantics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mergelang as ml
from mergelang.runtime import buffers as inplace
from mergelang.runtime.kernels import cpu_exact as kernels_fast
from mergelang.ir.ops import Op


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern view (distinguishes -0.0 from 0.0 and keeps NaNs comparable)."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.fixture(scope="module")
def small_ok():
    """Take the fast paths even for tiny tensors."""
    old, kernels_fast.MIN_ELEMENTS = kernels_fast.MIN_ELEMENTS, 0
    yield
    kernels_fast.MIN_ELEMENTS = old


SPECIAL = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3.5]
FLOATS = st.one_of(st.sampled_from(SPECIAL), st.floats(width=32, allow_nan=True))
SHAPES = [((4, 5), (4, 5), (4, 5)), ((2, 4, 5), (2, 4, 5), ()), ((4, 5), (), (4, 5)),
          ((2, 4, 5), (2, 1, 1), ()), ((4, 5), (), ()), ((2, 4, 5), (4, 5), (2, 4, 5)),
          ((4, 5), (2, 4, 5), ()), ((5,), (4, 5), (1,))]


def _tensor(draw, shape, elements):
    n = int(np.prod(shape)) if shape else 1
    return torch.tensor(draw(st.lists(elements, min_size=n, max_size=n)),
                        dtype=torch.float32).reshape(shape)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), shapes=st.sampled_from(SHAPES))
def test_where_is_a_bit_exact_select(small_ok, data, shapes):
    cs, xs, ys = shapes
    c = _tensor(data.draw, cs, st.booleans()).bool()
    x = _tensor(data.draw, xs, FLOATS)
    y = _tensor(data.draw, ys, FLOATS)
    got, want = kernels_fast.where(c, x, y), torch.where(c, x, y)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(bits(got), bits(want))
    for into, operand in ((1, x), (2, y)):  # in place into an operand of the result's shape
        if operand.shape == want.shape:
            copy = operand.clone()
            args = [c, x.clone() if into == 2 else copy, y.clone() if into == 1 else copy]
            got = kernels_fast.where(*args, into=into)
            assert got is copy and torch.equal(bits(copy), bits(want))


@settings(max_examples=80, deadline=None)
@given(data=st.data(), op=st.sampled_from([Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE]),
       shapes=st.sampled_from([((3, 4), (3, 4)), ((2, 3, 4), ()), ((3, 4), (2, 3, 4)), ((), (3,))]))
def test_comparisons_match_torch(small_ok, data, op, shapes):
    a = _tensor(data.draw, shapes[0], FLOATS)
    b = _tensor(data.draw, shapes[1], FLOATS)
    torch_fn = {Op.EQ: torch.eq, Op.NE: torch.ne, Op.LT: torch.lt, Op.LE: torch.le,
                Op.GT: torch.gt, Op.GE: torch.ge}[op]
    got = kernels_fast.compare(op, a, b)
    assert got is not None and got.dtype == torch.bool
    assert torch.equal(got, torch_fn(a, b))


def reference_topk(row: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries; ties: lowest index first (a stable sort on -x)."""
    order = np.argsort(-row.astype(np.float64), kind="stable")
    mask = np.zeros(row.shape, dtype=bool)
    mask[order[:k]] = True
    return mask


@pytest.mark.parametrize("path", ["radix", "partition"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), models=st.integers(1, 3), n=st.integers(2, 60),
       levels=st.sampled_from([2, 3, 7, 1000]), absolute=st.booleans())
def test_topk_mask_tensor_matches_stable_argsort(small_ok, monkeypatch, path, data, models, n, levels,
                                                 absolute):
    # few distinct levels: many ties at the threshold (as bf16 task vectors have); signed values
    # with -0.0 (equal to +0.0), and infinities
    x = torch.tensor(data.draw(st.lists(st.integers(-levels, levels), min_size=models * n,
                                        max_size=models * n)), dtype=torch.float32)
    x = (x / 7).reshape(models, n)
    x[x == 0] = data.draw(st.sampled_from([0.0, -0.0]))
    if data.draw(st.booleans()):
        x[:, 0] = data.draw(st.sampled_from([float("inf"), -float("inf"), -0.0]))
    ks = data.draw(st.lists(st.integers(1, n - 1), min_size=models, max_size=models))
    if path == "partition":
        monkeypatch.setattr(kernels_fast, "_radix", lambda absolute: None)
    else:  # numba is a dependency: the radix kernel must build (a failure would silently fall back)
        assert kernels_fast._radix(absolute) is not None
    got = kernels_fast.topk_mask_tensor(x, ks, absolute)
    assert got is not None
    ref_x = x.abs() if absolute else x
    for m in range(models):
        assert np.array_equal(got[m].numpy(), reference_topk(ref_x[m].numpy(), ks[m]))


def test_topk_mask_tensor_large_with_ties_and_nan():
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 200, (2, 300_000), generator=gen).float()  # threads and many ties
    ks = [150_000, 1234]
    got = kernels_fast.topk_mask_tensor(x, ks)
    for m in range(2):
        assert np.array_equal(got[m].numpy(), reference_topk(x[m].numpy(), ks[m]))
    x[1, 17] = float("nan")
    assert kernels_fast.topk_mask_tensor(x, ks) is None  # the caller's plain kernel handles NaN


@pytest.mark.parametrize("models", range(1, inplace.MAX_LAZY_STACK + 1))
@pytest.mark.parametrize("shape", [(1000, 33), (7,), (5, 4, 3), (3, 70_001)])
def test_lazy_stack_sum_is_torch_sum(models, shape):
    gen = torch.Generator().manual_seed(models)
    parts = [torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen) * 10 ** i
             for i in range(models)]
    for p in parts:
        p[:3] = -0.0  # torch's sum starts from +0.0: all -0.0 inputs give +0.0
    want = torch.stack(parts).sum(dim=0)
    got = inplace._sum_parts(parts)
    assert torch.equal(bits(got), bits(want))


def test_lazy_stack_limit_is_needed():
    """With one model more than the limit torch's order differs: the limit is not arbitrary."""
    gen = torch.Generator().manual_seed(5)
    parts = [torch.randn(1000, 33, generator=gen) * 10 ** (i % 4)
             for i in range(inplace.MAX_LAZY_STACK + 1)]
    assert not torch.equal(bits(inplace._sum_parts(parts)), bits(torch.stack(parts).sum(dim=0)))


RECIPES = [
    "ties(base, [a, b, c], weights = [1, 0.5, 2], density = 0.5)",
    "ties(base, [a, b], density = 0.3, lambda = 0.7, normalize = false)",
    "linear([base, a, b, c])",
    "linear([a, b], weights = [0.3, 0.7], normalize = false)",
    "task_arithmetic(base, [a, b], lambda = 0.5)",
    "consensus(base, [a, b, c])",
    "ties(base, [a, b], density = 0.5, majority_sign_method = \"frequency\")",
    "slerp(a, b, t = 0.3)",
]


def _models(dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    shapes = {"w": (300, 260), "v": (70_000,), "n": (4,), "e": (3, 5, 7)}
    base = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    out = {"base": {k: v.to(dtype) for k, v in base.items()}}
    for m in "abc":
        out[m] = {k: (v + torch.randn(v.shape, generator=gen) * 0.002).to(dtype)
                  for k, v in base.items()}
    out["a"]["w"][:5] = out["base"]["w"][:5]  # zero task vectors (signed zeros, ties at 0)
    return out


@pytest.mark.parametrize("expr", RECIPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merges_are_identical_with_fast_paths_off(monkeypatch, expr, dtype):
    models = _models(dtype)
    copies = {m: {k: v.clone() for k, v in sd.items()} for m, sd in models.items()}
    used = {m: sd for m, sd in models.items() if m in expr.replace("base", "base ")}
    fast = ml.merge(expr, **used)
    monkeypatch.setattr(kernels_fast, "ENABLED", False)
    plain = ml.merge(expr, **used)
    assert fast.keys() == plain.keys()
    for k in plain:
        assert fast[k].dtype == plain[k].dtype
        assert torch.equal(fast[k].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           plain[k].view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), k
    for m, sd in models.items():  # in-place reuse never writes into a caller's tensors
        for k, v in sd.items():
            assert torch.equal(v, copies[m][k])


def test_buffer_reuse_happens(monkeypatch):
    """The reuse is real: ties writes into dead buffers and sums a stack without building it."""
    calls = {"out": 0, "lazy": 0}
    real_run = inplace.Buffers.run

    def counting(self, node, nid, args, free):
        out = real_run(self, node, nid, args, free)
        if isinstance(out, inplace.LazyStack):
            calls["lazy"] += 1
        elif out is not None and any(out.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
                                     for a in args if isinstance(a, torch.Tensor)):
            calls["out"] += 1
        return out

    monkeypatch.setattr(inplace.Buffers, "run", counting)
    models = _models(torch.bfloat16)
    ml.merge("linear([base, a, b])", base=models["base"], a=models["a"], b=models["b"])
    assert calls["lazy"] > 0
    ml.merge("ties(base, [a, b], density = 0.5)", base=models["base"], a=models["a"], b=models["b"])
    assert calls["out"] > 0


def test_where_in_place_on_small_tensors_takes_the_plain_kernel_in_place():
    c = torch.tensor([True, False, True])
    for into in (1, 2):
        x, y = torch.tensor([1.0, -0.0, 3.0]), torch.tensor([-1.0, 2.0, 0.0])
        want = torch.where(c, x, y)
        target = (x, y)[into - 1]
        got = kernels_fast.where(c, x, y, into=into)
        assert got is target and torch.equal(bits(target), bits(want))


@settings(max_examples=200, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 3), max_size=3).map(tuple), min_size=1, max_size=4))
def test_broadcast_all_is_torch_broadcast_shapes(shapes):
    from mergelang.ir.types import broadcast_all

    try:
        want = tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        with pytest.raises(ValueError, match="do not broadcast"):
            broadcast_all(*shapes)
    else:
        assert broadcast_all(*shapes) == want
