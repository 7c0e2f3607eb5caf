"""EMR-Merging (`emr`): parity with a plain-torch port of the EMR_Merging repo's `emr_merge`.

The reference below follows the repo's loop (merge_vit/src/main_emr_merging.py): sign flag from
the mean task vector (> 0 -> +1, else -1), masks (tau * flag > 0), the unified vector as the
running maximum of |mask * tau| times the flag, and the rescalers as sums over tensors of
per-tensor means (model-wide), then base + unified * mask_i * rescaler_i per model.
"""

from __future__ import annotations

import pytest
import torch

import helpers
import mergelang as ml
from mergelang.diagnostics import MergelangError

SHAPES = {"embed.weight": (8, 6), "layers.0.mlp.weight": (5, 4, 3), "layers.0.bias": (7,),
          "norm.weight": (6,), "one": (1,)}


def make_sd(seed: int, shapes=SHAPES, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return helpers.make_sd(seed, shapes, scale)


def reference_emr(base, models):
    """The repo's emr_merge + reconstruction (float32, as the repo runs it)."""
    tvs = [{k: m[k] - base[k] for k in base} for m in models]
    sum_param = {k: torch.stack([tv[k] for tv in tvs], 0).mean(0) for k in base}
    scales = torch.zeros(len(models))
    unified, masks = {}, {}
    for k in sum_param:
        masks[k] = []
        flag = (sum_param[k] > 0) * 2 - 1
        param_max = torch.zeros_like(tvs[0][k])
        for m, tv in enumerate(tvs):
            param = tv[k]
            mask = (param * flag) > 0
            masks[k].append(mask)
            param_abs = torch.abs(mask * param)
            param_max = torch.where(param_abs > param_max, param_abs, param_max)
            scales[m] += torch.mean(torch.abs(param))
        unified[k] = param_max * flag
    new_scales = torch.zeros(len(models))
    for m in range(len(models)):
        for k in unified:
            new_scales[m] += torch.mean(torch.abs(unified[k] * masks[k][m]))
    rescalers = scales / new_scales
    return [{k: base[k] + unified[k] * masks[k][m] * rescalers[m] for k in base}
            for m in range(len(models))]


def run_emr(base, models):
    names = [f"m{i}" for i in range(len(models))]
    kwargs = {n: m for n, m in zip(names, models)}
    expr = f"emr(base, [{', '.join(names)}])"
    return ml.merge(expr, outputs=names, base=base, **kwargs), names


def _check(out, want, tol=1e-5):
    for n, w in want.items():
        torch.testing.assert_close(out[n], w, rtol=tol, atol=tol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("n_models", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_emr_matches_reference(n_models: int, seed: int) -> None:
    base = make_sd(100 + seed)
    models = [{k: v + 0.1 * d[k] for k, v in base.items()}
              for d in (make_sd(seed * 10 + i) for i in range(n_models))]
    out, names = run_emr(base, models)
    want = reference_emr(base, models)
    assert list(out) == names
    for name, w in zip(names, want):
        _check(out[name], w)


def test_emr_edge_cases_zeros_ties_and_zero_sums() -> None:
    base = make_sd(7)
    for v in base.values():
        v.view(-1)[-1] = 0.5  # exact task vectors +0.25 / -0.25 / 0 below
    a = {k: v.clone() for k, v in base.items()}
    b = {k: v.clone() for k, v in base.items()}
    c = {k: v.clone() for k, v in base.items()}
    d = make_sd(8, scale=0.1)
    for k in base:
        flat_a, flat_b, flat_c = a[k].view(-1), b[k].view(-1), c[k].view(-1)
        n = flat_a.numel()
        flat_a += d[k].view(-1)
        flat_b += d[k].view(-1).flip(0)
        flat_c += 0.5 * d[k].view(-1)
        flat_a[: n // 3] = base[k].view(-1)[: n // 3]  # zero task vector entries
        flat_b[: n // 4] = flat_a[: n // 4]  # equal task vectors: ties in magnitude
        if n > 1:  # +x, -x, 0: the sum is exactly 0 -> flag -1 (negatives kept)
            tv = 0.25
            flat_a[-1] = base[k].view(-1)[-1] + tv
            flat_b[-1] = base[k].view(-1)[-1] - tv
            flat_c[-1] = base[k].view(-1)[-1]
    out, names = run_emr(base, [a, b, c])
    want = reference_emr(base, [a, b, c])
    for name, w in zip(names, want):
        _check(out[name], w)
    # the exact-zero sum elects -1: only b (negative) keeps its entry, at the unified magnitude
    k = "embed.weight"
    assert out["m0"][k].view(-1)[-1] == base[k].view(-1)[-1]
    assert out["m1"][k].view(-1)[-1] < base[k].view(-1)[-1]


def test_emr_zero_task_vector_model_keeps_base() -> None:
    """A model equal to the base: the repo's rescaler is 0/0 (NaN); mergelang gives lambda = 0,
    so that output is the base exactly, and the other outputs are unchanged by it."""
    base = make_sd(3)
    a = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}
    b = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}
    same = {k: v.clone() for k, v in base.items()}
    out, names = run_emr(base, [a, same, b])
    for k in base:
        assert torch.equal(out["m1"][k], base[k])
    want = reference_emr(base, [a, same, b])
    assert torch.isnan(want[1]["one"]).all()  # what the repo gives
    _check(out["m0"], want[0])
    _check(out["m2"], want[2])


def test_emr_rescaler_is_model_wide() -> None:
    """Scaling one tensor's task vectors changes the other tensors' outputs (a per-tensor
    rescaler would leave them alone), as in the reference."""
    base = make_sd(5)
    models = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    out1, _ = run_emr(base, models)
    boosted = [dict(m) for m in models]
    boosted[0]["embed.weight"] = base["embed.weight"] + 50 * (models[0]["embed.weight"] - base["embed.weight"])
    out2, names = run_emr(base, boosted)
    assert not torch.allclose(out1["m0"]["norm.weight"], out2["m0"]["norm.weight"])
    for name, w in zip(names, reference_emr(base, boosted)):
        _check(out2[name], w)


def test_emr_separate_blocks_equal_the_list_form() -> None:
    base = make_sd(11)
    a = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}
    b = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}
    src = '''model base = "x"
model a = "x"
model b = "x"
merge "first" from base { "*" => emr(base, [a, b])[0] }
merge "second" from base { "*" => emr(base, [a, b])[1] }
'''
    r = ml.compile(src, base=base, a=a, b=b)
    # the two blocks' statistics have equal inputs over the same tensors: computed once
    assert len(r.compilation.plan.stats) == 2
    out = r.evaluate()
    want = reference_emr(base, [a, b])
    _check(out["first"], want[0])
    _check(out["second"], want[1])


def test_emr_list_form_computes_each_statistic_once() -> None:
    base = make_sd(2)
    a = {k: v + 0.1 for k, v in base.items()}
    b = {k: v - 0.2 for k, v in base.items()}
    src = '''model base = "x"
model a = "x"
model b = "x"
merge ["a", "b"] from base { "*" => emr(base, [a, b]) }
'''
    r = ml.compile(src, base=base, a=a, b=b)
    assert len(r.compilation.plan.stats) == 2  # sum |tau| and sum |mask * unified|, both x2 models
    assert len(r.compilation.plan.prepasses) == 1


def test_emr_routing_excludes_tensors_from_the_rescaler() -> None:
    """`"norm*" => base` before emr: norms are the base in both outputs and not in the sums."""
    base = make_sd(4)
    a = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}
    b = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}
    a["norm.weight"] = base["norm.weight"] + 1000.0
    src = '''model base = "x"
model a = "x"
model b = "x"
merge ["a", "b"] from base {
    "norm*" => base
    "*" => emr(base, [a, b])
}
'''
    out = ml.compile(src, base=base, a=a, b=b).evaluate()
    rest = [k for k in base if k != "norm.weight"]
    want = reference_emr({k: base[k] for k in rest}, [{k: m[k] for k in rest} for m in (a, b)])
    for name, w in zip(("a", "b"), want):
        assert torch.equal(out[name]["norm.weight"], base["norm.weight"])
        _check({k: out[name][k] for k in rest}, w)


def test_emr_in_an_unnamed_block_is_e201() -> None:
    base = make_sd(1)
    with pytest.raises(MergelangError) as ei:
        ml.merge("emr(base, [a, b])", base=base, a=base, b=base)
    assert "E201" in ei.value.codes
