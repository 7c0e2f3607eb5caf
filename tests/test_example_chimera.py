"""examples/r1t_chimera.mrg on a tiny DeepSeek-V3-shaped pair (a dense first layer, then MoE
layers with routed and shared experts, a router and its score-correction bias): every tensor
comes from the model the recipe says, bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch

import mergelang as ml
from helpers import write_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "r1t_chimera.mrg"
H, E, LAYERS = 8, 4, 3


def deepseek_v3_like(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (32, H), "model.norm.weight": (H,), "lm_head.weight": (32, H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "self_attn.q_a_proj.weight": (4, H), p + "self_attn.q_b_proj.weight": (H, 4),
                       p + "self_attn.kv_a_proj_with_mqa.weight": (6, H),
                       p + "self_attn.kv_b_proj.weight": (H, 4), p + "self_attn.o_proj.weight": (H, H)})
        mlps = ["mlp."] if i == 0 else [f"mlp.experts.{e}." for e in range(E)] + ["mlp.shared_experts."]
        for m in mlps:
            shapes.update({p + m + "gate_proj.weight": (6, H), p + m + "up_proj.weight": (6, H),
                           p + m + "down_proj.weight": (H, 6)})
        if i > 0:
            shapes.update({p + "mlp.gate.weight": (E, H), p + "mlp.gate.e_score_correction_bias": (E,)})
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_chimera_takes_routed_experts_and_router_from_r1(tmp_path):
    v3, r1 = deepseek_v3_like(0), deepseek_v3_like(1)
    paths = {"v3": write_model(tmp_path / "v3", v3), "r1": write_model(tmp_path / "r1", r1)}
    r = ml.compile(EXAMPLE, **{k: str(v) for k, v in paths.items()})
    try:
        assert not r.warnings, [w.render() for w in r.warnings]  # every rule matches something
        out = r.evaluate()
    finally:
        r.close()
    from_r1 = 0
    for name, t in out.items():
        routed = ".mlp.experts." in name or ".mlp.gate." in name
        assert torch.equal(t, (r1 if routed else v3)[name]), name
        from_r1 += routed
    assert from_r1 == (LAYERS - 1) * (E * 3 + 2)
