"""Reversible model merging of LoRA adapters (tools/rmm.py, `mergelang rmm` / `rmm-rebuild`):
with as many basis vectors as adapters every adapter is rebuilt exactly (peft loads it and gives
the original adapter's logits); with fewer, each position's vectors are the best rank-k
approximation (checked against numpy's SVD of that position), and the reported error is the
products' relative error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergelang.cli import main
from mergelang.diagnostics import MergelangError
from mergelang.tools.rmm import rebuild, reversible_merge

MODULES = {"base_model.model.model.layers.0.self_attn.q_proj": (12, 16),
           "base_model.model.model.layers.0.mlp.down_proj": (16, 20)}
R = 4


def write_adapter(folder: Path, seed: int, alpha: int = 8, rank: int = R) -> Path:
    g = torch.Generator().manual_seed(seed)
    t = {}
    for m, (out, cin) in MODULES.items():
        t[f"{m}.lora_A.weight"] = torch.randn(rank, cin, generator=g)
        t[f"{m}.lora_B.weight"] = torch.randn(out, rank, generator=g)
    folder.mkdir(parents=True)
    save_file(t, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q_proj", "down_proj"],
         "base_model_name_or_path": "base", "task_type": "CAUSAL_LM"}))
    return folder


@pytest.fixture
def adapters(tmp_path: Path) -> list[Path]:
    return [write_adapter(tmp_path / f"task{i}", i, alpha=8 if i != 2 else 4) for i in range(4)]


def _delta(folder: Path, m: str) -> torch.Tensor:
    t = load_file(str(folder / "adapter_model.safetensors"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    return cfg["lora_alpha"] / cfg["r"] * t[f"{m}.lora_B.weight"] @ t[f"{m}.lora_A.weight"]


def test_as_many_basis_vectors_as_adapters_is_exact(adapters, tmp_path: Path) -> None:
    cfg = reversible_merge(adapters, tmp_path / "rmm", basis=4)
    assert max(cfg["relative_error"].values()) < 1e-5
    for i, a in enumerate(adapters):
        out = rebuild(tmp_path / "rmm", a.name, tmp_path / f"re{i}")
        for m in MODULES:
            assert torch.allclose(_delta(out, m), _delta(a, m), atol=1e-4)


def test_fewer_basis_vectors_are_the_best_per_position(adapters, tmp_path: Path) -> None:
    cfg = reversible_merge(adapters, tmp_path / "rmm", basis=2)
    stored = load_file(str(tmp_path / "rmm" / "rmm_model.safetensors"))
    m = "base_model.model.model.layers.0.mlp.down_proj"
    scale = {i: (8 if i != 2 else 4) / R for i in range(4)}
    raw = [load_file(str(a / "adapter_model.safetensors")) for a in adapters]
    # B's row p of every task (scale folded in): its best rank-2 approximation, by numpy
    p = 5
    x = np.stack([raw[i][f"{m}.lora_B.weight"][p].numpy() * scale[i] for i in range(4)], axis=1)  # r x n
    u, s, vh = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    want = (u[:, :2] * s[:2]) @ vh[:2]
    got = (stored[f"{m}.lora_B.basis"][p] @ stored[f"{m}.lora_B.coef"][p]).numpy()
    assert np.allclose(got, want, atol=1e-5)
    # A's column j likewise
    j = 7
    x = np.stack([raw[i][f"{m}.lora_A.weight"][:, j].numpy() for i in range(4)], axis=1)
    u, s, vh = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    got = (stored[f"{m}.lora_A.basis"][j] @ stored[f"{m}.lora_A.coef"][j]).numpy()
    assert np.allclose(got, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5)
    # the reported error is the products' relative error of the rebuilt adapter
    out = rebuild(tmp_path / "rmm", 1, tmp_path / "re1")
    num = sum(float((_delta(out, mm) - _delta(adapters[1], mm)).pow(2).sum()) for mm in MODULES)
    den = sum(float(_delta(adapters[1], mm).pow(2).sum()) for mm in MODULES)
    assert cfg["relative_error"]["task1"] == pytest.approx((num / den) ** 0.5, rel=1e-3)
    assert 0 < cfg["relative_error"]["task1"] < 1
    # storage: k (r + n) numbers per position, against n r for the adapters' factors
    positions = sum(cin + out for out, cin in MODULES.values())
    assert sum(v.numel() for v in stored.values()) == positions * 2 * (R + 4)


def test_peft_loads_a_rebuilt_adapter(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    folders = []
    for i in range(3):
        lc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
        torch.manual_seed(10 + i)
        m = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), lc)
        m.save_pretrained(tmp_path / f"ad{i}")
        folders.append(tmp_path / f"ad{i}")
    res = CliRunner().invoke(main, ["rmm", *map(str, folders), "-o", str(tmp_path / "rmm"), "--basis", "3"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["rmm-rebuild", str(tmp_path / "rmm"), "--task", "ad1", "-o", str(tmp_path / "re")])
    assert res.exit_code == 0, res.output
    ids = torch.tensor([[1, 2, 3, 4]])
    outs = []
    for f in (folders[1], tmp_path / "re"):
        m = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), f)
        with torch.no_grad():
            outs.append(m(ids).logits)
    assert torch.allclose(outs[0], outs[1], atol=1e-4)


def test_bad_inputs_are_E325(adapters, tmp_path: Path) -> None:
    with pytest.raises(MergelangError) as ei:
        reversible_merge([adapters[0], tmp_path], tmp_path / "o1", basis=1)
    assert ei.value.diagnostics[0].code == "E325"
    odd = write_adapter(tmp_path / "odd", 9, rank=3)
    with pytest.raises(MergelangError) as ei:
        reversible_merge([adapters[0], odd], tmp_path / "o2", basis=1)
    d = ei.value.diagnostics[0]
    assert d.code == "E325" and "same rank" in d.help
    reversible_merge(adapters, tmp_path / "rmm", basis=1)
    with pytest.raises(MergelangError) as ei:
        rebuild(tmp_path / "rmm", "nope", tmp_path / "x")
    assert ei.value.diagnostics[0].code == "E325" and "task0" in ei.value.diagnostics[0].help


def test_output_inside_an_input_is_refused(adapters) -> None:
    with pytest.raises(MergelangError) as ei:
        reversible_merge(adapters, adapters[0] / "rmm", basis=2)
    assert ei.value.diagnostics[0].code == "E404"
