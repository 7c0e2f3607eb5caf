"""Mixture of experts from dense models (`moe(...)`, sources/moe.py): the output loads in
transformers as Mixtral / Qwen2-MoE, an MoE whose experts are all the base's MLP computes the base
model's logits (an independent check of the expert layout), routers as mergekit-moe makes them
(side by side with mergekit itself when MERGEKIT_PYTHON is set), and the diagnostics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mergelang as ml
from mergelang.diagnostics import MergelangError

transformers = pytest.importorskip("transformers")
WORDS = ["code", "python", "def", "return", "math", "solve", "equation", "number", "story", "once",
         "upon", "time", "the", "a", "is", "of"]


def _tokenizer(folder: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "model_max_length": 64}))


CFG = dict(vocab_size=3 + len(WORDS), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG))
    out = {}
    for name, noise in (("base", 0.0), ("e0", 0.2), ("e1", 0.2), ("e2", 0.2)):
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG))
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for n, p in m.named_parameters():
                if ".mlp." in n and noise:
                    p.add_(torch.randn_like(p) * noise)
        m.save_pretrained(root / name)
        _tokenizer(root / name)
        out[name] = root / name
    return out


def _src(dense: dict[str, Path], moe: str, models=("base", "e0", "e1", "e2")) -> str:
    return "".join(f'model {m} = "{dense[m]}"\n' for m in models) + f"model moe = {moe}\n" + \
        'merge from moe { "*" => moe }\n'


def test_mixtral_of_copies_of_the_base_is_the_base(dense, tmp_path: Path) -> None:
    """Experts that are all the base's MLP, routing weights renormalised over the top k: the MoE
    computes exactly the dense model (wrong gate/up order or transposes would not)."""
    out = ml.compile(_src(dense, "moe(base, [base, base, base], gate = \"random\", seed = 3)",
                          ("base",))).run(tmp_path / "out", device="cpu")
    moe, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    base = transformers.AutoModelForCausalLM.from_pretrained(dense["base"])
    ids = torch.tensor([[1, 3, 5, 7, 9, 4]])
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, base(ids).logits, atol=1e-5)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_local_experts"] == 3 and cfg["num_experts_per_tok"] == 2
    assert (out / "tokenizer.json").is_file()


def test_expert_tensors_and_random_router(dense, tmp_path: Path) -> None:
    out = ml.compile(_src(dense, "moe(base, [e0, e1, e2], experts_per_token = 1, "
                                 "residual_scale = [1.0, 0.5, 1.0], seed = 7)")).run(tmp_path / "out", device="cpu")
    got = load_file(str(next(out.glob("*.safetensors"))))
    src = {m: load_file(str(dense[m] / "model.safetensors")) for m in ("base", "e0", "e1", "e2")}
    p = "model.layers.1.mlp."
    gu = got[p + "experts.gate_up_proj"]
    assert gu.shape == (3, 96, 32)
    for i, e in enumerate(("e0", "e1", "e2")):
        assert torch.equal(gu[i], torch.cat([src[e][p + "gate_proj.weight"], src[e][p + "up_proj.weight"]]))
    assert torch.equal(got[p + "experts.down_proj"][1], src["e1"][p + "down_proj.weight"] * 0.5)
    want = torch.randn((2, 3, 32), generator=torch.Generator().manual_seed(7))
    assert torch.equal(got["model.layers.0.mlp.gate.weight"], want[0])
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], src["base"]["model.layers.0.self_attn.q_proj.weight"])
    assert not any(k.endswith("mlp.gate_proj.weight") for k in got)
    moe = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert moe.config.num_experts_per_tok == 1
    moe(torch.tensor([[1, 2, 3]]))


def _cheap(tok, embed: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Independent: the normalised sum of the prompts' token embeddings (BOS first)."""
    total = torch.zeros(embed.shape[1])
    for p in prompts:
        for t in tok(tok.bos_token + p, add_special_tokens=False)["input_ids"]:
            total += embed[t]
    return total / total.norm()


