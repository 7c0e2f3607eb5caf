#!/usr/bin/env python3
"""Per-trial overhead of `tune` (issue 18: compile once, run many), measured side by side.

A ~20M-parameter Llama-shaped model and three fine-tunes, held in memory. For each method the
script times, per trial:

* `trial`: what tune does per trial — fill the run-time params, execute the compiled plan on the
  held inputs, hand the state to a no-op objective (TrialRunner.run), after one warm-up trial;
* `torch`: the same merge written directly in torch over the same in-memory tensors (the
  merge's own arithmetic, no mergelang), checked equal to the trial's result;
* `recompile`: what a loop without run-time params pays per trial on top (compile the recipe
  with the new values), for scale.

Prints the ratio trial / torch (target: per-trial overhead beyond the arithmetic under 5%, i.e.
a ratio under 1.05) and the fill step's share of a trial.

    python benchmarks/bench_tune_overhead.py [--trials 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergelang.compiler import compile_recipe  # noqa: E402
from mergelang.diagnostics import SourceFile  # noqa: E402
from mergelang.search.trials import TrialRunner  # noqa: E402

H, I, L, V = 512, 1536, 4, 6000  # 19.8M parameters


def shapes() -> dict[str, tuple[int, ...]]:
    s = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        s.update({p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (H, H),
                  p + "self_attn.v_proj.weight": (H, H), p + "self_attn.o_proj.weight": (H, H),
                  p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                  p + "mlp.down_proj.weight": (H, I), p + "input_layernorm.weight": (H,),
                  p + "post_attention_layernorm.weight": (H,)})
    return s


def model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v, generator=g) for k, v in shapes().items()}


HEAD = 'model base = "<memory>"\nmodel a = "<memory>"\nmodel b = "<memory>"\nmodel c = "<memory>"\n'
RECIPES = {
    "task_arithmetic": ("param w = [0.3, 0.3, 0.3] in [0, 1]\n"
                        'merge from base { "*" => task_arithmetic(base, [a, b, c], weights = w) }\n'),
    "ties": ("param d = 0.3 in [0.05, 1]\nparam lam = 1.0 in [0, 2]\n"
             'merge from base { "*" => ties(base, [a, b, c], density = d, lambda = lam) }\n'),
}


def torch_ta(m: dict, v: dict) -> dict[str, torch.Tensor]:
    base, w = m["base"], v["w"]
    return {k: base[k] + sum(wi * (m[n][k] - base[k]) for wi, n in zip(w, "abc")) for k in base}


def torch_ties(m: dict, v: dict) -> dict[str, torch.Tensor]:
    out = {}
    for k, base in m["base"].items():
        tv = torch.stack([m[n][k] - base for n in "abc"])
        flat = tv.abs().reshape(3, -1)
        kk = int(v["d"] * flat.shape[1])
        if kk < flat.shape[1]:  # exactly kk entries per model (ties: any of them)
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep.scatter_(1, torch.topk(flat, kk, dim=1, sorted=False).indices, True)
            tv = torch.where(keep.reshape(tv.shape), tv, 0)
        sign = torch.where(tv.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(tv) == sign
        num = torch.where(agree, tv, 0).sum(0)
        den = agree.sum(0).to(torch.float32)
        out[k] = base + v["lam"] * num / torch.where(den == 0, 1.0, den)
    return out


def timed(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=15)
    args = ap.parse_args()
    models = {n: model(i) for i, n in enumerate(["base", "a", "b", "c"])}
    params = sum(t.numel() for t in models["base"].values())
    print(f"model: {params / 1e6:.1f}M parameters x 4 models, in memory; torch threads "
          f"{torch.get_num_threads()}; median of {args.trials} trials")
    for name, body in RECIPES.items():
        src = HEAD + body

        def compile_(runtime, fixed, src=src):
            return compile_recipe(SourceFile("r.mrg", src), Path.cwd(), {**models, **fixed},
                                  runtime=runtime)
        values = {"task_arithmetic": {"w": [0.2, 0.5, 0.7]}, "ties": {"d": 0.3, "lam": 0.8}}[name]
        runner = TrialRunner(compile_, tuple(values))
        ref = (torch_ta if name == "task_arithmetic" else torch_ties)
        got = runner.run(values)  # warm-up: reads the inputs, compiles the fused loops
        want = ref(models, values)
        # entries that differ (TIES: which of several equal |x| at the threshold is kept)
        err = sum(int((got[k] - want[k]).abs().gt(1e-5).sum()) for k in want)
        trial = timed(lambda: runner.run(values), args.trials)
        plain = timed(lambda: ref(models, values), args.trials)
        c, filler, _ = runner._prepared(values)
        fill = timed(lambda: filler.fill({k: values[k] for k in runner.runtime}), args.trials)
        recompile = timed(lambda: compile_((), values).close(), 3)
        runner.close()
        print(f"{name:16s} trial {trial * 1e3:7.1f} ms | torch {plain * 1e3:7.1f} ms | "
              f"ratio trial/torch {trial / plain:5.2f} | fill {fill * 1e3:5.2f} ms "
              f"({100 * fill / trial:.2f}% of a trial) | recompile would add {recompile * 1e3:6.1f} ms "
              f"| entries differing from torch {err}")


if __name__ == "__main__":
    main()
