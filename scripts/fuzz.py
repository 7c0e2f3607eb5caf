#!/usr/bin/env python3
"""Long fuzz runs outside CI: the targets of tests/lang/test_fuzz.py (random and mutated recipes
through parse + check; random and mutated files through the safetensors header reader) and of
the other fuzz files in TARGETS (adapter configs: tests/io/test_fuzz_adapters.py) with many
more examples and random seeds. A failure prints hypothesis' minimal falsifying example.

    python scripts/fuzz.py                      # 2000 examples per target
    python scripts/fuzz.py -n 20000 -k mutated  # one target, longer
    python scripts/fuzz.py --loop               # until interrupted (Ctrl-C) or a failure
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--examples", type=int, default=2000, help="examples per target per round")
    ap.add_argument("-k", default=None, help="only targets matching this pytest -k expression")
    ap.add_argument("--loop", action="store_true", help="repeat rounds with fresh seeds until a failure")
    args = ap.parse_args()
    env = {**os.environ, "MERGELANG_FUZZ_EXAMPLES": str(args.examples),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "pytest", *(str(REPO / t) for t in TARGETS), "-q",
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
