"""LoRA / PEFT adapters as inputs: `model a = lora("dir", base = base)` gives W + (alpha/r)·B·A."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mergelang as ml  # noqa: E402
from test_mergekit_import import _tensors  # noqa: E402

MODULES = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.1.mlp.up_proj": (12, 8)}


def _adapter(folder: Path, r: int = 2, alpha: float = 6.0, seed: int = 5, **cfg) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    t = {}
    for mod, (out_f, in_f) in MODULES.items():
        t[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(r, in_f, generator=g)
        t[f"base_model.model.{mod}.lora_B.weight"] = torch.randn(out_f, r, generator=g)
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(r, 16, generator=g)
    t["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.randn(8, r, generator=g)
    save_file(t, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": alpha,
                                                            "peft_type": "LORA", **cfg}))
    return t


@pytest.fixture()
def base(tmp_path) -> Path:
    path = tmp_path / "base.safetensors"
    save_file(_tensors(0), str(path))
    return path


def _expected(base: dict, ad: dict, scale: float) -> dict:
    out = dict(base)
    for mod in MODULES:
        a = ad[f"base_model.model.{mod}.lora_A.weight"]
        b = ad[f"base_model.model.{mod}.lora_B.weight"]
        out[mod + ".weight"] = base[mod + ".weight"] + scale * (b @ a)
    ea = ad["base_model.model.model.embed_tokens.lora_embedding_A"]
    eb = ad["base_model.model.model.embed_tokens.lora_embedding_B"]
    out["model.embed_tokens.weight"] = base["model.embed_tokens.weight"] + scale * (eb @ ea).T
    return out


def _run(text: str) -> dict:
    r = ml.compile(text)
    try:
        return r.evaluate()
    finally:
        r.close()


def test_lora_applies_scaled_update(base, tmp_path):
    ad = _adapter(tmp_path / "ad")
    out = _run(f'model base = "{base}"\nmodel a = lora("ad", base = base)\n'
               'merge from base {\n "*" => a\n}\n'.replace('"ad"', f'"{tmp_path / "ad"}"'))
    want = _expected(load_file(str(base)), ad, 6.0 / 2)
    assert out.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(out[k], want[k], rtol=1e-6, atol=1e-6, msg=k)


def test_lora_in_a_merge_with_rslora_and_extra_scale(base, tmp_path):
    ad = _adapter(tmp_path / "ad", r=4, alpha=8.0, use_rslora=True)
    (tmp_path / "r.mrg").write_text(f'model base = "{base}"\n'
                                    'model a = lora("ad", base = base, scale = 0.5)\n'
                                    'merge from base {\n "*" => linear([base, a], weights = [1, 3])\n}\n')
    out = _run(str(tmp_path / "r.mrg"))  # adapter path relative to the recipe's folder
    b = load_file(str(base))
    adapted = _expected(b, ad, 0.5 * 8.0 / math.sqrt(4))
    for k in b:
        torch.testing.assert_close(out[k], (b[k] + 3 * adapted[k]) / 4, rtol=1e-6, atol=1e-6, msg=k)


def test_lora_errors(base, tmp_path):
    with pytest.raises(ml.MergelangError) as exc:
        ml.compile(f'model base = "{base}"\nmodel a = lora("{tmp_path}/none", base = base)\n'
                   'merge from base {\n "*" => a\n}\n')
    assert exc.value.codes == ["E301"]
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"base_model.model.model.layers.9.mlp.x.lora_A.weight": torch.zeros(2, 8)},
              str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 2}')
    with pytest.raises(ml.MergelangError) as exc:
        ml.compile(f'model base = "{base}"\nmodel a = lora("{bad}", base = base)\n'
                   'merge from base {\n "*" => a\n}\n')
    assert exc.value.codes == ["E303"] and "do not fit the base model" in exc.value.render()
    with pytest.raises(ml.MergelangError) as exc:
        ml.compile(f'model base = "{base}"\nmodel a = lora("{bad}", base = "x")\n'
                   'merge from base {\n "*" => a\n}\n')
    assert exc.value.codes == ["E201"]
    with pytest.raises(ml.MergelangError) as exc:
        ml.compile(f'model base = "{base}"\nmerge from base {{\n "*" => lora("{bad}", base = base)\n}}\n')
    assert exc.value.codes == ["E201"]


def test_peft_key_variants(base, tmp_path):
    """An adapter name before `.weight`, and full tensors saved for `modules_to_save`."""
    folder = tmp_path / "ad"
    folder.mkdir()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    head = torch.randn(16, 8, generator=g)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": a,
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight": b,
               "base_model.model.lm_head.modules_to_save.default.weight": head},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 2}')
    out = _run(f'model base = "{base}"\nmodel x = lora("{folder}", base = base)\n'
               'merge from base {\n "*" => x\n}\n')
    w = load_file(str(base))
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(out[name], w[name] + b @ a, rtol=1e-6, atol=1e-6)
    assert torch.equal(out["lm_head.weight"], head)
    assert torch.equal(out["model.norm.weight"], w["model.norm.weight"])
