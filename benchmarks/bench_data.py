#!/usr/bin/env python3
"""Time per 1k tokens of `mergelang stats` (gram, fisher) and of one `perplexity` trial.

Models (random weights, saved into a temporary folder, with a word-level tokenizer):
* tiny: the tests' Llama (hidden 16, 2 layers, 24-word vocabulary);
* small: a Llama with hidden 512, 4 layers, intermediate 1536 (~13M parameters; `--small`).
Data: N random sentences of 30 words. Each figure is the best of `--repeat` runs of the
computation itself (the model and data loading excluded), divided by the number of real tokens /
1000: wall time, and the process's CPU time (on a shared machine the CPU time is the steadier
number; torch runs one thread here, `--threads`).

    python benchmarks/bench_data.py [--examples 64] [--repeat 3] [--small] [--device cpu]
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


def bench(folder: Path, data: Path, repeat: int, device: str) -> dict[str, float]:
    import torch

    out = {}
    tokens = ml.stats(folder, data, kind="gram", device=device).info["tokens"]
    for kind, bs in (("gram", 8), ("fisher", 1), ("fisher", 8)):
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="also the ~13M-parameter model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = dm.write_texts(root / "d.txt", [" ".join(rng.choice(dm.WORDS) for _ in range(30))
                                               for _ in range(args.examples)])
        models = {"tiny": dm.save_llama(root / "tiny", 0)}
        if args.small:
            models["small"] = dm.save_llama(root / "small", 0, hidden_size=512, intermediate_size=1536,
                                            num_hidden_layers=4, num_attention_heads=8,
                                            num_key_value_heads=8)
        for name, folder in models.items():
            n = sum(p.numel() for p in __import__("safetensors.torch", fromlist=["load_file"])
                    .load_file(str(folder / "model.safetensors")).values())
            print(f"{name} ({n / 1e6:.2f}M parameters), {args.examples} examples, device {args.device}:",
                  flush=True)
            bench(folder, data, args.repeat, args.device)


if __name__ == "__main__":
    main()
