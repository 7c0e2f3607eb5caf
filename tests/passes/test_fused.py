"""Elementwise fusion (fuse.py, kernels_fused.py): fused plans give the unfused plans' bits.

The reference is the same recipe run with fusion off (`MERGELANG_FUSE=0`: torch's kernels, one op
at a time), on inputs full of special values (signed zeros, infinities, NaN, subnormals, ties).
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mergelang as ml
from mergelang import api
from mergelang.passes import fuse
from mergelang.runtime.kernels import numba_codegen as kernels_fused
from mergelang.runtime.kernels import numba_topk as kernels_select
from mergelang.passes.chunking import chunk_plan
from mergelang.runtime.executor import fused_for
from mergelang.ir.ops import Op

SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, -2.5, 1e-3, -1e-3, 3e-39, -3e-39, 1e30, -1e30,
           float("inf"), -float("inf"), float("nan"), 7.0, 7.0, -7.0]

EXPRS = [
    "ties(base, [a, b, c], weights = [1, 0.5, 2], density = 0.5)",
    "ties(base, [a, b], density = 0.5, majority_sign_method = \"frequency\")",
    "ties(base, [a, b], density = [0.3, 1.0])",  # one k = n: the selection's plain path
    "base + where(topk_mask(abs(a - base), 0.3), a - base, 0)",  # one model, no stack
    # a selection over a value that is recomputed by a region that feeds a second selection
    "base + where(topk_mask(abs(where(topk_mask(abs(a - base), 0.5), a - base, 0) * 2), 0.3), a - base, 0)",
    # a signed selection (no |x|), one k per model
    "base + sum(where(topk_mask([a, b] - base, [0.25, 0.75]), [a, b] - base, 0), over = \"models\")",
    "linear([base, a, b])",
    "task_arithmetic(base, [a, b, c], lambda = 0.7)",
    "where(a > b, a - b, sqrt(abs(b)) / a)",
    "maximum(a * b, 1.5) + minimum(-a, -0.25) - sign(b - a)",
    "where((a >= b) and not (b == c) or a != c, base, -c)",
    "base + sum(where(sign([a, b, c] - base) == 1, [a, b, c] - base, 0), over = \"models\")"
    " / maximum(count([a, b, c] - base, over = \"models\"), 1)",
]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit for bit, except that a NaN may carry another payload (documented)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    nx, ny = torch.isnan(x), torch.isnan(y)
    return torch.equal(nx, ny) and torch.equal(_bits(x)[~nx], _bits(y)[~ny])


@pytest.fixture
def fuse_small(monkeypatch):
    """Fuse small tensors too, and count the fused steps that run."""
    monkeypatch.setattr(fuse, "MIN_ELEMENTS", 1)
    calls = {"n": 0}
    real = kernels_fused.run

    def counting(node, args):
        calls["n"] += 1
        return real(node, args)

    monkeypatch.setattr(kernels_fused, "run", counting)
    return calls


def _models(draw, n: int, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for m in ("base", "a", "b", "c"):
        vals = draw(st.lists(st.one_of(st.sampled_from(SPECIAL),
                                       st.floats(width=32, allow_nan=True, allow_infinity=True)),
                             min_size=n, max_size=n))
        out[m] = {"w": torch.tensor(vals, dtype=torch.float32).reshape(4, n // 4).to(dtype)}
    return out


def _both(monkeypatch, expr, models, dtype=None):
    used = {m: sd for m, sd in models.items() if m == "base" or re.search(rf"\b{m}\b", expr)}
    fused = ml.merge(expr, dtype=dtype, **used)
    monkeypatch.setenv("MERGELANG_FUSE", "0")
    plain = ml.merge(expr, dtype=dtype, **used)
    monkeypatch.delenv("MERGELANG_FUSE")
    return fused, plain


@pytest.mark.parametrize("expr", EXPRS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       out=st.sampled_from([None, "float32"]))
def test_fused_equals_unfused(fuse_small, monkeypatch, expr, data, dtype, out):
    models = _models(data.draw, 48, dtype)
    before = fuse_small["n"]
    fused, plain = _both(monkeypatch, expr, models, out)
    assert fuse_small["n"] > before, "nothing was fused"
    for k in plain:
        assert _same(fused[k], plain[k]), _diff(fused[k], plain[k], models, k)


def _diff(x, y, models, k):
    bad = ((_bits(x) != _bits(y)) & ~(torch.isnan(x) & torch.isnan(y))) | (torch.isnan(x) != torch.isnan(y))
    idx = bad.nonzero()[:4].tolist()
    return [(i, float(x[tuple(i)]), float(y[tuple(i)]),
             {m: float(sd[k][tuple(i)]) for m, sd in models.items()}) for i in idx]


def test_real_sizes_fuse_by_default(monkeypatch):
    """Without lowering the threshold: 300x260 tensors fuse, small ones take the plain kernels."""
    gen = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(300, 260, generator=gen), "n": torch.randn(8, generator=gen)}
    sds = {m: {k: (v + torch.randn(v.shape, generator=gen) * 1e-2).to(torch.bfloat16)
               for k, v in base.items()} for m in ("a", "b")}
    models = {"base": {k: v.to(torch.bfloat16) for k, v in base.items()}, **sds}
    seen = []
    real = kernels_fused.run
    monkeypatch.setattr(kernels_fused, "run", lambda node, args: seen.append(node.type) or real(node, args))
    fused, plain = _both(monkeypatch, "ties(base, [a, b], density = 0.4)", models)
    assert seen and all(t.shape == (300, 260) for t in seen)
    for k in plain:
        assert torch.equal(_bits(fused[k]), _bits(plain[k])), k


def _plan(tmp_path, expr: str, n_models: int = 3, shape=(512, 256)):
    from safetensors.torch import save_file

    names = ["base", "a", "b", "c", "d", "e"][:n_models]
    for m in names:
        (tmp_path / m).mkdir()
        w = torch.randn(shape, generator=torch.Generator().manual_seed(len(m))).to(torch.bfloat16)
        save_file({"w": w}, tmp_path / m / "model.safetensors")
    lines = [f'model {m} = "{tmp_path / m}"' for m in names]
    lines.append(f'merge from base {{\n    "*" => {expr}\n}}\n')
    (tmp_path / "r.mrg").write_text("\n".join(lines))
    plan = api.compile(str(tmp_path / "r.mrg")).compilation.plan
    return plan, fused_for(plan, torch.device("cpu"))


def _ops(plan):
    return [plan.graph.node(s.nid) for s in plan.steps]


def test_ties_plan_shape(tmp_path):
    """ties: the task vectors are never stored. The top-k is a FUSED selection that recomputes
    them from the bf16 inputs (read in place) in each pass; the election and the disjoint mean
    are one loop that recomputes them too and stores bfloat16."""
    plan, fused = _plan(tmp_path, "ties(base, [a, b], density = 0.5)")
    nodes = _ops(fused)
    kinds = [n.op for n in nodes]
    assert kinds.count(Op.FUSED) == 2 and Op.TOPK_MASK not in kinds
    assert all(n.type.dtype == "bfloat16" and n.attrs.get("view") for n in nodes if n.op is Op.LOAD)
    select, merge = [n for n in nodes if n.op is Op.FUSED]
    assert select.attrs["select"] == (0.5, True) and select.type.dtype == "bool"  # |tv| ranked
    assert [c for c, *_ in select.attrs["body"]] == ["stack", "sub"]
    assert merge.type.dtype == "bfloat16" and merge.attrs.get("select") is None
    assert {c for c, *_ in merge.attrs["body"]} >= {"stack", "sub", "where", "sign", "sum", "div"}
    assert not {Op.WHERE, Op.SIGN, Op.REDUCE, Op.STACK, Op.ABS, Op.SUB} & set(kinds)
    assert fused.peak_bytes < plan.peak_bytes


def test_linear_is_one_loop(tmp_path):
    plan, fused = _plan(tmp_path, "linear([base, a, b])")
    kinds = sorted(n.op.value for n in _ops(fused))
    assert kinds == sorted(["load"] * 3 + ["const", "fused", "output"])
    assert all(n.attrs.get("view") for n in _ops(fused) if n.op is Op.LOAD)  # read in place
    assert not any(n.attrs.get("view") for n in _ops(plan) if n.op is Op.LOAD)


def test_view_loads_are_copy_on_write_maps(tmp_path):
    """`load_as(view=True)` hands out the file's bytes without a copy; a write to the view never
    reaches the file; rows too; a conversion still copies; the view outlives the source."""
    from safetensors.torch import load_file, save_file

    from mergelang.io.locate import open_model

    w = torch.randn(300, 70, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    save_file({"pad": torch.zeros(3, dtype=torch.uint8), "w": w}, tmp_path / "model.safetensors")
    src = open_model("m", tmp_path)
    v = src.load_as("w", None, view=True)
    rows = src.load_rows("w", None, 100, 130, view=True)
    f = src.load_as("w", torch.float32, view=True)
    src.close()
    assert torch.equal(_bits(v), _bits(w)) and torch.equal(_bits(rows), _bits(w[100:130]))
    assert f.dtype == torch.float32 and torch.equal(f, w.float())
    v.fill_(1.0)
    rows.fill_(2.0)
    assert torch.equal(_bits(load_file(tmp_path / "model.safetensors")["w"]), _bits(w))


def test_no_fusion_where_it_would_change_bits(tmp_path):
    # a sum over 5 models: torch groups the rows differently, so it stays a torch reduction
    plan, fused = _plan(tmp_path, "linear([base, a, b, c, d])", n_models=5)
    assert any(n.op is Op.REDUCE for n in _ops(fused))
    # minimum of two tensors (+0 against -0 differs between torch's own code paths): not fused
    (tmp_path / "x").mkdir()
    plan, fused = _plan(tmp_path / "x", "minimum(a, b) * 2 + 1")
    assert any(n.op is Op.MINIMUM for n in _ops(fused))


def test_small_tensors_and_switch_off(tmp_path, monkeypatch):
    plan, fused = _plan(tmp_path, "linear([base, a, b])", shape=(64, 64))
    assert fused is plan  # 4096 elements: below fuse.MIN_ELEMENTS
    (tmp_path / "y").mkdir()
    monkeypatch.setenv("MERGELANG_FUSE", "0")
    plan, fused = _plan(tmp_path / "y", "linear([base, a, b])")
    assert fused is plan


def test_row_chunks_fuse_and_match(tmp_path, monkeypatch):
    """A plan split into row chunks by a memory budget fuses chunk by chunk, same bytes out."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from mergelang.cli import main

    plan, _ = _plan(tmp_path, "task_arithmetic(base, [a, b], lambda = 0.7)", shape=(8192, 256))
    chunked = chunk_plan(plan, 12 << 20).plan
    fused = fused_for(chunked, torch.device("cpu"))
    assert sum(n.op is Op.FUSED for n in _ops(fused)) > 2
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MERGELANG_FUSE", flag)
        res = CliRunner().invoke(main, ["run", str(tmp_path / "r.mrg"), "-o", str(tmp_path / f"o{flag}"),
                                        "-q", "--memory-budget", "12MB"])
        assert res.exit_code == 0, res.output
        outs[flag] = load_file(tmp_path / f"o{flag}" / "model-00001-of-00001.safetensors")["w"]
    assert torch.equal(_bits(outs["1"]), _bits(outs["0"]))


