"""Block-scaled FP8 checkpoints (DeepSeek-V3 / R1 and others): `float8_e4m3fn` (or `e5m2`)
weights, each with a `weight_scale_inv` tensor holding one float32 per block of
`quantization_config.weight_block_size` (128 x 128) entries, W = q * scale_inv[i // 128, j // 128].

`dequantize_models` wraps every such model in a `BlockFp8` source: the recipe sees each FP8
weight as float values (dequantized when loaded, float32), and the scale tensors are not
separate tensors of the model. The output keeps the reference model's format: an output tensor
the reference stores block-scaled is re-quantized per block by the elaborator (`BLOCK_QUANT`:
scale_inv = block amax / 448 for e4m3 (57344 for e5m2), values divided by it and rounded to
nearest even by the cast; an all-zero block gets scale 0 and zeros), written with its scale
tensor, and config.json keeps `quantization_config`; with `--dtype` / `option dtype` (e.g.
bfloat16) the weights are written dequantized and `quantization_config` is dropped.

Checked from headers (at the model's declaration): an FP8 weight without its scale tensor
(E320), a scale whose shape is not the block grid of its weight or a scaled weight that is not
2-D (E321), FP8 weights with scale tensors but no `weight_block_size` in config.json (E322), a
`weight_block_size` that is not two whole numbers in 1..MAX_BLOCK (E330; 128.0 is 128). A block
larger than its weight is one block covering it (no path repeats a scale past the weight).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

from mergelang.diagnostics import Diagnostics, error, warning
from mergelang.io.checkpoint import ModelSource, TensorInfo, WrappedSource

if TYPE_CHECKING:
    import torch

FP8 = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}
SCALE_SUFFIX = "_scale_inv"


def block_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


def dequantize(q: "torch.Tensor", scale: "torch.Tensor", block: tuple[int, int]) -> "torch.Tensor":
    """float32 q * scale_inv, each scale repeated over its block (edge blocks cut)."""
    import torch

    r, c = q.shape
    # a block larger than the weight covers all of it: never repeat a scale past the weight
    s = scale.to(torch.float32)[: -(-r // block[0]), : -(-c // block[1])]
    s = s.repeat_interleave(min(block[0], r), 0)[:r].repeat_interleave(min(block[1], c), 1)[:, :c]
    return q.to(torch.float32) * s


class BlockFp8(WrappedSource):
    """A model whose block-scaled FP8 weights are seen dequantized (float32 when loaded)."""

    def __init__(self, inner: ModelSource, block: tuple[int, int], scales: dict[str, str]):
        super().__init__(inner)
        self.block, self.scales = block, scales  # weight -> its scale tensor
        hidden = set(scales.values())
        self._table = {k: v for k, v in inner.tensors().items() if k not in hidden}

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._table

    def block_scale(self, name: str) -> tuple[str, tuple[int, int], float] | None:
        """(its scale tensor's name, the block, the format's largest value) for a block-scaled
        weight, else None."""
        scale = self.scales.get(name)
        if scale is None:
            return None
        return scale, self.block, FP8[self._table[name].dtype]

    def stored_block_scale(self, name: str) -> tuple[str, tuple[int, int], float] | None:
        return self.block_scale(name)

    @property
    def block_scaled(self) -> bool:
        return True

    def load_as(self, name: str, dtype: Any = None, *, view: bool = False) -> "torch.Tensor":
        scale = self.scales.get(name)
        if scale is None:
            return self.inner.load_as(name, dtype, view=view)
        import torch

        out = dequantize(self.inner.load_as(name, None, view=True), self.inner.load_as(scale, None),
                         self.block)
        return out if dtype in (None, torch.float32) else out.to(dtype)

    def load_stored(self, name: str, *, view: bool = False) -> "torch.Tensor":
        """A weight's FP8 codes, or a scale tensor, as stored (fused loops decode them)."""
        return self.inner.load_as(name, None, view=view)

    def load_rows(self, name: str, dtype: Any, start: int, stop: int, *, view: bool = False) -> "torch.Tensor":
        scale = self.scales.get(name)
        if scale is None:
            return self.inner.load_rows(name, dtype, start, stop, view=view)
        import torch

        b0 = self.block[0]
        first = start // b0 * b0  # whole blocks of rows, then cut
        q = self.inner.load_rows(name, None, first, min(stop + (-stop) % b0, self._table[name].shape[0]),
                                 view=True)
        s = self.inner.load_as(scale, None)[first // b0: math.ceil(stop / b0)]
        out = dequantize(q, s, self.block)[start - first: stop - first].contiguous()
        return out if dtype in (None, torch.float32) else out.to(dtype)


#: the largest block side accepted (real checkpoints use 128)
MAX_BLOCK = 1 << 16


def _block_size(cfg: dict | None) -> tuple[int, int] | str | None:
    """quantization_config.weight_block_size as two ints (128.0 counts as 128), None when
    absent, or a str saying why it is invalid."""
    q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(q, dict) or q.get("weight_block_size") is None:
        return None
    b = q.get("weight_block_size")
    if not (isinstance(b, (list, tuple)) and len(b) == 2):
        return f"it is {str(b)[:40]}, not two block sides"
    out = []
    for x in b:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) \
                or x != int(x) or not 1 <= x <= MAX_BLOCK:
            return f"it is {list(b)}: each side must be a whole number in 1..{MAX_BLOCK}"
        out.append(int(x))
    return (out[0], out[1])


