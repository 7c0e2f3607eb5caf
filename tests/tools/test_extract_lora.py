"""`mergelang extract-lora`: against the SVD formula (B @ A is the best rank-R approximation),
PEFT loading (a full-rank adapter on the base reproduces the fine-tune), mergekit's naming and
config conventions, the output rules; and side by side with mergekit-extract-lora itself when
its venv is there ($MERGEKIT_PYTHON, as tests/interop/test_mergekit_side_by_side.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mergelang.cli import main
from test_mergekit_side_by_side import llama_tensors, mergekit_python, run_driver, write_llama


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = llama_tensors(0)
    return write_llama(root / "base", base), write_llama(root / "ft", llama_tensors(1, base, 0.05))


def extract(pair, out, *args):
    res = CliRunner().invoke(main, ["extract-lora", *pair, "-o", str(out), *args])
    assert res.exit_code == 0, res.output
    return load_file(str(out / "adapter_model.safetensors")), json.loads((out / "adapter_config.json").read_text())


def test_best_rank_r_approximation_and_conventions(pair, tmp_path):
    sd, cfg = extract(pair, tmp_path / "a", "--rank", "8")
    base = load_file(str(Path(pair[0]) / "model.safetensors"))
    ft = load_file(str(Path(pair[1]) / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    a = sd[f"base_model.model.{name}.lora_A.weight"]
    b = sd[f"base_model.model.{name}.lora_B.weight"]
    delta = ft[name + ".weight"] - base[name + ".weight"]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # Eckart-Young: the optimum
    torch.testing.assert_close(b @ a, (u[:, :8] * s[:8]) @ vh[:8], rtol=1e-4, atol=1e-5)
    assert a.shape == (8, delta.shape[1]) and b.shape == (delta.shape[0], 8)
    torch.testing.assert_close(a.norm(dim=1), s[:8].sqrt(), rtol=1e-5, atol=1e-6)  # sqrt(S) split
    assert cfg["r"] == cfg["lora_alpha"] == 8 and cfg["rank_pattern"] == {}
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                          "up_proj", "down_proj"}
    assert set(cfg["modules_to_save"]) == {"embed_tokens", "lm_head", "input_layernorm",
                                           "post_attention_layernorm", "norm"}
    assert torch.equal(sd["base_model.model.model.embed_tokens.weight"], ft["model.embed_tokens.weight"])


def test_peft_loads_a_full_rank_adapter_onto_the_base(pair, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    extract(pair, tmp_path / "full", "--rank", "64")
    base = AutoModelForCausalLM.from_pretrained(pair[0])
    ft = AutoModelForCausalLM.from_pretrained(pair[1])
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "full"))
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ft(ids).logits, rtol=1e-3, atol=1e-3)


def test_ranks_include_exclude_embed_lora(pair, tmp_path):
    sd, cfg = extract(pair, tmp_path / "b", "--rank", "40", "--include", "self_attn",
                      "--exclude", r"layers\.0\.", "--embed-lora")
    # k/v projections are 32 x 64: rank 32 < 40, in rank_pattern; layer 0 and the MLPs excluded
    assert cfg["r"] == 40 and cfg["rank_pattern"]["model.layers.1.self_attn.k_proj"] == 32
    assert not any("layers.0." in k or "mlp" in k for k in sd)
    assert "base_model.model.model.embed_tokens.lora_embedding_A" not in sd  # not included
    sd, cfg = extract(pair, tmp_path / "c", "--rank", "4", "--embed-lora")
    a = sd["base_model.model.model.embed_tokens.lora_embedding_A"]
    assert a.shape == (4, 48) and "embed_tokens" not in cfg["modules_to_save"]


def test_output_rules(pair, tmp_path):
    res = CliRunner().invoke(main, ["extract-lora", *pair, "-o", pair[0], "--rank", "2"])
    assert res.exit_code == 1 and "E404" in res.output  # never into an input
    res = CliRunner().invoke(main, ["extract-lora", pair[0], str(tmp_path / "nope"), "-o",
                                    str(tmp_path / "o"), "--rank", "2"])
    assert res.exit_code == 1 and "E301" in res.output
    res = CliRunner().invoke(main, ["extract-lora", *pair, "-o", str(tmp_path / "o"), "--rank", "2",
                                    "--include", "nothing-matches"])
    assert res.exit_code == 1 and "E203" in res.output and not (tmp_path / "o").exists()


@pytest.mark.skipif(mergekit_python() is None, reason="no mergekit venv ($MERGEKIT_PYTHON)")
@pytest.mark.parametrize("args", [["--rank", "8"], ["--rank", "40", "--embed-lora"]])
def test_side_by_side_with_mergekit_extract_lora(pair, tmp_path, args):
    mk_args = ["--base-model", pair[0], "--model", pair[1], "--max-rank", args[1],
               *(["--embed-lora"] if "--embed-lora" in args else [])]
    (tmp_path / "args.json").write_text(json.dumps(mk_args))
    result = run_driver([[str(tmp_path / "args.json"), str(tmp_path / "mk"), "extract_lora"]], tmp_path)
    assert isinstance(result["mk"], Path), result
    ours, cfg = extract(pair, tmp_path / "ours", *args)
    theirs = load_file(str(tmp_path / "mk" / "adapter_model.safetensors"))
    mk_cfg = json.loads((tmp_path / "mk" / "adapter_config.json").read_text())
    assert ours.keys() == theirs.keys()
    for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "peft_type", "use_rslora"):
        assert cfg[k] == mk_cfg[k], k
    assert set(cfg["target_modules"]) == set(mk_cfg["target_modules"])
    assert set(cfg["modules_to_save"]) == set(mk_cfg["modules_to_save"])
    for k in ours:
        if k.endswith(("lora_A.weight", "lora_embedding_A")):
            bk = k.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
            # singular vectors are unique up to sign: compare the products
            torch.testing.assert_close(ours[bk] @ ours[k], theirs[bk] @ theirs[k], rtol=1e-4, atol=1e-5)
        elif "lora_B" not in k and "lora_embedding_B" not in k:
            assert torch.equal(ours[k], theirs[k]), k
