#!/usr/bin/env python3
"""Time `mergelang warmup` from an empty cache (a fresh MERGELANG_CACHE_DIR and numba cache), as
a whole process, and print one markdown line with the machine it ran on.

    python benchmarks/bench_warmup.py                      # prints the line
    python benchmarks/bench_warmup.py --record benchmarks/results/warmup.md

README.md ("Performance") quotes the recorded line; tests/test_doc_commands.py checks the quote
against the file. Wall time depends on the machine's load (recorded with it); CPU time less so.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402


def measure() -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `python -m mergelang warmup -q` from an empty cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, MERGELANG_CACHE_DIR=cache, NUMBA_CACHE_DIR=cache)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mergelang", "warmup", "-q"], env=env, check=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", type=Path, help="also write the line to this markdown file")
    args = ap.parse_args(argv)
    load0 = machine.load()
    wall, cpu = measure()
    line = (f"`mergelang warmup` from an empty cache: **{wall:.1f} s** wall, {cpu:.1f} s CPU "
            f"({machine.describe()}; load average {load0} -> {machine.load()}; "
            f"{datetime.date.today().isoformat()})")
    print(line)
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text("# Recorded by `python benchmarks/bench_warmup.py --record "
                               f"{args.record}`\n\n{line}\n")
    return line


if __name__ == "__main__":
    main()
