"""CPU loops (numba) for inspect's per-tensor statistics: one pass per model and one per pair
over the float32 (or float64) inputs, τ formed in float64 on the fly and never stored.

bfloat16 inputs are read as stored (their bits widened in the loop, exact), other dtypes as
float32 / float64 arrays. `model_pass` sums ‖τ‖², ‖base‖², max |τ|, zeros, and histograms τ² by a monotonic bucket
(binary exponent and 4 mantissa bits: `_bucket`), counts and float64 sums per bucket. The k
largest τ² are then the buckets above the one holding the k-th largest, plus the largest
entries of that bucket: `gather` lists that bucket's entries (a second pass) which are sorted.
Exact, like a sort of all of τ², at the cost of two passes. `pair_pass` sums τi·τj and counts
the entries non-zero in both and those of them with equal signs.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

#: buckets: the high 16 bits of τ² rounded to float32 (8 exponent, 7 mantissa bits); rounding
#: is monotonic, so a larger τ² never falls into a lower bucket (ties are sorted exactly)
NBUCKETS = 1 << 16


@njit(inline="always", nogil=True, cache=True)
def _f(a, i, bf, fbuf, fbits):  # noqa: ANN001, ANN201
    """Entry i of `a` as float64; `bf`: `a` holds bfloat16 bit patterns (uint16)."""
    if bf:
        fbits[0] = np.uint32(a[i]) << 16
        return np.float64(fbuf[0])
    return np.float64(a[i])


@njit(nogil=True, cache=True, boundscheck=False)
def model_pass(b, x, bf, counts, sums, keys):  # noqa: ANN001, ANN201 - numba types
    ss = 0.0
    bss = 0.0
    mx = 0.0
    zeros = 0
    buf = np.empty(1, np.float32)
    bits = buf.view(np.uint32)
    fbuf = np.empty(1, np.float32)
    fbits = fbuf.view(np.uint32)
    for i in range(b.size):
        bb = _f(b, i, bf, fbuf, fbits)
        t = _f(x, i, bf, fbuf, fbits) - bb
        bss += bb * bb
        q = t * t
        ss += q
        a = abs(t)
        if a > mx:
            mx = a
        if t == 0.0:
            zeros += 1
        buf[0] = np.float32(q)
        k = bits[0] >> 16
        keys[i] = k
        counts[k] += 1
        sums[k] += q
    return ss, bss, mx, zeros


@njit(nogil=True, cache=True, boundscheck=False)
def gather(b, x, bf, keys, slot, offsets):  # noqa: ANN001, ANN201
    """The τ² of the entries whose bucket has a slot (>= 0), each slot's in its part of `out`."""
    out = np.empty(offsets[-1], np.float64)
    fill = offsets[:-1].copy()
    fbuf = np.empty(1, np.float32)
    fbits = fbuf.view(np.uint32)
    for i in range(b.size):
        s = slot[keys[i]]
        if s >= 0:
            t = _f(x, i, bf, fbuf, fbits) - _f(b, i, bf, fbuf, fbits)
            out[fill[s]] = t * t
            fill[s] += 1
    return out


@njit(nogil=True, cache=True, boundscheck=False)
def pair_pass(b, x, y, bf):  # noqa: ANN001, ANN201
    dot = 0.0
    agree = 0
    both = 0
    fbuf = np.empty(1, np.float32)
    fbits = fbuf.view(np.uint32)
    for i in range(b.size):
        bb = _f(b, i, bf, fbuf, fbits)
        tx = _f(x, i, bf, fbuf, fbits) - bb
        ty = _f(y, i, bf, fbuf, fbits) - bb
        dot += tx * ty
        if tx != 0.0 and ty != 0.0:
            both += 1
            if (tx > 0.0) == (ty > 0.0):
                agree += 1
    return dot, agree, both


def model_stats(b: np.ndarray, x: np.ndarray, fractions: tuple[float, ...], bf: bool = False
                ) -> tuple[float, float, float, int, list[float]]:
    """‖τ‖², ‖base‖², max |τ|, zeros and, per fraction f, the sum of the ceil(f·n) largest τ²
    (`bf`: the arrays hold bfloat16 bit patterns)."""
    n = b.size
    counts = np.zeros(NBUCKETS, np.int64)
    sums = np.zeros(NBUCKETS, np.float64)
    keys = np.empty(n, np.uint16)
    ss, bss, mx, zeros = model_pass(b, x, bf, counts, sums, keys)
    if n == 0:
        return ss, bss, mx, zeros, [0.0] * len(fractions)
    nz = np.nonzero(counts)[0][::-1]  # occupied buckets, largest first
    ccount = np.cumsum(counts[nz])
    csum = np.cumsum(sums[nz])
    wanted = []  # per fraction: (bucket, its position j, k)
    for f in fractions:
        k = min(n, max(1, math.ceil(f * n)))
        j = int(np.searchsorted(ccount, k))  # the bucket holding the k-th largest
        wanted.append((int(nz[j]), j, k))
    buckets = sorted({w[0] for w in wanted})
    slot = np.full(NBUCKETS, -1, np.int64)
    slot[buckets] = np.arange(len(buckets))
    offsets = np.concatenate([[0], np.cumsum(counts[buckets])]).astype(np.int64)
    listed = gather(b, x, bf, keys, slot, offsets)
    energy = []
    for bk, j, k in wanted:
        s = buckets.index(bk)
        part = -np.sort(-listed[offsets[s]:offsets[s + 1]])
        above_n = int(ccount[j - 1]) if j else 0
        above = float(csum[j - 1]) if j else 0.0
        energy.append(above + float(part[:k - above_n].sum()))
    return ss, bss, mx, zeros, energy


@njit(nogil=True, cache=True, boundscheck=False)
def merge_pass(b, x, o, bf):  # noqa: ANN001, ANN201
    """An output `o` against one input `x` of a merge from base `b` (run --report): ‖x‖²,
    ‖τ‖², ‖o‖², ‖τo‖², ⟨o, x⟩, ⟨τo, τ⟩, ‖o − x‖² (τ = x − b, τo = o − b), and of the entries
    where τ ≠ 0: how many, where τo has τ's sign (kept), where it has the other sign (against)."""
    sx = st = so = sto = dox = dtt = dist = 0.0
    nnz = kept = against = 0
    fbuf = np.empty(1, np.float32)
    fbits = fbuf.view(np.uint32)
    for i in range(b.size):
        bb = _f(b, i, bf, fbuf, fbits)
        xx = _f(x, i, bf, fbuf, fbits)
        oo = _f(o, i, bf, fbuf, fbits)
        t = xx - bb
        to = oo - bb
        d = oo - xx
        sx += xx * xx
        st += t * t
        so += oo * oo
        sto += to * to
        dox += oo * xx
        dtt += to * t
        dist += d * d
        if t != 0.0:
            nnz += 1
            if to != 0.0:
                if (to > 0.0) == (t > 0.0):
                    kept += 1
                else:
                    against += 1
    return sx, st, so, sto, dox, dtt, dist, nnz, kept, against
