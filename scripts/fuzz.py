#!/usr/bin/env python3
"""Long fuzz runs outside CI: the targets of tests/lang/test_fuzz.py (random and mutated recipes
through parse + check; random and mutated files through the safetensors header reader) and of
the other fuzz files in TARGETS (adapter configs: tests/io/test_fuzz_adapters.py) with many
more examples and random seeds. A failure prints hypothesis' minimal falsifying example.

Also the objective / loss targets of tests/search/test_fuzz_objectives.py: `tune` objectives and
`learn` losses and data that return junk, raise anything, call sys.exit or mutate their state
(-k objectives / -k losses).

    python scripts/fuzz.py                      # 2000 examples per target
    python scripts/fuzz.py -n 20000 -k mutated  # one target, longer
    python scripts/fuzz.py --loop               # until interrupted (Ctrl-C) or a failure
    python scripts/fuzz.py --import-mergekit 5000   # hostile mergekit YAML through import-mergekit
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the fuzz targets (pytest files reading MERGELANG_FUZZ_EXAMPLES), one section each
TARGETS = [
    "tests/lang/test_fuzz.py",          # recipes, safetensors headers
    "tests/io/test_fuzz_adapters.py",   # adapter_config.json and LoRA factors: lora(), rmm
]


# ---------------------------------------------------------------- import-mergekit YAML

_SEEDS = [
    {"models": [{"model": "A", "parameters": {"weight": 1.0}}, {"model": "B", "parameters": {"weight": 0.5}}],
     "merge_method": "linear", "dtype": "float32"},
    {"models": [{"model": "A", "parameters": {"weight": 1.0, "density": [1, 0.5]}},
                {"model": "B", "parameters": {"weight": 0.5, "density": 0.7}}],
     "merge_method": "ties", "base_model": "BASE", "parameters": {"normalize": True}},
    {"slices": [{"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 2]}]}],
     "merge_method": "slerp", "base_model": "A",
     "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]}},
    {"base_model": "BASE", "gate_mode": "cheap_embed", "experts_per_token": 1,
     "experts": [{"source_model": "A", "positive_prompts": ["x"]},
                 {"source_model": "B", "positive_prompts": ["y"], "residual_scale": 0.5}]},
]
_HOSTILE = [None, 0, -1, 7, 1.7, True, 10 ** 40, float("inf"), float("nan"), "1e999", "9" * 500, "",
            "two", "a\n}fn x() { return 1 }\n#", 'q"\\', "\u2028\u0085", [], [1, "x"], {},
            {"filter": "mlp", "value": "x"}, [[[[[]]]]], {"model": 5}, "org/name@rev", "a+b",
            [{"filter": None, "value": [1, 2, 3]}], "../../etc/passwd"]


def _mutate(rng, v, depth=0):
    """A copy of config `v` with one random part replaced, removed or added."""
    import copy

    v = copy.deepcopy(v)
    nodes = [(None, None, v)]
    stack = [v]
    while stack:  # every (container, key) of the config
        x = stack.pop()
        items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
        for k, c in list(items):
            nodes.append((x, k, c))
            stack.append(c)
    parent, key, _ = rng.choice(nodes)
    if parent is None:
        return rng.choice(_HOSTILE + [v])
    r = rng.random()
    if r < 0.6:
        parent[key] = copy.deepcopy(rng.choice(_HOSTILE))
    elif r < 0.8 and isinstance(parent, dict):
        del parent[key]
    elif isinstance(parent, dict):
        parent[rng.choice(["parameters", "weight", "t", "density", "x\ny", "layer_range", "slices",
                           "merge_method", "experts_per_token", "tokenizer", "chat_template"])] = \
            copy.deepcopy(rng.choice(_HOSTILE))
    else:
        parent.append(copy.deepcopy(rng.choice(_HOSTILE)))
    return v


def fuzz_import_mergekit(cases: int = 2000, seed: int = 0) -> dict:
    """`cases` mutated mergekit configs (random values, keys and YAML text edits) through the
    importer: each must import (and the recipe parse, without function definitions a config
    could inject) or give a coded diagnostic, within a second; returns the counts and the
    failures (`internal`: tracebacks, `slow`: over a second, `injected`: recipes that do not
    parse or define functions)."""
    import random
    import time

    import yaml

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from mergelang.api import parse
    from mergelang.diagnostics import MergelangError
    from mergelang.interop.mergekit_import import translate
    from mergelang.interop.mergekit_yaml import load_yaml
    from mergelang.lang.ast import FnDef

    translate({"models": ["org/name"], "merge_method": "linear"})  # imports huggingface_hub once
    rng = random.Random(seed)
    stats: dict = {"cases": 0, "ok": 0, "coded": 0, "internal": [], "slow": [], "injected": []}
    start_all = time.perf_counter()
    for n in range(cases):
        cfg = rng.choice(_SEEDS)
        for _ in range(rng.randint(1, 4)):
            cfg = _mutate(rng, cfg)
        try:
            text = yaml.safe_dump(cfg, allow_unicode=True) if not isinstance(cfg, float) else "x: .nan"
        except (yaml.YAMLError, ValueError):
            text = "x: 1"
        if rng.random() < 0.2 and text:  # text-level edits: cut, duplicate, alias-like noise
            i = rng.randrange(len(text))
            text = rng.choice([text[:i], text[:i] + text[i:] * 2, text[:i] + "&a [*a]" + text[i:],
                               text[:i] + "{" * 80 + text[i:], text[:i] + "\t\0" + text[i:]])
        stats["cases"] += 1
        t0 = time.perf_counter()
        try:
            res = translate(load_yaml(text, "<fuzz>"))
            if res.errors:
                stats["coded"] += 1
            else:
                try:
                    prog = parse(res.text)
                    if prog.of(FnDef):
                        stats["injected"].append(text)
                except MergelangError:
                    stats["injected"].append(text)
                stats["ok"] += 1
        except MergelangError:
            stats["coded"] += 1
        except Exception as exc:  # noqa: BLE001 - what the fuzzer looks for
            stats["internal"].append(f"{type(exc).__name__}: {exc} <- {text[:300]!r}")
        if time.perf_counter() - t0 > 1.0:
            stats["slow"].append(text[:300])
    stats["seconds"] = time.perf_counter() - start_all
    return stats
def objective_targets() -> list[str]:
    """The objective / loss fuzz targets (tune and learn calling the user's code)."""
    return [str(REPO / "tests" / "search" / "test_fuzz_objectives.py")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--examples", type=int, default=2000, help="examples per target per round")
    ap.add_argument("-k", default=None, help="only targets matching this pytest -k expression")
    ap.add_argument("--loop", action="store_true", help="repeat rounds with fresh seeds until a failure")
    ap.add_argument("--import-mergekit", type=int, default=0, metavar="N",
                    help="instead: N mutated mergekit configs through import-mergekit")
    args = ap.parse_args()
    if args.import_mergekit:
        stats = fuzz_import_mergekit(args.import_mergekit, seed=int.from_bytes(os.urandom(4), "big"))
        bad = [f"{kind}: {x}" for kind in ("internal", "slow", "injected") for x in stats[kind]]
        print(f"fuzz import-mergekit: {stats['cases']} cases, {stats['ok']} imported, "
              f"{stats['coded']} coded diagnostics, {len(bad)} failures "
              f"({stats['seconds']:.1f} s)", file=sys.stderr)
        for b in bad[:20]:
            print("  ", repr(b), file=sys.stderr)
        return 1 if bad else 0
    env = {**os.environ, "MERGELANG_FUZZ_EXAMPLES": str(args.examples),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "pytest", *(str(REPO / t) for t in TARGETS), *objective_targets(), "-q",
           "-p", "no:cacheprovider", "-x", "--hypothesis-show-statistics"]
    if args.k:
        cmd += ["-k", args.k]
    rounds = 0
    while True:
        rounds += 1
        rc = subprocess.call(cmd, env=env, cwd=REPO)
        if rc != 0 or not args.loop:
            print(f"fuzz: {rounds} round(s), {'FAILED' if rc else 'ok'}", file=sys.stderr)
            return rc


if __name__ == "__main__":
    sys.exit(main())
