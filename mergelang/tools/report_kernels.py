"""run --report's numba loop (tools/merge_report.py): the additive sums of a merge output against
each of its inputs and the base, one pass over entries lo:hi a chunk at a time (bfloat16 inputs
read as stored and widened in registers by inspect_kernels.f64)."""

from __future__ import annotations

import numpy as np
from numba import njit

from mergelang.tools.inspect_kernels import CHUNK, JIT, f64


#: run --report's loop: per chunk and input one reduction loop over the base, the input and the
#: output as stored (widened in registers by f64; unsigned indices), its sums in registers
#: (`reassoc` lets LLVM vectorise them)
@njit(**JIT)
def _merge_chunk(b, x, o, lo, hi, r):  # noqa: ANN001, ANN201
    """r += the sums of entries lo:hi of output `o` against input `x` (base `b`)."""
    sx = st = so = sto = dox = dtt = dist = nnz = kept = against = 0.0
    for i in range(np.uint64(lo), np.uint64(hi)):
        bb = f64(b[i])
        oo = f64(o[i])
        xx = f64(x[i])
        t = xx - bb
        to = oo - bb
        p = to * t
        d = oo - xx
        sx += xx * xx
        st += t * t
        so += oo * oo
        sto += to * to
        dox += oo * xx
        dtt += p
        dist += d * d
        nnz += 1.0 if t != 0.0 else 0.0
        kept += 1.0 if p > 0.0 else 0.0
        against += 1.0 if p < 0.0 else 0.0
    r[0] += sx
    r[1] += st
    r[2] += so
    r[3] += sto
    r[4] += dox
    r[5] += dtt
    r[6] += dist
    r[7] += nnz
    r[8] += kept
    r[9] += against


@njit(**JIT)
def _merge_pair(b, x, y, o, lo, hi, r, q):  # noqa: ANN001, ANN201
    """_merge_chunk for two inputs at once (the base and the output widened once: ~16 % less
    time per entry than two _merge_chunk calls); the same sums, in the same order."""
    sx = st = dox = dtt = dist = nnz = kept = against = so = sto = 0.0
    sy = sty = doy = dty = disty = nnzy = kepty = againsty = 0.0
    for i in range(np.uint64(lo), np.uint64(hi)):
        bb = f64(b[i])
        oo = f64(o[i])
        to = oo - bb
        so += oo * oo
        sto += to * to
        xx = f64(x[i])
        t, d = xx - bb, oo - xx
        p = to * t
        sx, st, dox, dtt, dist = sx + xx * xx, st + t * t, dox + oo * xx, dtt + p, dist + d * d
        nnz += 1.0 if t != 0.0 else 0.0
        kept += 1.0 if p > 0.0 else 0.0
        against += 1.0 if p < 0.0 else 0.0
        yy = f64(y[i])
        t, d = yy - bb, oo - yy
        p = to * t
        sy, sty, doy, dty, disty = sy + yy * yy, sty + t * t, doy + oo * yy, dty + p, disty + d * d
        nnzy += 1.0 if t != 0.0 else 0.0
        kepty += 1.0 if p > 0.0 else 0.0
        againsty += 1.0 if p < 0.0 else 0.0
    for acc, v in ((r, (sx, st, so, sto, dox, dtt, dist, nnz, kept, against)),
                   (q, (sy, sty, so, sto, doy, dty, disty, nnzy, kepty, againsty))):
        for k in range(10):
            acc[k] += v[k]


@njit(**JIT)
def merge_fused(b, xs, o, bf, lo, hi, acc):  # noqa: ANN001, ANN201, ARG001
    """The sums of output `o` against every input in `xs` over entries lo:hi, one pass, a chunk
    at a time, two inputs per loop (the base's and the output's chunk read again from the
    cache for the next two): acc[j] += (‖x‖², ‖τ‖², ‖o‖², ‖τo‖², ⟨o, x⟩, ⟨τo, τ⟩, ‖o − x‖²,
    nnz, kept, against) (counts as float64: exact below 2**53; `bf`: unused, the arrays' dtype
    says it)."""
    nx = len(xs)
    for start in range(lo, hi, CHUNK):
        end = min(start + CHUNK, hi)
        for j in range(0, nx - 1, 2):
            _merge_pair(b, xs[j], xs[j + 1], o, start, end, acc[j], acc[j + 1])
        if nx % 2:
            _merge_chunk(b, xs[nx - 1], o, start, end, acc[nx - 1])
