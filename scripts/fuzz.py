#!/usr/bin/env python3
"""Long fuzz runs outside CI: the targets of tests/lang/test_fuzz.py (random and mutated recipes
through parse + check; random and mutated files through the safetensors header reader) with many
more examples and random seeds. A failure prints hypothesis' minimal falsifying example.

Also the objective / loss targets of tests/search/test_fuzz_objectives.py: `tune` objectives and
`learn` losses and data that return junk, raise anything, call sys.exit or mutate their state
(-k objectives / -k losses).

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


def objective_targets() -> list[str]:
    """The objective / loss fuzz targets (tune and learn calling the user's code)."""
    return [str(REPO / "tests" / "search" / "test_fuzz_objectives.py")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--examples", type=int, default=2000, help="examples per target per round")
    ap.add_argument("-k", default=None, help="only targets matching this pytest -k expression")
    ap.add_argument("--loop", action="store_true", help="repeat rounds with fresh seeds until a failure")
    args = ap.parse_args()
    env = {**os.environ, "MERGELANG_FUZZ_EXAMPLES": str(args.examples),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "pytest", str(REPO / "tests" / "lang" / "test_fuzz.py"),
           *objective_targets(), "-q", "-p", "no:cacheprovider", "-x", "--hypothesis-show-statistics"]
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
