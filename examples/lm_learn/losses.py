"""Losses and batches for `mergelang learn` on a transformers causal LM (adamerging.mrg,
fewshot.mrg). The model skeleton (config and tokenizer, no weights) comes from the folder in the
environment variable MERGELANG_LM (default: models/base); the merged tensors drive it through
`ml.objectives.forward` (torch.func.functional_call: differentiable, nothing copied).

* `entropy_loss(state, batch)`: AdaMerging's objective, the mean entropy of the next-token
  distributions at the real (non-padding) positions; `unlabeled()`: batches of unlabeled.txt.
* `cross_entropy_loss(state, batch)`: the mean next-token cross-entropy (transformers' own
  causal-LM loss, padding excluded); `fewshot()`: batches of fewshot.txt.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

import mergelang as ml

HERE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def skeleton():
    import transformers

    folder = os.environ.get("MERGELANG_LM", "models/base")
    config = transformers.AutoConfig.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.requires_grad_(False)
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def _batches(path: Path, size: int = 4) -> list[dict[str, torch.Tensor]]:
    _, tok = skeleton()
    ids = [tok(line)["input_ids"] for line in path.read_text().splitlines() if line.strip()]
    out = []
    for k in range(0, len(ids), size):
        chunk = ids[k:k + size]
        width = max(len(i) for i in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, i in enumerate(chunk):
            input_ids[r, :len(i)], mask[r, :len(i)] = torch.tensor(i), 1
        out.append({"input_ids": input_ids, "attention_mask": mask})
    return out


def unlabeled() -> list[dict[str, torch.Tensor]]:
    return _batches(HERE / "unlabeled.txt")


def fewshot() -> list[dict[str, torch.Tensor]]:
    return _batches(HERE / "fewshot.txt")


def entropy_loss(state, batch) -> torch.Tensor:
    model, _ = skeleton()
    logits = ml.objectives.forward(model, state, **batch).logits
    return ml.objectives.entropy(logits[batch["attention_mask"].bool()])


def cross_entropy_loss(state, batch) -> torch.Tensor:
    model, _ = skeleton()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return ml.objectives.forward(model, state, **batch, labels=labels).loss