def test_bf16_conversions_are_torchs():
    """narrow_bf16 rounds like torch's float32 -> bfloat16 cast on every kind of bit pattern
    (random, each exponent with a halfway and a just-below-halfway mantissa, NaN, inf, zeros),
    and widen_bf16 inverts torch's bfloat16 -> float32 exactly."""
    src = ("import numpy as np\nfrom numba import njit\n"
           "from mergelang.runtime.kernels.numba_runtime import narrow_bf16, widen_bf16\n"
           "@njit(nogil=True, cache=True, error_model='numpy', boundscheck=False)\n"
           "def kernel(lo, hi, n, out, a0, a1, w):\n"
           "    for i in range(lo, hi):\n"
           "        out[i] = narrow_bf16(a0[i])\n"
           "        w[i] = widen_bf16(a1[i])\n")
    fn = kernels_fused.compiled(src)
    gen = torch.Generator().manual_seed(0)
    hi = torch.arange(1 << 16, dtype=torch.int32) << 16
    bits = torch.cat([torch.randint(-2**31, 2**31 - 1, (1 << 18,), generator=gen, dtype=torch.int64)
                      .to(torch.int32), hi | 0x8000, hi | 0x7FFF, hi | 0x18000 & 0xFFFF, hi])
    x = bits.view(torch.float32)
    out = np.empty(x.numel(), np.uint16)
    h = x.to(torch.bfloat16)
    widened = np.empty(x.numel(), np.float32)
    fn(0, x.numel(), x.numel(), out, x.numpy(), h.view(torch.int16).numpy().view(np.uint16), widened)
    assert np.array_equal(out, h.view(torch.int16).numpy().view(np.uint16))
    assert torch.equal(torch.from_numpy(widened).view(torch.int32), h.to(torch.float32).view(torch.int32))


