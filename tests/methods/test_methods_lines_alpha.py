"""LiNeS's model-wide alpha (`lines_alpha`) with `lines`: parity with a plain-torch port of the
LiNeS repo's multi-task setting, alpha = (norm_summed_tvs / norm_mtv) / num_tasks followed by
`LiNeS_scaling` (keys matched by ".{i}." blocks, alpha outside the blocks), the norms over the
flattened whole model."""

from __future__ import annotations

import pytest
import torch

import helpers
import mergelang as ml
from mergelang.diagnostics import MergelangError

SHAPES = {"embed.weight": (6, 4), "model.layers.0.mlp.weight": (4, 4),
          "model.layers.1.attn.weight": (4, 3), "model.layers.2.mlp.bias": (4,),
          "model.layers.3.mlp.weight": (2, 4), "norm.weight": (4,)}
NUM_BLOCKS = 4


def make_sd(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return helpers.make_sd(seed, SHAPES, scale)


def flat(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in sd.values()]).double()


def reference(base, models, merged_tv, beta, p):
    tvs = [{k: m[k] - base[k] for k in base} for m in models]
    norm_summed_tvs = sum(torch.norm(flat(tv), p=p) for tv in tvs)
    norm_mtv = torch.norm(flat(merged_tv), p=p)
    alpha = float(norm_summed_tvs / norm_mtv) / len(models)
    key_blocks = [f".{i}." for i in range(NUM_BLOCKS)]
    out = {}
    for k, v in merged_tv.items():
        scale = alpha
        for layer, block in enumerate(key_blocks):
            if block in k:
                scale = alpha + beta * (layer / (NUM_BLOCKS - 1))
                break
        out[k] = base[k] + v * scale
    return out, alpha


def models_for(seed: int, n: int):
    base = make_sd(seed)
    models = [{k: v + 0.1 * d[k] for k, v in base.items()}
              for d in (make_sd(seed * 7 + i + 1) for i in range(n))]
    return base, models


EXPR = ("base + lines({tv}, lines_alpha(base, {ms}, {tv}, norm = \"{norm}\"), beta = {beta}, "
        "num_layers = " + str(NUM_BLOCKS) + ")")


def run(base, models, tv_expr, norm, beta):
    names = [f"m{i}" for i in range(len(models))]
    ms = "[" + ", ".join(names) + "]"
    expr = EXPR.format(tv=tv_expr.format(ms=ms), ms=ms, norm=norm, beta=beta)
    return ml.merge(expr, base=base, **dict(zip(names, models)))


@pytest.mark.parametrize("norm,p", [("l1", 1), ("l2", 2)])
@pytest.mark.parametrize("n", [2, 3])
def test_task_arithmetic_sum_matches_reference(norm: str, p: int, n: int) -> None:
    base, models = models_for(n, n)
    merged_tv = {k: sum(m[k] - base[k] for m in models) for k in base}
    out = run(base, models, 'sum({ms} - base, over = "models")', norm, 0.5)
    want, alpha = reference(base, models, merged_tv, 0.5, p)
    assert 0 < alpha
    for k, w in want.items():
        torch.testing.assert_close(out[k], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("norm,p", [("l1", 1), ("l2", 2)])
def test_other_merged_vector_matches_reference(norm: str, p: int) -> None:
    """A merged task vector that is not the plain sum (the max-magnitude one, as magmax)."""
    base, models = models_for(5, 3)
    stack = {k: torch.stack([m[k] - base[k] for m in models]) for k in base}
    merged_tv = {k: s.gather(0, s.abs().argmax(0, keepdim=True))[0] * 0.7 for k, s in stack.items()}
    out = run(base, models, '0.7 * sum(where(argmax_mask(abs({ms} - base)), {ms} - base, 0), over = "models")',
              norm, 1.0)
    want, _ = reference(base, models, merged_tv, 1.0, p)
    for k, w in want.items():
        torch.testing.assert_close(out[k], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_alpha_is_model_wide() -> None:
    """Scaling one tensor's task vectors changes alpha, so every tensor's output changes."""
    base, models = models_for(2, 2)
    out1 = run(base, models, 'sum({ms} - base, over = "models")', "l1", 0.5)
    boosted = [dict(m) for m in models]
    boosted[1]["embed.weight"] = base["embed.weight"] - 30 * (models[1]["embed.weight"] - base["embed.weight"])
    out2 = run(base, boosted, 'sum({ms} - base, over = "models")', "l1", 0.5)
    assert not torch.allclose(out1["norm.weight"], out2["norm.weight"])
    merged_tv = {k: sum(m[k] - base[k] for m in boosted) for k in base}
    want, _ = reference(base, boosted, merged_tv, 0.5, 1)
    torch.testing.assert_close(out2["norm.weight"], want["norm.weight"], rtol=1e-5, atol=1e-6)


def test_zero_task_vectors_give_the_base() -> None:
    """norm_mtv = 0: the repo divides by 0; mergelang takes alpha = 0 (the result is the base)."""
    base = make_sd(1)
    same = [{k: v.clone() for k, v in base.items()} for _ in range(2)]
    out = run(base, same, 'sum({ms} - base, over = "models")', "l2", 0.5)
    for k in base:
        assert torch.equal(out[k], base[k])


def test_routing_excludes_tensors_from_the_norms() -> None:
    base, models = models_for(3, 2)
    models[0]["norm.weight"] = base["norm.weight"] + 1000.0
    src = '''model base = "x"
model a = "x"
model b = "x"
merge from base {
    "norm*" => base
    "*" => base + lines(sum([a, b] - base), lines_alpha(base, [a, b], sum([a, b] - base)), beta = 0.5, num_layers = 4)
}
'''
    out = ml.compile(src, base=base, a=models[0], b=models[1]).evaluate()
    rest = [k for k in base if k != "norm.weight"]
    sub = lambda d: {k: d[k] for k in rest}  # noqa: E731
    merged_tv = {k: sum(m[k] - base[k] for m in models) for k in rest}
    want, _ = reference(sub(base), [sub(m) for m in models], merged_tv, 0.5, 1)
    assert torch.equal(out["norm.weight"], base["norm.weight"])
    for k, w in want.items():
        torch.testing.assert_close(out[k], w, rtol=1e-5, atol=1e-6)


def test_bad_norm_is_a_diagnostic() -> None:
    base, models = models_for(1, 2)
    with pytest.raises(MergelangError) as ei:
        run(base, models, 'sum({ms} - base, over = "models")', "l3", 0.5)
    assert "lines_alpha's norm" in str(ei.value)
