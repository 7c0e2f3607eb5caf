"""Block-scaled FP8 output on the CPU (`BLOCK_QUANT` nodes the fuse pass marks, fuse.py
`_quant_in_kernels`): one pass per block computing its amax, one writing the FP8 codes, instead
of torch's padded copy, block reduction, expanded scale tensor, division, `where`, clamp and
cast (about eight whole-tensor passes).

Exactness: each step is the operation the torch kernel (`linalg._block_quant`) performs — the
amax propagates NaN like `torch.amax`; scale_inv = amax / fmax is one float32 division (fmax is
exact); a value is x / scale_inv (+0.0 where the scale is 0), clamped to +-fmax (NaN stays
NaN), then converted by `to_e4m3` / `to_e5m2`, ports of torch's own conversions
(c10 `fp8e4m3fn_from_fp32_value`, `fp8e5m2_from_fp32_value`: round to nearest even, with the
same NaN and overflow codes). tests/runtime/test_numba_fp8.py checks the conversions against
torch's cast over every float32 exponent and both formats' rounding midpoints, and the whole
kernel against the torch kernel's bytes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit

from mergelang.runtime.kernels.numba_runtime import bits_to_f32, f32_to_bits, sel
from mergelang.runtime.workers import parallel_map

_U = np.uint32


@njit(inline="always", nogil=True, cache=True)
def _rne(bits, shift, bias, odd_bits):
    """A normal value's code: the exponent rebiased and the mantissa rounded to nearest even
    at bit `shift` (torch's two-part rounding bias), low 8 bits."""
    odd = (bits >> shift) & _U(1)
    return _U(_U((_U(bits + bias) + odd_bits + odd) >> shift) & _U(0xFF))


@njit(inline="always", nogil=True, cache=True)
def to_e4m3(x):
    """float32 -> float8_e4m3fn code, as torch converts (round to nearest even; NaN -> 0x7F;
    finite values that would round to 480 or more -> 0x7E, the largest value; sign kept).
    Branch-free (selects), so loops over it vectorise."""
    bits = f32_to_bits(x)
    sign = _U(bits & _U(0x80000000))
    bits = _U(bits ^ sign)
    # below 2^-6: a subnormal, rounded by one float addition (garbage otherwise: not selected)
    sub = _U(f32_to_bits(bits_to_f32(bits) + bits_to_f32(_U(141 << 23))) - _U(141 << 23))
    nor = _rne(bits, _U(20), _U(((7 - 127) << 23) & 0xFFFFFFFF), _U(0x7FFFF))
    nor = sel(nor == _U(0x7F), _U(0x7E), nor)  # rounding up into the NaN code: the largest value
    r = sel(bits < _U(121 << 23), sub, nor)
    r = sel(bits >= _U(1087 << 20), sel(bits > _U(0x7F800000), _U(0x7F), _U(0x7E)), r)
    return np.uint8((r | (sign >> _U(24))) & _U(0xFF))


@njit(inline="always", nogil=True, cache=True)
def to_e5m2(x):
    """float32 -> float8_e5m2 code, as torch converts (round to nearest even; NaN -> 0x7F,
    from 65536 up -> 0x7C, infinity; the sign bit kept). Branch-free."""
    bits = f32_to_bits(x)
    sign = _U(bits & _U(0x80000000))
    bits = _U(bits ^ sign)
    sub = _U(f32_to_bits(bits_to_f32(bits) + bits_to_f32(_U(134 << 23))) - _U(134 << 23))  # < 2^-14
    nor = _rne(bits, _U(21), _U(((15 - 127) << 23) & 0xFFFFFFFF), _U(0xFFFFF))
    r = sel(bits < _U(113 << 23), sub, nor)
    r = sel(bits >= _U(143 << 23), sel(bits > _U(0x7F800000), _U(0x7F), _U(0x7C)), r)
    return np.uint8((r | (sign >> _U(24))) & _U(0xFF))


@njit(nogil=True, cache=True, boundscheck=False)
def _scales(x, b0, b1, fmax, out, rb_lo, rb_hi):
    """out[i, j] = amax of block (i, j) of the 2-D x / fmax, for block rows rb_lo..rb_hi-1.
    The amax is taken over |x|'s bits as unsigned integers (their order is the values' order,
    and every NaN's bits are above infinity's): a NaN in the block gives a NaN amax, like
    torch.amax, and the loop vectorises."""
    rows, cols = x.shape
    cb = out.shape[1]
    xb = x.view(np.uint32)
    best = np.zeros(cb, np.uint32)
    for bi in range(rb_lo, rb_hi):
        best[:] = 0
        for i in range(bi * b0, min(rows, bi * b0 + b0)):
            for bj in range(cb):
                m = best[bj]
                for j in range(bj * b1, min(cols, bj * b1 + b1)):
                    v = _U(xb[i, j] & _U(0x7FFFFFFF))
                    m = sel(v > m, v, m)
                best[bj] = m
        for bj in range(cb):
            out[bi, bj] = bits_to_f32(best[bj]) / fmax


@njit(nogil=True, cache=True, boundscheck=False)
def _codes(x, scale, b0, b1, fmax, e4m3, out, rb_lo, rb_hi):
    """out = FP8 codes of clamp(x / scale of its block, -fmax, fmax) (0 where the scale is 0)."""
    rows, cols = x.shape
    cb = scale.shape[1]
    lo, hi = -fmax, fmax
    for bi in range(rb_lo, rb_hi):
        for i in range(bi * b0, min(rows, bi * b0 + b0)):
            for bj in range(cb):
                s = scale[bi, bj]
                if s == 0:  # torch.where(s == 0, 0.0, ...): +0.0, code 0
                    for j in range(bj * b1, min(cols, bj * b1 + b1)):
                        out[i, j] = np.uint8(0)
                    continue
                for j in range(bj * b1, min(cols, bj * b1 + b1)):
                    q = x[i, j] / s
                    q = sel(q < lo, lo, sel(q > hi, hi, q))  # NaN compares false: stays NaN
                    out[i, j] = to_e4m3(q) if e4m3 else to_e5m2(q)


def _over_block_rows(fn, rb: int, elements: int) -> None:
    from mergelang.runtime.kernels.numba_codegen import threads_for

    threads = min(threads_for(elements), rb)
    cuts = [rb * k // threads for k in range(threads + 1)]
    if threads <= 1:
        fn(0, rb)
    else:
        parallel_map(fn, cuts[:-1], cuts[1:], threads=threads)


def block_scales(x: torch.Tensor, block: tuple[int, int], fmax: float) -> torch.Tensor:
    """float32 scale_inv per block: block amax / fmax."""
    b0, b1 = block
    a = x.to(torch.float32).contiguous().numpy()
    out = np.empty((math.ceil(a.shape[0] / b0), math.ceil(a.shape[1] / b1)), np.float32)
    f = np.float32(fmax)
    _over_block_rows(lambda lo, hi: _scales(a, b0, b1, f, out, lo, hi), out.shape[0], a.size)
    return torch.from_numpy(out)


def block_codes(x: torch.Tensor, block: tuple[int, int], fmax: float, dtype: str) -> torch.Tensor:
    """The FP8 tensor (`dtype`) of x quantized per block with its amax / fmax scales."""
    a = x.to(torch.float32).contiguous().numpy()
    scale = block_scales(x, block, fmax).numpy()
    out = torch.empty(a.shape, dtype=getattr(torch, dtype))
    codes = out.view(torch.uint8).numpy()
    f, e4m3 = np.float32(fmax), dtype == "float8_e4m3fn"
    _over_block_rows(lambda lo, hi: _codes(a, scale, block[0], block[1], f, e4m3, codes, lo, hi),
                     scale.shape[0], a.size)
    return out


def run(node, args: list[torch.Tensor]) -> torch.Tensor:
    """A BLOCK_QUANT node marked by the fuse pass (attr `numba`): its scales (part
    "scale_inv"), or its values already as the output's FP8 codes (attr `codes`: the dtype)."""
    (x,) = args
    block, fmax = tuple(node.attrs["block"]), node.attrs["fmax"]
    if node.attrs["part"] == "scale_inv":
        return block_scales(x, block, fmax)
    return block_codes(x, block, fmax, node.attrs["codes"])
