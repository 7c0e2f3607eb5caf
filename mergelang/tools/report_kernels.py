"""run --report's numba loops (tools/merge_report.py): the additive sums of a merge output against
each of its inputs and the base, one pass over entries lo:hi a chunk at a time, inputs read as
stored.

`merge_fused` works in float64 (any dtype; bfloat16 widened in registers by inspect_kernels.f64).
`merge_fused_bf16`, for bfloat16 data (what LLM merges hold), forms each term in float32 and adds
it to float32 partial sums over runs of RUN entries (8 vector lanes: RUN / 8 terms each), added
to float64 sums per run: twice the entries per vector instruction, ~2x faster per entry
(benchmarks/bench_report_kernel.py). Its error: products of bfloat16 values (8-bit significands)
are exact in float32, differences x - base exact unless their exponents differ by more than 16
bits, so the error is that of the float32 partial sums: at most RUN * 2**-24 relative per run
for the sums of squares (1.5e-5 for RUN=256), RUN / 8 * 2**-24 (2e-6) as LLVM vectorises the
loop over 8 lanes; ~2e-8 measured: a report's numbers to 5-6 significant digits. Sums a float32 run cannot hold (an overflow, or terms under float32's normal
range: any sum of squares non-finite or below FLOOR, or a signed sum below FLOOR in magnitude:
products under 2**-150 are lost, n * 2**-150 at most, negligible against a sum of magnitudes of
FLOOR or more) are computed again in float64 by the caller (merge_report.run_sums), so huge or
tiny weights keep exact reports. The counts kept and against are taken from the signs of τ
and τo, not of their float32 product p: p rounds to zero where |τ·τo| < 2**-150 (τ ~ 1e-23, or
subnormal) while the sums of squares are well above FLOOR.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from mergelang.tools.inspect_kernels import CHUNK, JIT, f64

#: entries per float32 partial sum (merge_fused_bf16)
RUN = 256
#: a float32-summed sum of squares below this (or non-finite) is computed again in float64
FLOOR = 2.0 ** -60


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _step(xx, bb, oo, to, sg, s, z, one):  # noqa: ANN001, ANN201
    """One entry's terms of one input `xx` added to its sums `s` (sx, st, dox, dtt, dist, nnz,
    kept, against), in the type of `z` / `one` (float64, or float32 in the bfloat16 loop);
    `to` = τo, `sg` its sign: kept / against from the signs of τ and τo, not of their product,
    which underflows (in float32 for τ ~ 1e-23)."""
    sx, st, dox, dtt, dist, nnz, kept, against = s
    t, d = xx - bb, oo - xx
    u = t * sg
    return (sx + xx * xx, st + t * t, dox + oo * xx, dtt + to * t, dist + d * d,
            nnz + (one if t != z else z), kept + (one if u > z else z), against + (one if u < z else z))


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _add(acc, s, so, sto):  # noqa: ANN001, ANN201
    """One input's sums into its float64 accumulator row (RunSums' order)."""
    sx, st, dox, dtt, dist, nnz, kept, against = s
    for k, v in enumerate((sx, st, so, sto, dox, dtt, dist, nnz, kept, against)):
        acc[k] += np.float64(v)


#: run --report's float64 loops: per chunk one reduction loop over the base, the output and one
#: or two inputs as stored (widened in registers by f64; unsigned indices), its sums in
#: registers (`reassoc` lets LLVM vectorise them)
@njit(**JIT)
def _merge_chunk(b, x, o, lo, hi, r):  # noqa: ANN001, ANN201
    """r += the sums of entries lo:hi of output `o` against input `x` (base `b`)."""
    z, one = 0.0, 1.0
    sx = (z, z, z, z, z, z, z, z)
    so = sto = z
    for i in range(np.uint64(lo), np.uint64(hi)):
        bb, oo = f64(b[i]), f64(o[i])
        to = oo - bb
        so, sto = so + oo * oo, sto + to * to
        sx = _step(f64(x[i]), bb, oo, to, one if to > z else -one if to < z else z, sx, z, one)
    _add(r, sx, so, sto)


@njit(**JIT)
def _merge_pair(b, x, y, o, lo, hi, r, q):  # noqa: ANN001, ANN201
    """_merge_chunk for two inputs at once (the base and the output widened once: ~16 % less
    time per entry than two _merge_chunk calls); the same sums."""
    z, one = 0.0, 1.0
    sx = sy = (z, z, z, z, z, z, z, z)
    so = sto = z
    for i in range(np.uint64(lo), np.uint64(hi)):
        bb, oo = f64(b[i]), f64(o[i])
        to = oo - bb
        sg = one if to > z else -one if to < z else z
        so, sto = so + oo * oo, sto + to * to
        sx = _step(f64(x[i]), bb, oo, to, sg, sx, z, one)
        sy = _step(f64(y[i]), bb, oo, to, sg, sy, z, one)
    _add(r, sx, so, sto)
    _add(q, sy, so, sto)


@njit(**JIT)
def merge_fused(b, xs, o, lo, hi, acc):  # noqa: ANN001, ANN201
    """The sums of output `o` against every input in `xs` over entries lo:hi, one pass, a chunk
    at a time, two inputs per loop (the base's and the output's chunk read again from the
    cache for the next two): acc[j] += (‖x‖², ‖τ‖², ‖o‖², ‖τo‖², ⟨o, x⟩, ⟨τo, τ⟩, ‖o − x‖²,
    nnz, kept, against) (counts as float64: exact below 2**53)."""
    nx = len(xs)
    for start in range(lo, hi, CHUNK):
        end = min(start + CHUNK, hi)
        for j in range(0, nx - 1, 2):
            _merge_pair(b, xs[j], xs[j + 1], o, start, end, acc[j], acc[j + 1])
        if nx % 2:
            _merge_chunk(b, xs[nx - 1], o, start, end, acc[nx - 1])


@intrinsic
def _f32(typingctx, v):  # noqa: ANN001, ANN201, ARG001
    """A bfloat16 bit pattern (uint16) as the float32 of the same value (its bits << 16: exact)."""
    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202, ARG001
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())
    return (types.float32(v), codegen) if v == types.uint16 else None


@njit(**JIT)
def _bf16_one(b, x, o, lo, hi, r):  # noqa: ANN001, ANN201
    """r += the sums of entries lo:hi of bfloat16 output `o` against input `x` (base `b`):
    float32 terms and partial sums per RUN entries, float64 across runs."""
    z, one = np.float32(0.0), np.float32(1.0)
    for start in range(np.uint64(lo), np.uint64(hi), np.uint64(RUN)):
        sx = (z, z, z, z, z, z, z, z)
        so = sto = z
        for i in range(start, min(start + np.uint64(RUN), np.uint64(hi))):
            bb, oo = _f32(b[i]), _f32(o[i])
            to = oo - bb
            so, sto = so + oo * oo, sto + to * to
            sx = _step(_f32(x[i]), bb, oo, to, one if to > z else -one if to < z else z, sx, z, one)
        _add(r, sx, so, sto)


@njit(**JIT)
def _bf16_pair(b, x, y, o, lo, hi, r, q):  # noqa: ANN001, ANN201
    """_bf16_one for two inputs at once (the base and the output widened once for both)."""
    z, one = np.float32(0.0), np.float32(1.0)
    for start in range(np.uint64(lo), np.uint64(hi), np.uint64(RUN)):
        sx = sy = (z, z, z, z, z, z, z, z)
        so = sto = z
        for i in range(start, min(start + np.uint64(RUN), np.uint64(hi))):
            bb, oo = _f32(b[i]), _f32(o[i])
            to = oo - bb
            sg = one if to > z else -one if to < z else z
            so, sto = so + oo * oo, sto + to * to
            sx = _step(_f32(x[i]), bb, oo, to, sg, sx, z, one)
            sy = _step(_f32(y[i]), bb, oo, to, sg, sy, z, one)
        _add(r, sx, so, sto)
        _add(q, sy, so, sto)


@njit(**JIT)
def merge_fused_bf16(b, xs, o, lo, hi, acc):  # noqa: ANN001, ANN201
    """merge_fused for bfloat16 bit patterns (uint16 arrays) with float32 partial sums (module
    docstring: the caller checks the sums of squares against FLOOR)."""
    nx = len(xs)
    for start in range(lo, hi, CHUNK):
        end = min(start + CHUNK, hi)
        for j in range(0, nx - 1, 2):
            _bf16_pair(b, xs[j], xs[j + 1], o, start, end, acc[j], acc[j + 1])
        if nx % 2:
            _bf16_one(b, xs[nx - 1], o, start, end, acc[nx - 1])
