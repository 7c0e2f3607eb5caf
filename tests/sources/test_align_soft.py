"""Soft alignment (`method = "ot"`, `reg > 0`): Sinkhorn transport maps applied on load as matrix
products. Checked against transforms written out here in numpy (T W T^T with Kronecker products
for the dims inside heads, index gathers for the hard head groups), and against the hard
permutation as reg -> 0."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mergelang as ml  # noqa: E402
from mergelang.sources.align import apply_permutations, weight_matching  # noqa: E402
from mergelang.sources.align.soft import sinkhorn_map  # noqa: E402

import align_helpers as ah  # noqa: E402

H, KV, D, I = 4, 2, 32, 48
d, G = D // H, H // KV


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("soft")
    cfg = ah.llama_config()
    a, b = ah.tiny_model(cfg, seed=3), ah.tiny_model(cfg, seed=4)
    sa, sb = ah.state_of(a), ah.state_of(b)
    pb, _, spec = ah.permuted_copy(a, seed=5)
    return {"a": sa, "b": sb, "spec": spec, "pa": sa, "pb": pb,
            "fa": ah.save(a, sa, root / "a"), "fb": ah.save(b, sb, root / "b")}


def blocks(p: np.ndarray, block: int) -> np.ndarray:
    """Gather index that moves whole blocks: new block j = old block p[j]."""
    return np.concatenate([np.arange(q * block, (q + 1) * block) for q in p])


def reference(W: dict, res, layers=(0, 1)) -> dict:
    """The soft-aligned tensors of `other`, computed by hand from the maps and permutations."""
    T = {k: v.numpy() for k, v in res.maps.items()}
    P = {k: v.numpy() for k, v in res.perms.items()}
    w = {k: v.double().numpy() for k, v in W.items()}
    R = T["residual"]
    out = {"model.embed_tokens.weight": w["model.embed_tokens.weight"] @ R.T,
           "lm_head.weight": w["lm_head.weight"] @ R.T, "model.norm.weight": R @ w["model.norm.weight"]}
    for i in layers:
        L = f"model.layers.{i}."
        M, VO, kv = T[f"layers.{i}.mlp"], T[f"layers.{i}.vo_dims"], P[f"layers.{i}.kv_heads"]
        out[L + "input_layernorm.weight"] = R @ w[L + "input_layernorm.weight"]
        out[L + "post_attention_layernorm.weight"] = R @ w[L + "post_attention_layernorm.weight"]
        out[L + "mlp.gate_proj.weight"] = M @ w[L + "mlp.gate_proj.weight"] @ R.T
        out[L + "mlp.up_proj.weight"] = M @ w[L + "mlp.up_proj.weight"] @ R.T
        out[L + "mlp.down_proj.weight"] = R @ w[L + "mlp.down_proj.weight"] @ M.T
        out[L + "self_attn.q_proj.weight"] = w[L + "self_attn.q_proj.weight"][blocks(kv, G * d)] @ R.T
        out[L + "self_attn.k_proj.weight"] = w[L + "self_attn.k_proj.weight"][blocks(kv, d)] @ R.T
        out[L + "self_attn.v_proj.weight"] = np.kron(np.eye(KV), VO) @ w[L + "self_attn.v_proj.weight"][blocks(kv, d)] @ R.T
        out[L + "self_attn.o_proj.weight"] = R @ w[L + "self_attn.o_proj.weight"][:, blocks(kv, G * d)] @ np.kron(np.eye(H), VO).T
    return out


def test_sinkhorn_map_is_row_stochastic_and_sharpens_to_the_assignment():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(6, 6))
    soft = sinkhorn_map(sim, 0.5)
    assert (soft >= 0).all() and np.allclose(soft.sum(1), 1) and np.allclose(soft.sum(0), 1, atol=1e-6)
    assert (soft < 0.9).all()  # really soft
    cols = rng.permutation(6)
    sim = np.eye(6)[cols] + 0.2 * sim  # a clear best assignment: row i -> column cols[i]
    sharp = sinkhorn_map(sim, 1e-2)
    np.testing.assert_allclose(sharp, np.eye(6)[cols], atol=1e-6)


def test_soft_maps_applied_match_a_numpy_reference(pair):
    res = weight_matching(pair["a"], pair["b"], pair["spec"], method="ot", reg=0.05)
    assert set(res.maps) == {g.name for g in pair["spec"].groups if "kv_heads" not in g.name}
    assert all(not torch.equal(m, torch.eye(len(m), dtype=m.dtype)[res.perms[k]]) for k, m in res.maps.items())
    got = apply_permutations(pair["b"], pair["spec"], res.perms, maps=res.maps)
    ref = reference(pair["b"], res)
    assert len(ref) == len(pair["spec"].tensors())
    for k, v in ref.items():
        np.testing.assert_allclose(got[k].double().numpy(), v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_soft_alignment_in_a_recipe_is_applied_on_load(pair):
    text = (f'model a = "{pair["fa"]}"\nmodel b = "{pair["fb"]}"\n'
            'merge from a {\n    "*" => align(b, to = a, method = "ot", reg = 0.05)\n}\n')
    r = ml.compile(text)
    assert "align(b, to=a, method=ot, reg=0.05)" in r.compilation.models
    out = r.evaluate()
    res = weight_matching(pair["a"], pair["b"], pair["spec"], method="ot", reg=0.05)
    for k, v in reference(pair["b"], res).items():
        np.testing.assert_allclose(out[k].double().numpy(), v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_reg_zero_is_hard_and_small_reg_tends_to_the_permutation(pair):
    hard = weight_matching(pair["pa"], pair["pb"], pair["spec"], method="ot")
    assert hard.maps == {}
    back = apply_permutations(pair["pb"], pair["spec"], hard.perms)
    assert all(torch.equal(back[k], v) for k, v in pair["pa"].items())
    dev = []
    for reg in (0.1, 0.01):  # the maps approach the hard permutation matrices as reg -> 0
        soft = weight_matching(pair["pa"], pair["pb"], pair["spec"], method="ot", reg=reg)
        dev.append(max((T - torch.eye(len(T), dtype=T.dtype)[hard.perms[k]]).abs().max().item()
                       for k, T in soft.maps.items()))
    assert dev[0] > 0.5 and dev[1] < 1e-3, dev
    near = apply_permutations(pair["pb"], pair["spec"], soft.perms, maps=soft.maps)
    for k, v in pair["pa"].items():
        torch.testing.assert_close(near[k], v, rtol=0, atol=1e-4)


def test_reg_needs_ot():
    with pytest.raises(ValueError):
        weight_matching({}, {}, ah_spec(), method="weight_matching", reg=0.1)


def ah_spec():
    from mergelang.sources.align.spec import AlignSpec

    return AlignSpec("none", ())
