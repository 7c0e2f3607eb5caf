"""`fisher`'s model-wide normaliser and floor: parity with a plain-torch port of the
model_merging repo's `_merge_with_coeffs` + `_l2_norm_of_fisher` (Matena & Raffel), where each
model's coefficient is divided by the L2 norm of its Fisher over all variables, and the Fisher
is clamped below at `fisher_floor` for the target (first) model, or every model (norm_eps = 0);
and with FusionBench's `merging_with_fisher_weights` (norm + 1e-6, norm_eps's default)."""

from __future__ import annotations

import pytest
import torch

import mergelang as ml

SHAPES = {"embed.weight": (6, 4), "layers.0.weight": (4, 4), "layers.0.bias": (4,), "one": (1,)}


def make(seed: int, fisher: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if fisher:  # squared-gradient-like: non-negative, some exact zeros
        out = {k: torch.rand(s, generator=g) ** 2 for k, s in SHAPES.items()}
        for v in out.values():
            v.view(-1)[::3] = 0.0
        return out
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def reference(models, fishers, coefficients, normalize, floor, favor_target):
    names = list(models[0])
    if normalize:
        norms = [torch.sqrt(sum(torch.sum(f[k].double() ** 2) for k in names)) for f in fishers]
        coefficients = [c / float(n) for c, n in zip(coefficients, norms)]
    out = {}
    for k in names:
        lhs, rhs = [], []
        for j, (m, c, f) in enumerate(zip(models, coefficients, fishers)):
            diag = f[k]
            if not favor_target or j == 0:
                diag = torch.maximum(diag, torch.tensor(floor))
            tmp = c * diag
            lhs.append(tmp)
            rhs.append(tmp * m[k])
        out[k] = torch.stack(rhs).sum(0) / torch.stack(lhs).sum(0)
    return out


def run(models, fishers, expr_tail):
    names = [f"m{i}" for i in range(len(models))]
    fnames = [f"f{i}" for i in range(len(models))]
    expr = f"fisher([{', '.join(names)}], [{', '.join(fnames)}]{expr_tail})"
    return ml.merge(expr, **dict(zip(names, models)), **dict(zip(fnames, fishers)))


def _bool(b: bool) -> str:
    return "true" if b else "false"


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("favor_target", [True, False])
@pytest.mark.parametrize("floor", [1e-6, 0.05])
@pytest.mark.parametrize("n", [2, 3])
def test_matches_the_model_merging_repo(normalize: bool, favor_target: bool, floor: float, n: int) -> None:
    models = [make(i) for i in range(n)]
    fishers = [make(10 + i, fisher=True) for i in range(n)]
    weights = [1.0, 2.0, 0.5][:n]
    out = run(models, fishers, f", weights = {weights}, normalize = {_bool(normalize)}, "
                               f"floor = {floor}, favor_target = {_bool(favor_target)}, norm_eps = 0")
    want = reference(models, fishers, weights, normalize, floor, favor_target)
    for k, w in want.items():
        torch.testing.assert_close(out[k], w.float(), rtol=2e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_repo_defaults() -> None:
    """normalize = true, floor = 1e-6, norm_eps = 0 (favor_target defaults to true) = the repo's
    defaults."""
    models = [make(i) for i in range(3)]
    fishers = [make(20 + i, fisher=True) for i in range(3)]
    out = run(models, fishers, ", normalize = true, floor = 1e-6, norm_eps = 0")
    want = reference(models, fishers, [1.0, 1.0, 1.0], True, 1e-6, True)
    for k, w in want.items():
        torch.testing.assert_close(out[k], w.float(), rtol=2e-5, atol=1e-6)


def test_default_is_the_per_tensor_formula() -> None:
    """Without the options: sum (F + 1e-6) theta / sum (F + 1e-6) (unchanged)."""
    models = [make(i) for i in range(2)]
    fishers = [make(30 + i, fisher=True) for i in range(2)]
    out = run(models, fishers, "")
    for k in SHAPES:
        f = [fi[k] + 1e-6 for fi in fishers]
        want = (f[0] * models[0][k] + f[1] * models[1][k]) / (f[0] + f[1])
        torch.testing.assert_close(out[k], want, rtol=1e-6, atol=1e-6)


def test_normaliser_is_model_wide() -> None:
    """Scaling model 1's Fisher of one tensor changes every tensor's result (its norm grows)."""
    models = [make(i) for i in range(2)]
    fishers = [make(40 + i, fisher=True) for i in range(2)]
    tail = ", normalize = true, floor = 1e-6, norm_eps = 0"
    out1 = run(models, fishers, tail)
    fishers[1] = dict(fishers[1], **{"embed.weight": fishers[1]["embed.weight"] * 100})
    out2 = run(models, fishers, tail)
    assert not torch.allclose(out1["layers.0.bias"], out2["layers.0.bias"])
    want = reference(models, fishers, [1.0, 1.0], True, 1e-6, True)
    torch.testing.assert_close(out2["layers.0.bias"], want["layers.0.bias"].float(), rtol=2e-5, atol=1e-6)


def test_routing_excludes_tensors_from_the_norm() -> None:
    models = [make(i) for i in range(2)]
    fishers = [make(50 + i, fisher=True) for i in range(2)]
    fishers[0]["one"] = fishers[0]["one"] + 1e4
    src = '''model a = "x"
model b = "x"
model fa = "x"
model fb = "x"
merge from a {
    "one" => a
    "*" => fisher([a, b], [fa, fb], normalize = true, floor = 1e-6, norm_eps = 0)
}
'''
    out = ml.compile(src, a=models[0], b=models[1], fa=fishers[0], fb=fishers[1]).evaluate()
    rest = [k for k in SHAPES if k != "one"]
    sub = lambda d: {k: d[k] for k in rest}  # noqa: E731
    want = reference([sub(m) for m in models], [sub(f) for f in fishers], [1.0, 1.0], True, 1e-6, True)
    assert torch.equal(out["one"], models[0]["one"])
    for k, w in want.items():
        torch.testing.assert_close(out[k], w.float(), rtol=2e-5, atol=1e-6)


def test_zero_fisher_model_gets_no_weight() -> None:
    """A model whose Fisher is 0 everywhere: the repo divides its coefficient by 0; mergelang
    (norm_eps = 0) gives it coefficient 0 (the others are merged as if it were absent)."""
    models = [make(i) for i in range(3)]
    fishers = [make(60 + i, fisher=True) for i in range(3)]
    fishers[2] = {k: torch.zeros_like(v) for k, v in fishers[2].items()}
    out = run(models, fishers, ", normalize = true, floor = 1e-6, norm_eps = 0")
    want = reference(models[:2], fishers[:2], [1.0, 1.0], True, 1e-6, True)
    for k, w in want.items():
        torch.testing.assert_close(out[k], w.float(), rtol=2e-5, atol=1e-6)


def fusionbench(models, fishers, coefficients, eps, norm_eps=None):
    """A plain-torch copy of FusionBench 0.2.33's `merging_with_fisher_weights`
    (fusion_bench/method/fisher_merging/fisher_merging.py, normalize_fisher_weight = True,
    minimal_fisher_weight = eps; `norm_eps` replaces eps in the normaliser only), in float64."""
    names = list(models[0])
    norms = torch.stack([torch.sqrt(sum(torch.sum(f[k].double() ** 2) for k in names)) for f in fishers])
    inv = 1.0 / (norms + (eps if norm_eps is None else norm_eps))
    scale = torch.tensor(coefficients, dtype=torch.float64) * inv / inv.sum()
    out = {}
    for k in names:
        params = torch.stack([m[k].double() for m in models])
        fw = torch.stack([f[k].double() for f in fishers]) + eps
        c = scale.reshape(-1, *[1] * (params.dim() - 1))
        out[k] = (c * fw * params).sum(0) / (c * fw).sum(0)
    return out


@pytest.mark.parametrize("tiny", [False, True])
def test_norm_eps_matches_fusionbench(tiny: bool) -> None:
    """fisher(..., normalize = true) is FusionBench's fisher merging: coefficients divided by the
    model-wide norm + 1e-6 (norm_eps's default), Fisher + 1e-6. With tiny Fishers (norms ~1e-6)
    the epsilon matters: norm_eps = 0 (the model_merging repo's normaliser) gives another merge."""
    models = [make(i) for i in range(3)]
    fishers = [make(70 + i, fisher=True) for i in range(3)]
    if tiny:
        fishers = [{k: v * s for k, v in f.items()} for f, s in zip(fishers, (1e-7, 3e-7, 1e-6))]
    weights = [1.0, 2.0, 0.5]
    out = run(models, fishers, f", weights = {weights}, normalize = true")
    want = fusionbench(models, fishers, weights, 1e-6)
    for k, w in want.items():
        torch.testing.assert_close(out[k], w.float(), rtol=2e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    explicit = run(models, fishers, f", weights = {weights}, normalize = true, norm_eps = 1e-6")
    assert all(torch.equal(out[k], explicit[k]) for k in out)
    without = run(models, fishers, f", weights = {weights}, normalize = true, norm_eps = 0")
    want0 = fusionbench(models, fishers, weights, 1e-6, norm_eps=0.0)
    for k in want0:
        torch.testing.assert_close(without[k], want0[k].float(), rtol=2e-5, atol=1e-6)
    gap = max(float((out[k] - without[k]).abs().max()) for k in out)
    assert (gap > 1e-3) == tiny, gap
