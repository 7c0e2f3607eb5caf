"""Helpers the generated kernels of `numba_codegen.py` import (compiled by numba)."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


def _fp8_table(dtype: str) -> np.ndarray:
    """float32 value of each of the 256 codes of an FP8 format (exact: every FP8 value is a
    float32), as torch converts them."""
    import torch

    return torch.arange(256, dtype=torch.uint8).view(getattr(torch, dtype)).to(torch.float32).numpy()


#: FP8 code -> value tables the generated loops index (numba freezes them into the code)
F8E4M3 = _fp8_table("float8_e4m3fn")
F8E5M2 = _fp8_table("float8_e5m2")


@intrinsic
def bits_to_f32(typingctx, bits):
    """Reinterpret a uint32 as the float32 with the same bits."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(inline="always", nogil=True, cache=True)
def widen_bf16(h):
    """bfloat16 bits (a uint16) -> the float32 of the same value (exact: the bits shifted up)."""
    return bits_to_f32(np.uint32(h) << np.uint32(16))


@intrinsic
def sel(typingctx, cond, x, y):
    """`x if cond else y` as one LLVM `select` (no branch: masks are random, branches mispredict)."""
    if not isinstance(cond, types.Boolean) or x != y:
        return None
    sig = x(cond, x, y)

    def codegen(context, builder, signature, args):
        return builder.select(args[0], args[1], args[2])

    return sig, codegen


@intrinsic
def f32_to_bits(typingctx, x):
    """Reinterpret a float32 as the uint32 with the same bits."""
    if x != types.float32:
        return None
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(inline="always", nogil=True, cache=True)
def narrow_bf16(x):
    """float32 -> bfloat16 bits (a uint16) exactly as torch converts on the CPU: round to nearest,
    ties to even; every NaN becomes 0xFFFF (what torch's conversion gives, scalar and vector)."""
    bits = f32_to_bits(x)
    bias = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    rounded = np.uint32((bits + bias) >> np.uint32(16))
    return np.uint16(sel(x != x, np.uint32(0xFFFF), rounded))


@njit(inline="always")
def order_key(x, absolute):
    """A uint32 whose unsigned order is the order of the float32 value x (or |x|); -0.0 and
    +0.0 share one key (equal values)."""
    b = f32_to_bits(x)
    if absolute:
        return (b & np.uint32(0x7FFFFFFF)) | np.uint32(0x80000000)
    b = sel(b == np.uint32(0x80000000), np.uint32(0), b)
    return sel((b >> np.uint32(31)) == np.uint32(1), ~b, b | np.uint32(0x80000000))


@njit(nogil=True, cache=True, boundscheck=False)
def settle(out, cidx, clow, count, low, ties):
    """The split selection's last step (numba_topk.py): of the threshold bucket's listed
    entries (in index order), keep those whose low half is above `low`, and the first `ties`
    equal to it."""
    for j in range(count):
        v = clow[j]
        if v > low or (v == low and ties > 0):
            out[cidx[j]] = np.uint8(1)
            if v == low:
                ties -= 1


@njit(nogil=True, cache=True)
def max_masked_u16(a, mask):
    """max(a[i] & mask) over a uint16 array: with `mask` a 16-bit float's exponent bits, equal
    to `mask` exactly when some element is NaN or infinite (one vectorised pass, no temporary)."""
    m = np.uint16(0)
    for i in range(a.shape[0]):
        m = max(m, a[i] & mask)
    return m
