"""Test helpers for `align`: tiny random transformers models and randomly permuted copies.

`permuted_copy` permutes a model's state dict by random permutations of every group of its
built-in spec; a permuted copy computes the same function, so comparing logits in transformers
proves the spec right, and aligning the copy back must give the original tensors exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergelang.sources.align import apply_permutations, random_permutations, spec_for

VOCAB = 64


def llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


def gpt2_config(**kw):
    from transformers import GPT2Config

    base = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return GPT2Config(**base)


def tiny_model(config, seed: int = 0, jitter: float = 0.1):
    """A random model; norms and biases get noise too (they start at 1 / 0, which would hide
    a wrong permutation of them)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(jitter * torch.randn_like(p))
    return model


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def permuted_copy(model, seed: int = 1):
    """(permuted state dict, the permutations used, the spec)."""
    state = state_of(model)
    spec = spec_for(model.config.to_dict(), {k: tuple(v.shape) for k, v in state.items()})
    perms = random_permutations(spec, seed)
    return apply_permutations(state, spec, perms), perms, spec


def logits(model, state: dict[str, torch.Tensor] | None = None, seed: int = 0) -> torch.Tensor:
    if state is not None:
        model.load_state_dict(state)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(3, VOCAB, (2, 12), generator=gen)
    with torch.no_grad():
        return model(x).logits


def save(model, state: dict[str, torch.Tensor], folder: Path) -> Path:
    model.load_state_dict(state)
    model.save_pretrained(folder)
    return folder
