"""Tiny transformers models with real word-level tokenizers, saved in tmp_path, and data files:
shared by the tests of `mergelang stats` and the data objectives."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "big", "red", "ran", "to", "home",
         "and", "it", "was", "good", "bad", "day", "night", "sun"]
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
VOCAB = SPECIAL + WORDS

#: a 3-layer MLP's source, for the `--module FILE.py:MLP` tests (correlation, hostile inputs)
MLP_SOURCE = '''
import sys, torch
from torch import nn

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 10), nn.Linear(10, 8), nn.Linear(8, 3)])

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)
'''
#: align's permutation groups of that MLP's two hidden layers
GROUPS = ["h0: layers.0.weight@0 layers.0.bias@0 layers.1.weight@1",
          "h1: layers.1.weight@0 layers.1.bias@0 layers.2.weight@1"]

TEXTS = ["the cat sat on the mat", "a big red dog ran home", "it was a good day",
         "the sun and the night", "a dog", "the cat ran to the red mat and sat",
         "bad night", "it was the big day and the sun was good"]


def write_tokenizer(folder: Path, bos: bool = True) -> None:
    """A word-level tokenizer over VOCAB; `bos`: a <s> is prepended to every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128, "pad_token": "<pad>",
         "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}))


def llama_config(**kw):
    import transformers

    args = dict(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    args.update(kw)
    return transformers.LlamaConfig(**args)


def save_llama(folder: Path, seed: int, base: Path | None = None, scale: float = 0.05, **kw) -> Path:
    """A tiny LlamaForCausalLM in `folder` (random init from `seed`; with `base`: base's
    weights plus `scale` noise, a fine-tune)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config(**kw)).eval()
    if base is not None:
        ref = transformers.LlamaForCausalLM.from_pretrained(str(base))
        with torch.no_grad():
            for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
                p.copy_(q + scale * torch.randn_like(q))
    model.save_pretrained(str(folder))
    write_tokenizer(folder)
    return folder


def save_classifier(folder: Path, seed: int) -> Path:
    """A tiny BertForSequenceClassification (3 labels) with the word-level tokenizer."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=24, num_labels=3,
                                  max_position_embeddings=64, pad_token_id=0)
    transformers.BertForSequenceClassification(cfg).eval().save_pretrained(str(folder))
    write_tokenizer(folder)
    return folder


def write_texts(path: Path, texts=TEXTS) -> Path:
    path.write_text("\n".join(texts) + "\n")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def encode(folder: Path, text: str) -> torch.Tensor:
    """Input ids (1, T) by the folder's own tokenizer, through transformers."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    return torch.tensor([tok(text)["input_ids"]])
