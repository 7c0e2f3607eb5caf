#!/usr/bin/env python3
"""`python -m mergelang ARGS` that writes torch.cuda.max_memory_allocated() (bytes; 0 without a
GPU) to the file named by MERGELANG_PEAK_FILE when the process exits (bench_gpu_merge.py)."""

import atexit
import os
import runpy
import sys


def _report() -> None:
    import torch

    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    with open(os.environ["MERGELANG_PEAK_FILE"], "w") as f:
        f.write(str(peak))


atexit.register(_report)
sys.argv = ["mergelang", *sys.argv[1:]]
runpy.run_module("mergelang", run_name="__main__")
