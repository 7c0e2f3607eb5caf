#!/usr/bin/env python3
"""Alignment from activations vs weight matching: pairs of digits MLPs trained from different
initialisations, merged by averaging (linear, 0.5 each).

    PYTHONPATH=. python benchmarks/align_activations.py [--pairs 5] [--epochs 30] [--json FILE]

For each pair k, two `DigitsMLP`s (examples/digits/mlp.py: 64 -> 128 -> 128 -> 10, ReLU) are
trained on sklearn's digits (training split of examples/digits/setting.py, 10 classes; Adam,
lr 1e-3, batch 64) from seeds 100+k and 200+k (initialisation and data order), saved as
safetensors folders, and the correlation sidecar is computed with the command

    mergelang stats A B --kind correlation --data examples/digits/mlp.py:BATCHES
        --module examples/digits/mlp.py:DigitsMLP --group "h0: ..." --group "h1: ..." -o C

(the training inputs, no labels). Then mergelang merges

    plain:       linear([a, b])
    weights:     linear([a, align(b, to = a, groups = G)])                        (weight matching)
    activations: linear([a, align(b, to = a, by = "activations", stats = c, groups = G)])

and every model's accuracy and mean cross-entropy are measured on the test split (360 digits,
never seen in training or in the statistics).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DIGITS))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import mergelang as ml  # noqa: E402
from mlp import GROUPS, evaluate, load, save, train  # noqa: E402

EXPRS = {"plain": "linear([a, b])",
         "weights": "linear([a, align(b, to = a, groups = G)])",
         "activations": 'linear([a, align(b, to = a, by = "activations", stats = c, groups = G)])'}


NAMES = ("a", "b", *EXPRS)


def stats_command(a: Path, b: Path, out: Path) -> float:
    """`mergelang stats A B --kind correlation ...` in a subprocess; its wall time."""
    cmd = [sys.executable, "-m", "mergelang", "stats", str(a), str(b), "--kind", "correlation",
           "--data", f"{DIGITS / 'mlp.py'}:BATCHES", "--module", f"{DIGITS / 'mlp.py'}:DigitsMLP",
           "-o", str(out), "-q"]
    for g in GROUPS:
        cmd += ["--group", g]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=str(ROOT))
    return time.perf_counter() - t0


def merged(expr: str, folders: dict[str, Path]) -> dict:
    text = "".join(f'model {k} = "{v}"\n' for k, v in folders.items())
    text += "param G = [" + ", ".join(json.dumps(g) for g in GROUPS) + "]\n"
    text += f'merge from a {{\n    "*" => {expr}\n}}\n'
    return ml.compile(text).evaluate()


def pair(k: int, epochs: int, root: Path) -> dict:
    t0 = time.perf_counter()
    a, b = (save(train(s + k, epochs), root / f"{n}{k}") for s, n in ((100, "a"), (200, "b")))  # noqa: B023
    t_train = time.perf_counter() - t0
    c = root / f"c{k}"
    t_stats = stats_command(a, b, c)
    row: dict = {"pair": k}
    states = {"a": load(a), "b": load(b)}
    states.update({name: merged(expr, {"a": a, "b": b, "c": c}) for name, expr in EXPRS.items()})
    for name, state in states.items():
        row[name], row[f"{name} loss"] = evaluate(state)
    row["seconds"] = {"train both": round(t_train, 2), "stats command": round(t_stats, 2)}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    from machine import describe

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.pairs):
            rows.append(pair(k, args.epochs, Path(tmp)))
            r = rows[-1]
            print(f"pair {k}: " + "  ".join(f"{n} {r[n]:.3f} ({r[n + ' loss']:.3f})" for n in NAMES)
                  + f"  {r['seconds']}", flush=True)
    mean = {n: statistics.mean(r[n] for r in rows) for n in (*NAMES, *(n + " loss" for n in NAMES))}
    print("mean: " + "  ".join(f"{n} {mean[n]:.3f} ({mean[n + ' loss']:.3f})" for n in NAMES))
    print("test accuracy (test cross-entropy)")
    out = {"machine": describe(), "pairs": args.pairs, "epochs": args.epochs, "rows": rows, "mean": mean}
    print(f"machine: {out['machine']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
