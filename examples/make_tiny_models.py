#!/usr/bin/env python3
"""Build three tiny random Llama checkpoints to try mergelang recipes on.

    python examples/make_tiny_models.py                 # -> examples/models/{base,math,code}
    python examples/make_tiny_models.py --out /tmp/tm --seed 1

`base` is a randomly initialised Llama (vocab 128, hidden 64, 4 layers, GQA 4/2 heads, untied
embeddings); `math` and `code` are "fine-tunes": base plus small seeded gaussian perturbations
(about 1% of each tensor's scale), different for each model. Every model is saved in float32 with
`save_pretrained(..., max_shard_size="200KB")`, so each folder is a *sharded* Hugging Face
checkpoint (several model-0000i-of-0000N.safetensors + model.safetensors.index.json), together
with a tiny word-level tokenizer. Everything is offline and takes a few seconds on a CPU.

Tests import this file and call `make_models(out, seed)`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "models"

VOCAB_SIZE = 128
#: name -> generator seed offset of its perturbation (None: the unperturbed base)
MODELS = {"base": None, "math": 1, "code": 2}
#: perturbation size relative to each tensor's scale
NOISE = 0.01


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def tiny_tokenizer():
    """A 128-entry word-level tokenizer (special tokens + a few words + filler); None if the
    `tokenizers` stack is unavailable. It only has to load and round-trip, not be useful."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
    except ImportError:  # pragma: no cover - optional
        return None
    words = ["<pad>", "<s>", "</s>", "<unk>"]
    words += ("the a of and to in is it that for on with as was at by an be this are from or "
              "one two three four five six seven eight nine ten plus minus times equals def "
              "return if else for while print import class x y z").split()
    words += [f"w{i}" for i in range(VOCAB_SIZE - len(words))]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    i = len(vocab)
    while len(vocab) < VOCAB_SIZE:  # only if the word list had duplicates
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def _perturbed(state: dict, seed: int, noise: float = NOISE) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(state):
        t = state[name]
        if not t.is_floating_point():
            out[name] = t.clone()
            continue
        scale = t.float().std().item() if t.numel() > 1 else 0.0
        if not scale > 0:  # constant tensors (norm weights start at 1.0)
            scale = t.float().abs().mean().item() or 1.0
        delta = torch.randn(t.shape, generator=gen, dtype=torch.float32) * (noise * scale)
        out[name] = (t.float() + delta).to(t.dtype)
    return out


def make_models(out: Path, seed: int = 0, *, noise: float = NOISE, tokenizer: bool = True,
                max_shard_size: str = "200KB") -> dict[str, Path]:
    """Write base/math/code under `out` and return {name: folder}.

    `noise` is the fine-tunes' perturbation relative to each tensor's scale. At the default 1%
    math and code are so close (cosine > 0.9995) that slerp takes its linear fallback; tests
    that want the spherical branch pass a larger one (e.g. 0.05)."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config()).to(torch.float32).eval()
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tok = tiny_tokenizer() if tokenizer else None

    paths: dict[str, Path] = {}
    for name, offset in MODELS.items():
        folder = out / name
        state = base_state if offset is None else _perturbed(base_state, seed * 1000 + offset, noise)
        model.load_state_dict(state)
        # safetensors is save_pretrained's default format (transformers >= 4.35 and 5.x)
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        if not (folder / "model.safetensors.index.json").is_file():
            raise RuntimeError(f"{folder}: save_pretrained did not write a sharded checkpoint")
        if tok is not None:
            tok.save_pretrained(folder)
        paths[name] = folder
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"output folder (default: {DEFAULT_OUT})")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    ap.add_argument("--noise", type=float, default=NOISE,
                    help=f"fine-tune perturbation relative to weight scale (default: {NOISE})")
    ap.add_argument("--no-tokenizer", action="store_true", help="do not write tokenizer files")
    args = ap.parse_args(argv)

    paths = make_models(args.out, args.seed, noise=args.noise,
                        tokenizer=not args.no_tokenizer)
    for name, folder in paths.items():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        print(f"wrote {name:5s} -> {folder}  ({len(index['weight_map'])} tensors in "
              f"{len(shards)} shards)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
