#!/usr/bin/env python3
"""Time per 1k tokens of `mergelang stats` (gram, fisher) and of one `perplexity` trial.

Models (random weights, saved into a temporary folder, with a word-level tokenizer):
* tiny: the tests' Llama (hidden 16, 2 layers, 24-word vocabulary);
* small: a Llama with hidden 512, 4 layers, intermediate 1536 (~13M parameters; `--small`);
* large: a Llama with hidden 1024, 16 layers, intermediate 2816, 16 heads and a 32000-row
  vocabulary (0.27B parameters, the size issue #30 names; `--large`, `--large-examples` examples,
  one run of each computation, the batch-1 Fisher only with `--large-fisher-1`: about 2.5
  minutes on the shared 2-core VM, 6 with it).
Data: N random sentences of 30 words. Each figure is the best of `--repeat` runs of the
computation itself (the model and data loading excluded), divided by the number of real tokens /
1000: wall time, and the process's CPU time (on a shared machine the CPU time is the steadier
number; torch runs one thread here, `--threads`).

    python benchmarks/bench_data.py [--examples 64] [--repeat 3] [--small] [--large] [--device cpu]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "datatools"))

import data_models as dm  # noqa: E402

import mergelang as ml  # noqa: E402


def bench(folder: Path, data: Path, repeat: int, device: str,
          kinds: tuple = (("gram", 8), ("fisher", 1), ("fisher", 8))) -> dict[str, float]:
    import torch

    out = {}
    tokens = ml.stats(folder, data, kind="gram", device=device).info["tokens"]
    for kind, bs in kinds:
        import mergelang.data.stats as S

        lm = S.load_model(folder, torch.device(device))
        d = S.load_data(data)
        best = (float("inf"), float("inf"))
        for _ in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            if kind == "gram":
                S._grams(lm, d, torch.device(device), bs, 512, None, None, S.Counts(), False, [], None)
            else:
                S._fisher(lm, d, torch.device(device), bs, 512, None, S.Counts(), False)
            best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
        report(out, f"stats {kind} (batch {bs})", best, tokens)
    f = ml.objectives.perplexity(data, config=folder)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).to(device)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    f(state)  # warm-up
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        f(state)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    report(out, "perplexity trial (batch 8)", best, tokens)
    return out


def report(out: dict, what: str, best: tuple[float, float], tokens: int) -> None:
    wall, cpu = (x / tokens * 1000 for x in best)
    out[what] = wall
    print(f"  {what:<28} {wall * 1000:9.1f} ms wall, {cpu * 1000:9.1f} ms CPU per 1k tokens "
          f"({tokens} tokens)", flush=True)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="also the ~13M-parameter model")
    ap.add_argument("--large", action="store_true", help="also the 0.27B-parameter model")
    ap.add_argument("--large-examples", type=int, default=8)
    ap.add_argument("--large-fisher-1", action="store_true", help="--large: also the batch-1 Fisher")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from machine import describe

    print(f"machine: {describe()}; torch threads {args.threads}", flush=True)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = [" ".join(rng.choice(dm.WORDS) for _ in range(30)) for _ in range(args.examples)]
        data = dm.write_texts(root / "d.txt", texts)
        models = {"tiny": dm.save_llama(root / "tiny", 0)}
        if args.small:
            models["small"] = dm.save_llama(root / "small", 0, hidden_size=512, intermediate_size=1536,
                                            num_hidden_layers=4, num_attention_heads=8,
                                            num_key_value_heads=8)
        if args.large:
            models["large"] = dm.save_llama(root / "large", 0, hidden_size=1024, intermediate_size=2816,
                                            num_hidden_layers=16, num_attention_heads=16,
                                            num_key_value_heads=16, vocab_size=32000)
            large_data = dm.write_texts(root / "large.txt", texts[:args.large_examples])
        for name, folder in models.items():
            from safetensors import safe_open

            n = 0
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(str(f), "pt") as h:
                    n += sum(_numel(h.get_slice(k).get_shape()) for k in h.keys())
            big = name == "large"
            print(f"{name} ({n / 1e6:.2f}M parameters), {args.large_examples if big else args.examples} "
                  f"examples, device {args.device}:", flush=True)
            kinds = (("gram", 8), ("fisher", 1), ("fisher", 8))
            if big and not args.large_fisher_1:
                kinds = (("gram", 8), ("fisher", 8))
            bench(folder, large_data if big else data, 1 if big else args.repeat, args.device, kinds)


if __name__ == "__main__":
    main()