def dequantize_models(models: dict[str, ModelSource | None], spans: Mapping[str, Any],
                      diags: Diagnostics) -> dict[str, ModelSource | None]:
    """Every block-scaled FP8 model wrapped (E320-E322 for broken ones: left unwrapped)."""
    out: dict[str, ModelSource | None] = {}
    formats = {}
    for label, m in models.items():
        out[label] = m
        if m is None or m.block_output is not None:
            continue
        table = m.tensors()
        fp8 = [n for n, i in table.items() if i.dtype in FP8]
        if not fp8:
            continue
        scaled = [n for n in fp8 if n + SCALE_SUFFIX in table]
        cfg = m.config()
        block = _block_size(cfg)
        span = spans.get(label)
        if not scaled and block is None:
            continue  # FP8 without scales or a quantization_config: plain (per-tensor) values
        if isinstance(block, str):
            diags.add(error("E330", f"model `{label}`: config.json's quantization_config."
                            f"weight_block_size is invalid: {block}", span,
                            "block-scaled FP8 checkpoints use e.g. \"weight_block_size\": [128, 128]"))
            continue
        if block is None:
            diags.add(error("E322", f"model `{label}` has block-scaled FP8 weights (e.g. `{scaled[0]}` "
                            f"with `{scaled[0]}{SCALE_SUFFIX}`) but its config.json has no "
                            "quantization_config.weight_block_size", span,
                            "add it, e.g. \"quantization_config\": {\"quant_method\": \"fp8\", "
                            "\"weight_block_size\": [128, 128]}"))
            continue
        missing = [n for n in fp8 if n + SCALE_SUFFIX not in table]
        if missing:
            diags.add(error("E320", f"model `{label}`: FP8 weight `{missing[0]}` has no scale tensor "
                            f"`{missing[0]}{SCALE_SUFFIX}`" + (f" ({len(missing) - 1} more)" if len(missing) > 1
                                                               else ""), span,
                            "a block-scaled FP8 checkpoint stores one scale per weight; is a shard missing?"))
            continue
        flat = [n for n in fp8 if len(table[n].shape) != 2]
        if flat:
            n = flat[0]
            diags.add(error("E321", f"model `{label}`: FP8 weight `{n}` has shape "
                            f"{list(table[n].shape)} and a scale `{n}{SCALE_SUFFIX}`: block scales "
                            "are for 2-D weights", span, "a block-scaled checkpoint stores only "
                            "matrices in FP8"))
            continue
        bad = [(n, table[n + SCALE_SUFFIX].shape, block_grid(table[n].shape, block)) for n in fp8
               if table[n + SCALE_SUFFIX].shape != block_grid(table[n].shape, block)]
        if bad:
            n, got, want = bad[0]
            diags.add(error("E321", f"model `{label}`: scale `{n}{SCALE_SUFFIX}` has shape {list(got)}, "
                            f"but weight `{n}` {list(table[n].shape)} in blocks of {list(block)} needs "
                            f"{list(want)}", span, "check quantization_config.weight_block_size"))
            continue
        out[label] = BlockFp8(m, block, {n: n + SCALE_SUFFIX for n in fp8})
        formats[label] = "block-scaled FP8"
    return out


def mixed_formats(models: Mapping[str, ModelSource | None], reference: str, dtype: str | None,
                  span: Any, diags: Diagnostics) -> None:
    """W107 when block-scaled FP8 models are merged with others: say the output's format."""
    fp8 = [k for k, m in models.items() if isinstance(m, BlockFp8)]
    others = [k for k, m in models.items() if m is not None and m.block_output is None and k not in fp8]
    if not fp8 or not others:
        return
    ref = models.get(reference)
    fmt = (f"{dtype}" if dtype else "block-scaled FP8 (re-quantized per block)"
           if isinstance(ref, BlockFp8) else "the dtypes of its tensors")
    diags.add(warning("W107", f"block-scaled FP8 models ({', '.join(f'`{k}`' for k in fp8)}) are merged "
                      f"with others ({', '.join(f'`{k}`' for k in others)}): all are dequantized; the "
                      f"output takes `{reference}`'s format: {fmt}", span,
                      "set the output's format with --dtype (e.g. bfloat16) or `merge from` another model"))
