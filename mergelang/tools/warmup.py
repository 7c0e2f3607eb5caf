"""`mergelang warmup`: compile the generated CPU loops of the common methods into the on-disk
cache (`~/.cache/mergelang/fused`, numba's cache beside it), so that a first real merge does not
pay for them (issue 21, item 5: ~3 s of numba compilation on a first 300 MB TIES merge).

A generated loop depends on the method's ops, the number of models and the input and output
dtypes, not on tensor shapes or values, so small in-memory merges of each method with 2 and 3
models, in bfloat16 and float32, compile the loops a real merge of those methods uses. The
install scripts (`scripts/quickstart.sh`, `.ci/run`) run it once. It also compiles the loops of
`mergelang inspect` and `run --report` (numba's cache beside tools/inspect_kernels.py and report_kernels.py).
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
    _warm_fp8(log)
    _warm_inspect(log, models, dtypes)
    return time.perf_counter() - t0


def _warm_inspect(log: Callable[[str], None], models: tuple[int, ...], dtypes: tuple[str, ...]) -> None:
    """`mergelang inspect` and `run --report`'s loops (tools/inspect_kernels.py, tools/report_kernels.py): the fused and
    small forms, with a boundary bucket of several values (the listing pass and the selection),
    and the bucket method that the one-pass selection falls back to (tools/inspect_select.py)."""
    import torch

    from mergelang.tools.inspect_kernels import fused_stats
    from mergelang.tools.inspect_small import batch_sums
    from mergelang.tools.inspect_stats import FRACTIONS, flat, tensor_group
    from mergelang.tools.merge_report import run_sums

    g = torch.Generator().manual_seed(0)
    for dt in dtypes:
        dtype = getattr(torch, dt)
        for n in models:
            t = time.perf_counter()
            for shape in (SHAPE, (16, 16)):
                base = torch.randn(shape, generator=g).to(dtype)
                xs = [(base.float() + torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]
                tensor_group(base, xs, None, torch.device("cpu"))
                run_sums(base, xs, xs[0])
                if shape == SHAPE:  # the bucket method (the selection's fallback)
                    kd = dtype if dtype in (torch.bfloat16, torch.float64) else torch.float32
                    fused_stats(flat(base, kd), [flat(x, kd) for x in xs], FRACTIONS, kd == torch.bfloat16)
            batch_sums([[base, *xs]], dtype, FRACTIONS)  # runs of small tensors (inspect_small.py)
            log(f"inspect ({n} models, {dt}): {time.perf_counter() - t:.1f}s")


#: merges of two block-scaled FP8 models warmed (their loops read the codes as stored)
FP8_METHODS = ("linear([a, b])", "task_arithmetic(a, [b])", "ties(a, [b], density = 0.5)")


def _warm_fp8(log: Callable[[str], None]) -> None:
    """Block-scaled FP8 (DeepSeek-V3 format, 128 x 128 blocks): the loops that decode codes and
    scales, and the re-quantization kernels, for FP8 and bfloat16 outputs."""
    import json
    import tempfile
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from mergelang.api import compile as compile_recipe

    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="mergelang-warmup-") as tmp:
        for name in ("a", "b"):
            folder = Path(tmp) / name
            folder.mkdir()
            w = torch.randn(SHAPE, generator=g)
            scale = torch.ones(SHAPE[0] // 128, SHAPE[1] // 128) * float(w.abs().max()) / 448
            save_file({"w": (w / float(scale[0, 0])).to(torch.float8_e4m3fn), "w_scale_inv": scale},
                      str(folder / "model.safetensors"))
            (folder / "config.json").write_text(json.dumps(
                {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}))
        for expr in FP8_METHODS:
            for dtype in (None, "bfloat16"):
                t = time.perf_counter()
                r = compile_recipe(f'model a = "{tmp}/a"\nmodel b = "{tmp}/b"\n'
                                   f'merge from a {{ "*" => {expr} }}\n', dtype=dtype)
                r.evaluate()
                r.close()
                log(f"{expr.split('(')[0]} (FP8 -> {dtype or 'FP8'}): {time.perf_counter() - t:.1f}s")
