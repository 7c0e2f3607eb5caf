"""PCB-merging (`pcb`) and `model_quantile_value` (stats.py).

The reference is the pcb-merging repo's `PCB_merge` written here in plain torch over the
concatenation of a whole model's task vectors (flattened, in tensor order), then split back.
"""

from __future__ import annotations

import pytest
import torch

import helpers
import mergelang as ml
from mergelang.passes import stats
from mergelang.diagnostics import MergelangError

SHAPES = {"embed.weight": (40, 30), "layers.0.mlp.weight": (5, 4, 3), "layers.0.bias": (7,),
          "norm.weight": (6,), "one": (1,)}


def make_sd(seed: int, shapes=SHAPES) -> dict[str, torch.Tensor]:
    return helpers.make_sd(seed, shapes)


def _normalize(x):
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    return (x - lo) / (hi - lo)


def _clamp(x, min_ratio, max_ratio):
    d = x.shape[1]
    s = torch.sort(x, dim=1).values
    return torch.clamp(x, s[:, int(d * min_ratio)].unsqueeze(1),
                       s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1))


def reference_pcb(base, models, names, ratio=0.1, lam=1.0):
    flat = torch.stack([torch.cat([(m[n] - base[n]).reshape(-1) for n in names]) for m in models])
    n = flat.shape[0]
    mag = _clamp(flat.abs(), 0.0001, 0.0001)
    clipped = torch.sign(flat) * mag
    intra = torch.exp(n * _normalize(mag) ** 2)
    inter = torch.tanh(flat * flat.sum(dim=0))
    scale = _normalize(_clamp(intra * inter, 1 - ratio, 0))
    tv = (clipped * scale).sum(dim=0) / torch.clamp(scale.sum(dim=0), min=1e-12)
    out, i = {}, 0
    for name in names:
        numel = base[name].numel()
        out[name] = base[name] + lam * tv[i:i + numel].reshape(base[name].shape)
        i += numel
    return out


def _check(out, want):
    for n, w in want.items():
        torch.testing.assert_close(out[n], w, rtol=1e-6, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.fixture(params=["buffer", "radix"])
def select(request, monkeypatch):
    if request.param == "radix":
        monkeypatch.setattr(stats, "BUFFER_LIMIT", 0)
    return request.param


@pytest.mark.parametrize("ratio", [0.1, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("count", [2, 3])
def test_pcb_matches_reference(ratio, count, select):
    base, *ms = (make_sd(s) for s in range(count + 1))
    env = {f"m{i}": m for i, m in enumerate(ms)}
    names = ", ".join(env)
    out = ml.merge(f"pcb(base, [{names}], ratio = {ratio}, lambda = 0.8)", base=base, **env)
    _check(out, reference_pcb(base, ms, list(SHAPES), ratio, 0.8))


def test_pcb_large_model_clips_the_extremes():
    """10^4+ entries per model: the 0.01% clipping really moves values (not a no-op)."""
    shapes = {"w": (120, 100), "b": (50,)}
    base, a, b = (make_sd(s, shapes) for s in range(3))
    a["w"][0, 0] = 1e3
    out = ml.merge("pcb(base, [a, b], ratio = 0.2)", base=base, a=a, b=b)
    want = reference_pcb(base, [a, b], list(shapes), 0.2)
    _check(out, want)
    assert out["w"][0, 0] - base["w"][0, 0] < 100  # clipped, not 1e3


def test_pcb_single_model_and_routing():
    base, a = make_sd(0), make_sd(1)
    out = ml.merge("pcb(base, [a])", base=base, a=a)
    _check(out, reference_pcb(base, [a], list(SHAPES)))
    # only the tensors routed to pcb form the model-wide statistics
    b = make_sd(2)
    a["norm.weight"] *= 1000  # would dominate the statistics if norms took part
    text = ('model base = "<memory>"\nmodel a = "<memory>"\nmodel b = "<memory>"\n'
            'merge from base {\n  "*norm*" => base\n  "*" => pcb(base, [a, b], ratio = 0.3)\n}\n')
    out = ml.compile(text, base=base, a=a, b=b).evaluate()
    names = [n for n in SHAPES if "norm" not in n]
    _check({n: out[n] for n in names}, reference_pcb(base, [a, b], names, 0.3))
    assert torch.equal(out["norm.weight"], base["norm.weight"])


def test_pcb_identical_models_give_base_plus_tv_not_nan():
    """All clipped magnitudes equal: the repo divides 0 by 0 (NaN); mergelang takes 0."""
    base = {k: torch.full_like(v, 0.25) for k, v in make_sd(0).items()}
    a = {k: v + 0.5 for k, v in base.items()}  # every task-vector entry is exactly 0.5
    out = ml.merge("pcb(base, [a, a])", base=base, a=a)
    for n in SHAPES:
        assert torch.isfinite(out[n]).all()
        torch.testing.assert_close(out[n], base[n])  # every weight is 0 -> merged 0


def test_pcb_errors():
    base, a = make_sd(0), make_sd(1)
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(MergelangError) as info:
            ml.merge(f"pcb(base, [a], ratio = {bad})", base=base, a=a)
        assert "ratio" in str(info.value)


def test_model_quantile_value_positions(select):
    g = torch.Generator().manual_seed(5)
    shapes = {"p": (37, 11), "q": (200,), "r": (3, 3, 3)}
    x = {n: torch.randn(s, generator=g).round(decimals=1) for n, s in shapes.items()}
    flat = torch.sort(torch.cat([v.reshape(-1) for v in x.values()])).values
    d = flat.numel()
    for frac, off in ((0.0, 0), (0.0001, 0), (0.9999, -1), (0.5, 0), (1.0, -1), (1.0, 0),
                      (0.0, -3), (0.3, 2)):
        want = flat[min(max(int(d * frac) + off, 0), d - 1)]
        out = ml.merge(f"x * 0 + model_quantile_value(x, {frac}, offset = {off})", x=x)
        for n in shapes:
            assert torch.equal(out[n], torch.full(shapes[n], float(want))), (frac, off, n)


def test_model_quantile_value_errors():
    x = make_sd(0)
    with pytest.raises(MergelangError) as info:
        ml.merge("model_quantile_value(x, 0.5, offset = 0.5)", x=x)
    assert "E230" in info.value.codes
    with pytest.raises(MergelangError) as info:
        ml.merge("model_quantile_value(x, 2)", x=x)
    assert "E220" in info.value.codes
    with pytest.raises(MergelangError) as info:
        ml.merge("where(model_quantile_value(x > 0, 0.5) > 0, x, x)", x=x)
    assert "E221" in info.value.codes
