"""Built-in knowledge of MoE families from config.json (io/architectures.py): DeepSeek-V3,
Qwen3-MoE, Mixtral — used by explain, check (W109), stacking (E326, config keys) and align."""

from __future__ import annotations

import json

import pytest

import mergelang as ml
from helpers import write_model
from mergelang.diagnostics import MergelangError
from mergelang.io.architectures import architecture, stacking_patch, tensor_layout
from test_example_chimera import E, LAYERS, deepseek_v3_like

V3 = {"model_type": "deepseek_v3", "num_hidden_layers": 61, "n_routed_experts": 256,
      "num_experts_per_tok": 8, "n_shared_experts": 1, "first_k_dense_replace": 3, "moe_layer_freq": 1}


def test_deepseek_v3_layout() -> None:
    a = architecture(V3)
    assert a.moe and a.layers == 61 and a.experts == 256 and a.experts_per_token == 8
    assert a.dense_layers == (0, 1, 2) and a.shared_experts == 1
    assert a.routers == ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
    assert "61 layers (3 dense: 0..2), 256 routed experts (8 per token) + 1 shared" in a.describe()


def test_qwen3_moe_and_mixtral_layouts() -> None:
    q = architecture({"model_type": "qwen3_moe", "num_hidden_layers": 6, "num_experts": 128,
                      "num_experts_per_tok": 8, "decoder_sparse_step": 2, "mlp_only_layers": [0]})
    assert q.dense_layers == (0, 2, 4) and q.experts == 128 and q.shared_experts == 0  # (i+1) % 2
    m = architecture({"model_type": "mixtral", "num_hidden_layers": 32, "num_local_experts": 8,
                      "num_experts_per_tok": 2})
    assert m.moe and m.dense_layers == () and m.experts == 8
    assert not architecture({"model_type": "llama", "num_hidden_layers": 4}).moe
    assert architecture(None) is None and architecture([1, 2]) is None  # type: ignore[arg-type]


def test_tensor_layout_counts_experts_unfused_and_fused() -> None:
    shapes = {f"model.layers.{i}.mlp.experts.{e}.up_proj.weight": (4, 4) for i in range(2) for e in range(5)}
    assert tensor_layout(shapes) == (2, 5)
    assert tensor_layout({"model.layers.0.mlp.experts.gate_up_proj": (7, 8, 4)}) == (1, 7)


def _cfg(experts: int = E) -> dict:
    return {"model_type": "deepseek_v3", "num_hidden_layers": LAYERS, "n_routed_experts": experts,
            "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1}


def test_explain_names_the_architecture(tmp_path) -> None:
    p = write_model(tmp_path / "v3", deepseek_v3_like(0), _cfg())
    r = ml.compile(f'model v3 = "{p}"\nmerge from v3 {{ "*" => v3 }}\n')
    from mergelang.explain import explain_text

    text = explain_text(r.compilation)
    assert f"architecture of `v3` (config.json): deepseek_v3, {LAYERS} layers (1 dense: 0), {E} routed experts" in text
    assert "experts.{0..3}" in text  # the expert family is one line
    r.close()


def test_config_disagreeing_with_the_tensors_warns_W109(tmp_path) -> None:
    p = write_model(tmp_path / "v3", deepseek_v3_like(0), _cfg(experts=8))
    r = ml.compile(f'model v3 = "{p}"\nmerge from v3 {{ "*" => v3 }}\n')
    w = [d for d in r.warnings if d.code == "W109"]
    assert w and f"8 routed experts, the tensors have {E}" in w[0].message and w[0].span.text == f'"{p}"'
    r.close()


def test_stacking_an_moe_model_rewrites_its_dense_layers(tmp_path) -> None:
    p = write_model(tmp_path / "v3", deepseek_v3_like(0), _cfg())
    ok = ml.compile(f'model v3 = "{p}"\nmodel s = stack_layers([layer_range(v3, 0, 2), layer_range(v3, 1, 3)])\n'
                    'merge from s { "*" => s }\n')
    out = ok.run(tmp_path / "out", device="cpu")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg["first_k_dense_replace"] == 1
    with pytest.raises(MergelangError) as ei:
        ml.compile(f'model v3 = "{p}"\nmodel s = stack_layers([layer_range(v3, 1, 3), layer_range(v3, 0, 1)])\n'
                   'merge from s { "*" => s }\n')
    d = ei.value.diagnostics[0]
    assert d.code == "E326" and "first_k_dense_replace" in d.message
    q = {"model_type": "qwen3_moe", "num_hidden_layers": 4, "num_experts": 4, "mlp_only_layers": [0, 3]}
    assert stacking_patch(q, [3, 1, 0]) == {"mlp_only_layers": [0, 2], "decoder_sparse_step": 1}


def test_align_explains_moe_models(tmp_path) -> None:
    p = write_model(tmp_path / "v3", deepseek_v3_like(0), _cfg())
    q = write_model(tmp_path / "r1", deepseek_v3_like(1), _cfg())
    with pytest.raises(MergelangError) as ei:
        r = ml.compile(f'model a = "{p}"\nmodel b = "{q}"\nmerge from a {{ "*" => linear([a, align(b, to = a)]) }}\n')
        r.evaluate()
    assert "mixture-of-experts" in ei.value.diagnostics[0].message
