#!/usr/bin/env python3
"""Does aligning before averaging help? Two tiny Llamas trained from different seeds.

    PYTHONPATH=. python benchmarks/align_experiment.py [--task bigram] [--steps 300] [--pairs 3]

Tasks: `bigram` (default): a random first-order Markov chain over `--vocab` (256) tokens (next
token ~ softmax(2 * N(0, 1)) row of the previous token); `order2`: a random order-2 Markov chain
over 32 tokens (the next token depends on the previous two, so attention has to look back; the
first experiment, a negative result). Each model is trained on it for `--steps` Adam steps from its
own random initialisation (seeds 100+k and 200+k, same data stream). Both are saved as HF
folders, then merged by mergelang with

    plain:   linear([a, b])
    aligned: linear([a, align(b, to = a)])            (weight matching)
    ot:      linear([a, align(b, to = a, method = "ot")])
    ot_reg=R: linear([a, align(b, to = a, method = "ot", reg = R)])   (soft OT, --reg)

and, with `--activations`, activations: linear([a, align(b, to = a, by = "activations", stats = c)])
(`c` from `ml.stats([a, b], ..., kind="correlation")` on 256 fresh sequences of the training chain),
plus two ablations through the Python API: weight matching without the residual group
(`no_residual`) and with the residual group alone (`residual_only`).

and every model's cross-entropy is measured on held-out sequences. Control (`--no-control` skips
it): `c` = `a` fine-tuned for steps/3 more steps on other data and saved with all its units
randomly permuted; plain vs aligned average of `a` and that permuted `c`. About a minute per
pair on one free CPU core (4.5 minutes for 2 pairs on the busy machine where the numbers in
docs/align.md were measured).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mergelang as ml  # noqa: E402

SEQ = 32
SIZE = {"layers": 2, "inner": 192, "lr": 3e-3, "vocab": 256, "hidden": 64, "task": "bigram"}


def config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=SIZE["vocab"], hidden_size=SIZE["hidden"], intermediate_size=SIZE["inner"],
                       num_hidden_layers=SIZE["layers"],
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=0)


def chain(seed: int = 0) -> torch.Tensor:
    """Transition table: (prev2, prev1) -> distribution over next, peaked on 2 tokens (order2),
    or prev1 -> next (bigram), as a (V, V, V) table indexed [prev2, prev1]."""
    VOCAB = SIZE["vocab"]
    g = torch.Generator().manual_seed(seed)
    if SIZE["task"] == "bigram":
        return (torch.randn(VOCAB, VOCAB, generator=g) * 2).softmax(-1).expand(VOCAB, VOCAB, VOCAB)
    logits = torch.randn(VOCAB, VOCAB, VOCAB, generator=g) * 0.5
    top = torch.randint(0, VOCAB, (VOCAB, VOCAB, 2), generator=g)
    logits.scatter_add_(2, top, torch.full(top.shape, 4.0))
    return logits.softmax(-1)


def sample(table: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.empty(n, SEQ, dtype=torch.long)
    x[:, :2] = torch.randint(0, SIZE["vocab"], (n, 2), generator=gen)
    for t in range(2, SEQ):
        x[:, t] = torch.multinomial(table[x[:, t - 2], x[:, t - 1]], 1, generator=gen).squeeze(1)
    return x


def loss_of(model, data: torch.Tensor) -> float:
    with torch.no_grad():
        return model(data, labels=data).loss.item()


def train(seed: int, table: torch.Tensor, steps: int, batch: int = 32, init=None, data_seed: int = 12345):
    import copy

    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config()) if init is None else copy.deepcopy(init)
    opt = torch.optim.AdamW(model.parameters(), lr=SIZE["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(data_seed)  # same data for both models: only the init differs
    model.train()
    for _ in range(steps):
        x = sample(table, batch, gen)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def merged_loss(expr: str, folders: dict, test: torch.Tensor) -> float:
    from transformers import LlamaForCausalLM

    text = "".join(f'model {k} = "{v}"\n' for k, v in folders.items())
    text += f'merge from a {{\n    "*" => {expr}\n}}\n'
    merged = ml.compile(text).evaluate()
    m = LlamaForCausalLM(config()).eval()
    m.load_state_dict(merged, strict=False)
    return loss_of(m, test)


def ablation(a, b, test: torch.Tensor) -> dict:
    """Weight matching without the residual group, and with it alone (Python API)."""
    from transformers import LlamaForCausalLM

    from mergelang.sources.align import apply_permutations, spec_for, weight_matching
    from mergelang.sources.align.spec import AlignSpec

    sa, sb = a.state_dict(), b.state_dict()
    spec = spec_for(a.config.to_dict(), {k: tuple(v.shape) for k, v in sa.items()})
    out = {}
    for key, keep in (("no_residual", lambda g: g.name != "residual"), ("residual_only", lambda g: g.name == "residual")):
        sub = AlignSpec(spec.arch, tuple(g for g in spec.groups if keep(g)))
        moved = apply_permutations(sb, sub, weight_matching(sa, sb, sub).perms)
        m = LlamaForCausalLM(config()).eval()
        m.load_state_dict({k: (sa[k] + moved[k]) / 2 for k in sa})
        out[key] = loss_of(m, test)
    return out


def permute_saved(model, folder: Path, seed: int = 7) -> None:
    from mergelang.sources.align import apply_permutations, random_permutations, spec_for

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    spec = spec_for(model.config.to_dict(), {k: tuple(v.shape) for k, v in state.items()})
    model.load_state_dict(apply_permutations(state, spec, random_permutations(spec, seed)))
    model.save_pretrained(folder)


def activation_stats(pa: Path, pb: Path, table: torch.Tensor, tmp: Path, k: int) -> Path:
    """The correlation sidecar of a and b on 256 fresh sequences of the training chain."""
    torch.save(sample(table, 256, torch.Generator().manual_seed(4242)), tmp / "acts.pt")
    (tmp / "acts.py").write_text("from pathlib import Path\nimport torch\nBATCHES = [{'input_ids': x} for x in "
                                 "torch.load(Path(__file__).parent / 'acts.pt').split(32)]\n")
    out = tmp / f"corr{k}"
    ml.stats([pa, pb], f"{tmp / 'acts.py'}:BATCHES", kind="correlation", out=out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("bigram", "order2"), default="bigram")
    ap.add_argument("--vocab", type=int, help="default 256 (bigram) / 32 (order2)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--reg", type=float, nargs="*", default=[0.01, 0.05], help="soft OT regularisations")
    ap.add_argument("--no-ablation", dest="ablation", action="store_false")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--inner", type=int, default=192, help="MLP width")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="skip the permuted fine-tune control")
    ap.add_argument("--activations", action="store_true",
                    help="also align by activations: `mergelang stats A B --kind correlation` on 256 "
                         "training sequences (ml.stats), then align(b, to = a, by = \"activations\")")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    SIZE.update(layers=args.layers, inner=args.inner, lr=args.lr, hidden=args.hidden, task=args.task,
                vocab=args.vocab or (256 if args.task == "bigram" else 32))
    torch.set_num_threads(1)
    from transformers import LlamaForCausalLM  # noqa: F401 - fail early without transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    table = chain(0)
    test = sample(table, 512, torch.Generator().manual_seed(999))
    entropy = -(table[test[:, :-2], test[:, 1:-1]].gather(-1, test[:, 2:, None]).log()).mean().item()
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.pairs):
            a, b = train(100 + k, table, args.steps), train(200 + k, table, args.steps)
            pa, pb = Path(tmp) / f"a{k}", Path(tmp) / f"b{k}"
            a.save_pretrained(pa)
            b.save_pretrained(pb)
            row = {"pair": k, "a": loss_of(a, test), "b": loss_of(b, test),
                   "train_s": round(time.perf_counter() - t0, 1)}
            exprs = [("plain", "linear([a, b])"), ("aligned", "linear([a, align(b, to = a)])"),
                     ("ot", 'linear([a, align(b, to = a, method = "ot")])')]
            exprs += [(f"ot_reg={r:g}", f'linear([a, align(b, to = a, method = "ot", reg = {r!r})])')
                      for r in args.reg]
            for key, expr in exprs:
                row[key] = merged_loss(expr, {"a": pa, "b": pb}, test)
                row[key + "_s"] = round(time.perf_counter() - t0, 1)
            if args.activations:
                corr = activation_stats(pa, pb, table, Path(tmp), k)
                row["activations"] = merged_loss('linear([a, align(b, to = a, by = "activations", stats = c)])',
                                                 {"a": pa, "b": pb, "c": corr}, test)
                row["activations_s"] = round(time.perf_counter() - t0, 1)
            if args.ablation:
                row.update(ablation(a, b, test))
            if args.control:
                # control: a short fine-tune of `a` on other data, with its units randomly permuted
                c = train(300 + k, table, max(1, args.steps // 3), init=a, data_seed=54321)
                pc, pcp = Path(tmp) / f"c{k}", Path(tmp) / f"cp{k}"
                c.save_pretrained(pc)
                row["ctl_finetune"] = loss_of(c, test)
                permute_saved(c, pcp)
                row["ctl_unpermuted_avg"] = merged_loss("linear([a, c])", {"a": pa, "c": pc}, test)
                row["ctl_plain"] = merged_loss("linear([a, c])", {"a": pa, "c": pcp}, test)
                row["ctl_aligned"] = merged_loss("linear([a, align(c, to = a)])", {"a": pa, "c": pcp}, test)
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    VOCAB = SIZE["vocab"]
    summary = {"uniform": math.log(VOCAB), "chain_entropy": entropy, "steps": args.steps, **SIZE,
               "seconds": time.perf_counter() - t0, "pairs": rows}
    print(f"uniform guess {math.log(VOCAB):.3f}, true next-token entropy {entropy:.3f}, "
          f"{summary['seconds']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
