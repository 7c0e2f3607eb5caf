"""`mergelang warmup`: compile the generated CPU loops of the common methods into the on-disk
cache (`~/.cache/mergelang/fused`, numba's cache beside it), so that a first real merge does not
pay for them (issue 21, item 5: ~3 s of numba compilation on a first 300 MB TIES merge).

A generated loop depends on the method's ops, the number of models and the input and output
dtypes, not on tensor shapes or values, so small in-memory merges of each method with 2 and 3
models, in bfloat16 and float32, compile the loops a real merge of those methods uses. The
install scripts (`scripts/quickstart.sh`, `.ci/run`) run it once.
"""

from __future__ import annotations

import time
from typing import Callable

#: (expression, models) merged at warm-up: mergekit's common methods
METHODS = (
    "linear({models})",
    "task_arithmetic(base, {models})",
    "ties(base, {models}, density = 0.5)",
    "dare_ties(base, {models}, density = 0.5)",
    "dare_linear(base, {models}, density = 0.5)",
    "breadcrumbs_ties(base, {models}, density = 0.5)",
    "della(base, {models}, density = 0.5, epsilon = 0.1)",
)
SHAPE = (512, 256)  # above the fusion threshold (64k elements)


def warmup(log: Callable[[str], None] = lambda m: None, models: tuple[int, ...] = (2, 3),
           dtypes: tuple[str, ...] = ("bfloat16", "float32")) -> float:
    """Run the warm-up merges; returns the seconds spent."""
    import torch

    from mergelang.api import merge

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    for dt in dtypes:
        dtype = getattr(torch, dt)
        sds = {n: {"w": torch.randn(SHAPE, generator=g).to(dtype)} for n in ("base", "a", "b", "c")}
        for n in models:
            names = ["a", "b", "c"][:n]
            for expr in METHODS:
                t = time.perf_counter()
                merge(expr.format(models="[" + ", ".join(names) + "]"), base=sds["base"],
                      **{k: sds[k] for k in names})
                log(f"{expr.split('(')[0]} ({n} models, {dt}): {time.perf_counter() - t:.1f}s")
    return time.perf_counter() - t0