@pytest.mark.parametrize("density", [0.3, 0.5, 0.71])
def test_selection_ties_at_the_threshold(monkeypatch, density):
    """Task vectors with few distinct magnitudes (most entries tie at the threshold): the fused
    selection keeps exactly the lowest-index ties, as the plain top-k does, and the result is
    the reference int(density * n) entries per model."""
    gen = torch.Generator().manual_seed(7)
    small = lambda: torch.randint(-3, 4, (256, 300), generator=gen).float().to(torch.bfloat16)  # noqa: E731
    models = {m: {"w": small()} for m in ("base", "a", "b")}
    seen = []
    real = kernels_select.run_select
    monkeypatch.setattr(kernels_select, "run_select", lambda node, args: seen.append(1) or real(node, args))
    expr = f"ties(base, [a, b], density = {density})"
    fused, plain = _both(monkeypatch, expr, models)
    assert seen, "the selection did not run fused"
    assert torch.equal(_bits(fused["w"]), _bits(plain["w"]))
    # independent reference of the selection itself: a stable sort by |tv|, descending
    base = models["base"]["w"].float().reshape(-1)
    for m in ("a", "b"):
        tv = models[m]["w"].float().reshape(-1) - base
        k = int(density * tv.numel())
        order = sorted(range(tv.numel()), key=lambda i: (-abs(float(tv[i])), i))
        want = torch.zeros(tv.numel(), dtype=torch.bool)
        want[order[:k]] = True
        got = kernels_select.run_select(_select_node(tv.numel(), density),
                                        [models[x]["w"].reshape(-1) for x in ("a", "b", "base")])
        assert torch.equal(got[0 if m == "a" else 1], want), m


