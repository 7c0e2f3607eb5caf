"""Tiny Llama folders with real (BPE, `tokenizers`-built) tokenizers whose vocabularies differ:
shared by the tokenizer_source tests and the side-by-side tests against mergekit."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, LAYERS = 8, 2
BASE_TOKENS = [f"t{i}" for i in range(40)]


def write_tokenizer(folder: Path, tokens: list[str], special: list[str]) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_tokens([AddedToken(s, special=True) for s in special])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128}))


def write_model(folder: Path, tokens: list[str], special: list[str], rows: int, seed: int,
                base: dict | None = None, template: str | None = None) -> str:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(rows, HIDDEN, generator=g),
          "lm_head.weight": torch.randn(rows, HIDDEN, generator=g),
          "model.norm.weight": torch.randn(HIDDEN, generator=g)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for n, s in (("self_attn.q_proj.weight", (HIDDEN, HIDDEN)), ("self_attn.k_proj.weight", (HIDDEN, HIDDEN)),
                     ("self_attn.v_proj.weight", (HIDDEN, HIDDEN)), ("self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                     ("mlp.gate_proj.weight", (16, HIDDEN)), ("mlp.up_proj.weight", (16, HIDDEN)),
                     ("mlp.down_proj.weight", (HIDDEN, 16)), ("input_layernorm.weight", (HIDDEN,)),
                     ("post_attention_layernorm.weight", (HIDDEN,))):
            sd[p + n] = torch.randn(s, generator=g) if base is None else base[p + n] + 0.1 * torch.randn(s, generator=g)
    save_file(sd, str(folder / "model.safetensors"))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
           "intermediate_size": 16, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
           "num_key_value_heads": 2, "vocab_size": rows, "tie_word_embeddings": False,
           "rms_norm_eps": 1e-5, "torch_dtype": "float32", "max_position_embeddings": 64}
    (folder / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(folder, tokens, special)
    if template:
        tc = json.loads((folder / "tokenizer_config.json").read_text())
        tc["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    return str(folder)


def make_models(root: Path) -> dict[str, str]:
    """base: 40 tokens + 2 special, 48 rows (padded past its tokenizer, like Qwen);
    a: base's tokens reordered plus x1, x2 (44 rows); b: base without t5..t9, plus x2, y1."""
    from safetensors.torch import load_file

    base = write_model(root / "base", BASE_TOKENS, ["<s>", "</s>"], 48, 0, template="T-{{ base }}")
    bsd = load_file(str(Path(base) / "model.safetensors"))
    a_tokens = BASE_TOKENS[::-1] + ["x1", "x2"]
    a = write_model(root / "a", a_tokens, ["<s>", "</s>"], 44, 1, bsd, template="T-{{ a }}")
    b_tokens = [t for t in BASE_TOKENS if t not in {f"t{i}" for i in range(5, 10)}] + ["x2", "y1"]
    b = write_model(root / "b", b_tokens, ["</s>", "<pad>"], 40, 2, bsd, template="T-{{ a }}")
    return {"base": base, "a": a, "b": b}
