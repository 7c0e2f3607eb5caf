"""RAM, RAM+ (tensor-local) and Arcee Fusion (mergekit's ram, ramplus_tl, arcee_fusion) against
plain per-model references written from the formulas (Arcee Fusion's in float64), `row_kl`, and the
`quantile` reduction against numpy's quantile(method="lower")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mergelang as ml

SHAPES = {"w": (6, 10), "b": (12,), "s": (1,), "c": (3, 4, 5)}


def sd(seed, sparse=0.0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in SHAPES.items():
        v = torch.randn(s, generator=g)
        if sparse:  # task vectors that are exactly zero in places: unique and shared entries
            v = torch.where(torch.rand(s, generator=g) < sparse, 0.0, v)
        out[k] = v
    return out


def ref_ram(base, models, eps=1e-5, r=None, alpha=None):
    taus = [m - base for m in models]
    contrib = [t.abs() > eps for t in taus]
    cnt = sum(c.to(torch.int64) for c in contrib)
    out = torch.zeros_like(base)
    for t, c in zip(taus, contrib):
        unique = c & (cnt == 1)
        shared = c & (cnt > 1)
        lam = 1.0
        if r is not None:
            rho = shared.sum().item() / max(unique.sum().item(), eps)
            lam = 1 + r * min(max(rho, 0.0), alpha)
        out += torch.where(unique, t * lam, 0.0)
        out += torch.where(shared, t / cnt.clamp(min=1), 0.0)
    return base + out


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ram(n):
    base = {k: torch.zeros(s) for k, s in SHAPES.items()}
    models = [sd(i + 1, sparse=0.5) for i in range(n)]
    names = [f"m{i}" for i in range(n)]
    out = ml.merge(f"ram(base, [{', '.join(names)}])", base=base, **dict(zip(names, models)))
    for k in base:
        want = ref_ram(base[k], [m[k] for m in models])
        torch.testing.assert_close(out[k], want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.5, 2.0), (1.0, 0.0)])
def test_ramplus_tl(r, alpha):
    base = sd(0)
    models = [{k: base[k] + v for k, v in sd(i, sparse=0.4).items()} for i in (1, 2, 3)]
    out = ml.merge(f"ramplus_tl(base, [a, b, c], r = {r}, alpha = {alpha})", base=base,
                   a=models[0], b=models[1], c=models[2])
    for k in base:
        want = ref_ram(base[k], [m[k] for m in models], r=r, alpha=alpha)
        torch.testing.assert_close(out[k], want, rtol=1e-6, atol=1e-6)


def test_ram_epsilon_ignores_small_changes():
    base = {"x": torch.zeros(4)}
    a = {"x": torch.tensor([1e-6, 2.0, 1.0, 0.0])}
    b = {"x": torch.tensor([3.0, 4.0, 1e-6, 0.0])}
    out = ml.merge("ram(base, [a, b])", base=base, a=a, b=b)
    assert torch.equal(out["x"], torch.tensor([3.0, 3.0, 1.0, 0.0]))


def ref_arcee_keep(base, model, dtype=torch.float64):
    """mergekit's formula, every step in `dtype`: the entries that take the model's value."""
    def softmax_rows(x):
        rows = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
        return torch.stack([torch.exp(r - r.max()) / torch.exp(r - r.max()).sum() for r in rows])

    shape = base.shape
    base, model = base.to(dtype), model.to(dtype)
    p = softmax_rows(model) + 1e-8
    q = softmax_rows(base) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=1, keepdim=True)
    imp = ((model - base).abs().reshape(p.shape) * kl).reshape(-1)
    srt = np.sort(imp.numpy())
    n = srt.size

    def qv(f):
        return srt[int(np.floor(f * (n - 1)))]

    thr = qv(0.5) + 1.5 * (qv(0.75) - qv(0.25))
    return torch.from_numpy(imp.numpy() >= thr).reshape(shape)


def ref_arcee(base, model):
    return torch.where(ref_arcee_keep(base, model), model, base)


def test_arcee_fusion():
    base, a = sd(0), sd(1)
    a = {k: v * torch.linspace(0.1, 3, v.numel()).reshape(v.shape) for k, v in a.items()}
    out = ml.merge("arcee_fusion(base, [a])", base=base, a=a)
    changed = 0
    for k in base:
        want = ref_arcee(base[k], a[k])
        torch.testing.assert_close(out[k], want, rtol=1e-6, atol=1e-6)
        changed += int((want != base[k]).sum())
    assert 0 < changed < sum(v.numel() for v in base.values())  # some entries taken, not all


@pytest.mark.parametrize("rows,cols,scale", [(64, 256, 1e-3), (128, 512, 1e-4)])
def test_arcee_fusion_importance_is_float64(rows, cols, scale):
    """A fine-tune a small step from its base: the rows' softmaxes are nearly equal, and the KL
    computed in float32 cancels to noise (the float32 formula picks >5% of the entries
    differently from the float64 one); mergelang's (row_kl in float64, the importance rounded to
    float32) picks the float64 formula's entries except near-ties within that rounding (at most
    1 in 10^4; measured: 0 and 1 of 16384 and 65536)."""
    g = torch.Generator().manual_seed(rows)
    base = torch.randn(rows, cols, generator=g) * 0.02
    a = base + torch.randn(rows, cols, generator=g) * (0.02 * scale)
    out = ml.merge("arcee_fusion(base, [a])", base={"w": base}, a={"w": a})["w"]
    want = ref_arcee_keep(base, a)
    got = out != base
    assert int((got != want).sum()) <= want.numel() // 10_000
    assert torch.equal(out, base + (a - base) * got)  # the stdlib's own final arithmetic
    f32 = ref_arcee_keep(base, a, torch.float32)
    assert float((f32 != want).float().mean()) > 0.05


@pytest.mark.parametrize("shape", [(7,), (5, 9), (2, 3, 4)])
def test_row_kl_is_the_float64_formula(shape):
    g = torch.Generator().manual_seed(len(shape))
    x, y = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    out = ml.merge("0 * a + row_kl(a, b, eps = 1e-6)", a={"t": x}, b={"t": y})["t"]
    p = torch.softmax(x.double(), -1) + 1e-6
    q = torch.softmax(y.double(), -1) + 1e-6
    want = (p * (p / q).log()).sum(-1, keepdim=True).float()
    assert torch.equal(out, want.expand(shape))


def test_row_kl_eps_must_be_a_number():
    with pytest.raises(ml.MergelangError, match="row_kl's eps must be a number >= 0"):
        ml.merge("row_kl(a, a, eps = -1)", a={"t": torch.zeros(3)})


def test_arcee_fusion_takes_one_model():
    base, a = sd(0), sd(1)
    with pytest.raises(ml.MergelangError, match="exactly one model"):
        ml.merge("arcee_fusion(base, [a, a])", base=base, a=a)


@pytest.mark.parametrize("over,axis", [("tensor", None), ("rows", -1), ("cols", -2)])
@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.75, 1.0, 0.33])
def test_quantile_is_numpy_lower(over, axis, q):
    x = sd(3)["c"]
    # outputs keep the input's shape: the quantile is broadcast back by `0 * a +`
    out = ml.merge(f"0 * a + quantile(a, {q}, over = \"{over}\")", a={"c": x})["c"]
    want = np.quantile(x.numpy(), q, axis=axis, method="lower", keepdims=axis is not None)
    assert np.array_equal(out.numpy(), np.broadcast_to(want, x.shape).astype(np.float32))


def test_quantile_per_model_and_over_models():
    a, b = sd(4)["w"], sd(5)["w"]
    out = ml.merge("0 * a + quantile([a, b], 0.5, over = \"tensor\")[1]", a={"w": a},
                   b={"w": b})["w"]
    assert (out == float(np.quantile(b.numpy(), 0.5, method="lower"))).all()
    out = ml.merge("quantile([a, b, a], 0.5)", a={"w": a}, b={"w": b})["w"]
    want = np.quantile(np.stack([a.numpy(), b.numpy(), a.numpy()]), 0.5, axis=0, method="lower")
    assert np.array_equal(out.numpy(), want)


def test_quantile_q_outside_unit_interval():
    with pytest.raises(ml.MergelangError, match="E203"):
        ml.merge("quantile(a, 1.5)", a={"w": torch.ones(3)})