def _select_node(n: int, density, absolute: bool = True) -> SimpleNamespace:
    """The fused selection of ties' task vectors: topk_mask(stack([a, b]) - base)."""
    from mergelang.ir.types import TType

    return SimpleNamespace(attrs={"body": (("stack", (("in", 0), ("in", 1)), True, "float32"),
                                           ("sub", (("v", 0), ("in", 2)), True, "float32")),
                                  "inputs": ("elem", "elem", "elem"), "models": 2,
                                  "select": (density, absolute)},
                           type=TType((n,), "bool", 2))


def _split_into(monkeypatch, parts: int) -> list:
    """Kernels split over `parts` threads from 1000 elements on; returns the list that gets one
    entry per model the split selection settles (`kernels_fused_rt.settle` spied on)."""
    from mergelang.runtime.kernels import numba_runtime as kernels_fused_rt

    monkeypatch.setattr(kernels_fused, "PARALLEL_ELEMENTS", 1000)
    monkeypatch.setattr(kernels_fused, "THREADS", parts)
    settled, real = [], kernels_fused_rt.settle
    monkeypatch.setattr(kernels_fused_rt, "settle", lambda *args: settled.append(1) or real(*args))
    return settled


def _stable_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Independent reference: the k largest, ties by lowest index (a stable descending sort)."""
    order = np.argsort(-x.double().numpy(), kind="stable")
    want = torch.zeros(x.numel(), dtype=torch.bool)
    want[torch.from_numpy(order[:k].copy())] = True
    return want


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("spread", ["wide", "few", "mixed"])
@pytest.mark.parametrize("density,absolute", [(0.3, True), ((0.5, 0.71), True), (0.2, False)])
def test_split_selection_matches_a_stable_sort(monkeypatch, parts, spread, density, absolute):
    """The fused selection against a stable sort: with 3 threads for 2 models the split form
    (kernels_select.py) runs over 3 parts of the range, "wide" values listing each model's
    threshold bucket, "few" distinct values (a third of the entries tie) making it too large to
    list (the per-model form runs), "mixed" one of each; with 1 or 2 threads, the per-model
    form for both."""
    settled = _split_into(monkeypatch, parts)
    gen = torch.Generator().manual_seed(11)
    n = 40_000
    wide = lambda: (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)  # noqa: E731
    few = lambda: torch.randint(-1, 2, (n,), generator=gen).float().to(torch.bfloat16)  # noqa: E731
    base, a, b = (wide(), wide(), wide()) if spread == "wide" else (few(), few(), few())
    if spread == "mixed":
        b = wide()
    got = kernels_select.run_select(_select_node(n, density, absolute), [a, b, base])
    dens = density if isinstance(density, tuple) else (density, density)
    for m, x in enumerate((a, b)):
        tv = x.float() - base.float()
        assert torch.equal(got[m], _stable_topk(tv.abs() if absolute else tv, int(dens[m] * n))), m
    listed = {"wide": 2, "few": 0, "mixed": 1}[spread] if parts > 2 else 0
    assert len(settled) == listed  # the form each model took


@pytest.mark.parametrize("parts", [2, 3])
def test_selection_with_nan_takes_the_plain_path(monkeypatch, parts):
    _split_into(monkeypatch, parts)
    gen = torch.Generator().manual_seed(5)
    n = 30_000
    a, b, base = ((torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16) for _ in range(3))
    b[n - 3] = float("nan")  # in the second part
    got = kernels_select.run_select(_select_node(n, 0.4), [a, b, base])
    from mergelang.runtime.kernels.table import _topk_mask
    from mergelang.ir.types import TType

    plain = SimpleNamespace(attrs={"density": 0.4, "over": "tensor", "abs": True},
                            type=TType((n,), "bool", 2))
    assert torch.equal(got, _topk_mask(plain, [torch.stack([a, b]).float() - base.float()]))
    assert got[1].sum() == int(0.4 * n)


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_one_model_selection_uses_every_thread_and_matches_a_stable_sort(monkeypatch, parts):
    """topk_mask(a - base) of one model (no model axis): with 2 or 4 threads the split form cuts
    the range into parts (the per-model form would use one thread)."""
    settled = _split_into(monkeypatch, parts)
    gen = torch.Generator().manual_seed(2)
    n = 50_001
    a, base = ((torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16) for _ in range(2))
    from mergelang.ir.types import TType

    ty = TType((n,), "bool")
    node = SimpleNamespace(attrs={"body": (("sub", (("in", 0), ("in", 1)), False, "float32"),),
                                  "inputs": ("elem", "elem"), "models": 0, "select": (0.35, True)},
                           type=ty)
    got = kernels_select.run_select(node, [a, base])
    assert got.shape == (n,)
    assert torch.equal(got, _stable_topk((a.float() - base.float()).abs(), int(0.35 * n)))
    assert len(settled) == (1 if parts > 1 else 0)