def test_cheap_embed_router(dense, tmp_path: Path) -> None:
    prompts = [["def return python"], ["solve the equation", "a number"], ["once upon a time"]]
    src = _src(dense, "moe(base, [e0, e1, e2], gate = \"cheap_embed\", prompts = "
               + json.dumps(prompts) + ", negative_prompts = [[], [\"story\"], []])")
    out = ml.compile(src).run(tmp_path / "out", device="cpu")
    got = load_file(str(next(out.glob("*.safetensors"))))
    tok = transformers.AutoTokenizer.from_pretrained(dense["base"])
    embed = load_file(str(dense["base"] / "model.safetensors"))["model.embed_tokens.weight"]
    rows = [_cheap(tok, embed, prompts[0]), _cheap(tok, embed, prompts[1]) - _cheap(tok, embed, ["story"]),
            _cheap(tok, embed, prompts[2])]
    want = torch.stack([r / r.norm() for r in rows])
    for layer in (0, 1):  # the same for every layer
        assert torch.allclose(got[f"model.layers.{layer}.mlp.gate.weight"], want, atol=1e-6)


def test_hidden_router_runs_the_base(dense, tmp_path: Path) -> None:
    prompts = [["def return python"], ["solve the equation"], ["once upon a time"]]
    out = ml.compile(_src(dense, "moe(base, [e0, e1, e2], gate = \"hidden\", prompts = "
                          + json.dumps(prompts) + ")")).run(tmp_path / "out", device="cpu")
    got = load_file(str(next(out.glob("*.safetensors"))))
    base = transformers.AutoModelForCausalLM.from_pretrained(dense["base"], dtype=torch.bfloat16)
    tok = transformers.AutoTokenizer.from_pretrained(dense["base"])
    ids = tok(tok.bos_token + prompts[1][0], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        hs = base(**ids, output_hidden_states=True).hidden_states
    for layer in (0, 1):  # layer l's router row: the hidden state entering layer l, last token
        v = hs[layer][0, -1].float()
        assert torch.allclose(got[f"model.layers.{layer}.mlp.gate.weight"][1], v / v.norm(), atol=1e-6)


def test_qwen2_moe_with_a_shared_expert(dense, tmp_path: Path) -> None:
    out = ml.compile(_src(dense, "moe(base, [e0, e1], shared = e2, output = \"qwen2_moe\")")).run(
        tmp_path / "out", device="cpu")
    moe, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    assert not info["unexpected_keys"]
    assert all("bias" in k for k in info["missing_keys"])  # Llama attention has no biases
    got = load_file(str(next(out.glob("*.safetensors"))))
    e2 = load_file(str(dense["e2"] / "model.safetensors"))
    assert torch.equal(got["model.layers.0.mlp.shared_expert.up_proj.weight"], e2["model.layers.0.mlp.up_proj.weight"])
    assert got["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 32)
    moe(torch.tensor([[1, 2, 3]]))


def test_expert_of_other_shapes_is_E323(dense, tmp_path: Path) -> None:
    cfg = transformers.LlamaConfig(**{**CFG, "intermediate_size": 40})
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "odd")
    src = f'model base = "{dense["base"]}"\nmodel odd = "{tmp_path / "odd"}"\n' \
          'model moe = moe(base, [base, odd])\nmerge from moe { "*" => moe }\n'
    with pytest.raises(MergelangError) as ei:
        ml.compile(src)
    d = ei.value.diagnostics[0]
    assert d.code == "E323" and "`odd`" in d.message and "`base`" in d.message and "[40, 32]" in d.message


@pytest.mark.parametrize("call, text", [
    ('moe(base, [e0, e1], gate = "learned")', "gate must be one of"),
    ('moe(base, [e0, e1], gate = "cheap_embed")', "needs positive prompts"),
    ('moe(base, [e0, e1], gate = "cheap_embed", prompts = [["a"], ["a"]])', "same prompts"),
    ('moe(base, [e0, e1], experts_per_token = 3)', "experts_per_token"),
    ('moe(base, [e0, e1], output = "qwen2_moe")', "needs one shared expert"),
    ('moe(base, [e0, e1], shared = e2)', "no shared expert"),
    ('moe(base, [e0, e1], output = "deepseek")', "output must be"),
])
def test_bad_settings_are_E324(dense, call: str, text: str) -> None:
    with pytest.raises(MergelangError) as ei:
        ml.compile(_src(dense, call))
    d = ei.value.diagnostics[0]
    assert d.code == "E324" and text in d.message, d.message


@pytest.mark.skipif(not os.environ.get("MERGEKIT_PYTHON"), reason="needs a mergekit venv (MERGEKIT_PYTHON)")
def test_side_by_side_with_mergekit_moe(dense, tmp_path: Path) -> None:
    """mergekit-moe 0.1.5 and mergelang on the same cheap_embed config: every tensor equal."""
    from test_mergekit_side_by_side import read_folder, run_driver

    cfg = {"base_model": str(dense["base"]), "gate_mode": "cheap_embed", "experts_per_token": 2,
           "experts": [{"source_model": str(dense["e0"]), "positive_prompts": ["def return python"]},
                       {"source_model": str(dense["e1"]), "positive_prompts": ["solve the equation"],
                        "negative_prompts": ["story"]},
                       {"source_model": str(dense["e2"]), "positive_prompts": ["once upon a time"]}]}
    (tmp_path / "moe.yml").write_text(json.dumps(cfg))
    res = run_driver([[str(tmp_path / "moe.yml"), str(tmp_path / "mk"), "moe"]], tmp_path)
    assert isinstance(res["mk"], Path), res["mk"]
    ours = ml.compile(_src(dense, 'moe(base, [e0, e1, e2], gate = "cheap_embed", prompts = '
                                  '[["def return python"], ["solve the equation"], ["once upon a time"]], '
                                  'negative_prompts = [[], ["story"], []])')).run(tmp_path / "ml", device="cpu")
    theirs, mine = read_folder(res["mk"]), read_folder(ours)
    assert set(theirs) == set(mine)
    for k in theirs:
        assert torch.allclose(theirs[k].float(), mine[k].float(), atol=1e-6), k
    a = json.loads((res["mk"] / "config.json").read_text())
    b = json.loads((ours / "config.json").read_text())
    for key in ("architectures", "model_type", "num_local_experts", "num_experts_per_tok"):
        assert a[key] == b[key], key


def test_import_mergekit_moe_config(dense, tmp_path: Path) -> None:
    """A mergekit-moe config becomes `model moe = moe(...)`; the recipe gives the same tensors as
    the hand-written one."""
    from click.testing import CliRunner

    from mergelang.cli import main

    cfg = {"base_model": str(dense["base"]), "gate_mode": "cheap_embed", "experts_per_token": 1,
           "dtype": "float32",
           "experts": [{"source_model": str(dense["e0"]), "positive_prompts": ["def \"return\"\npython"]},
                       {"source_model": str(dense["e1"]), "positive_prompts": ["solve"],
                        "negative_prompts": ["story"], "residual_scale": 0.5, "noise_scale": 0.1}]}
    (tmp_path / "moe.yml").write_text(json.dumps(cfg))
    res = CliRunner().invoke(main, ["import-mergekit", str(tmp_path / "moe.yml"), "-o", str(tmp_path / "r.mrg")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "r.mrg").read_text()
    assert "model moe = moe(base, [e0, e1], gate = \"cheap_embed\"" in text and "W102" in text
    imported = ml.compile(tmp_path / "r.mrg").evaluate()
    direct = ml.compile(_src(dense, 'moe(base, [e0, e1], gate = "cheap_embed", prompts = '
                                    '[["def \\"return\\"\\npython"], ["solve"]], negative_prompts = [[], ["story"]], '
                                    "experts_per_token = 1, residual_scale = [1, 0.5])",
                             ("base", "e0", "e1"))).evaluate()
    assert imported.keys() == direct.keys()
    assert all(torch.equal(imported[k], direct[k]) for k in direct)


def test_import_mergekit_moe_unsupported(tmp_path: Path) -> None:
    from mergelang.interop.mergekit_import import translate

    res = translate({"base_model": "b", "gate_mode": "uniform_random", "experts": [{"source_model": "x"}]})
    assert [d.code for d in res.diagnostics if d.is_error] == ["E704"]
    res = translate({"base_model": "b", "experts": [{"source_model": "x"}],
                     "shared_experts": [{"source_model": "y"}, {"source_model": "z"}]})
    assert [d.code for d in res.diagnostics if d.is_error] == ["E704"]
