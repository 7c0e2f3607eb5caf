"""CPU loops (numba) for inspect's per-tensor statistics and run --report: τ formed in float64
on the fly, a chunk of CHUNK entries at a time, never stored whole; bfloat16 inputs read as
stored (their bits widened, exact), other dtypes as float32 / float64 arrays.

Large tensors (`fused_stats`, the bucket method: inspect_select.bracket_stats, one pass with
sampled brackets, runs first and falls back to it): `fused_pass` reads the base and every model once, summing per
model ‖τ‖², ‖base‖², max |τ|, zeros, per pair ⟨τi, τj⟩ and the sign counts, and counting,
summing and bounding (least, largest) τ² per bucket: the high 16 bits of |τ| rounded to float32
(|τ| at bfloat16 precision: 8 exponent, 7 mantissa bits; rounding is monotonic, so a larger τ²
is never in a lower bucket). For each fraction, the k largest τ² are the buckets above the one
holding the k-th largest (their sums) plus the largest entries of that bucket: r copies of its
value when it holds one value (usual for bfloat16 task vectors: no second pass), else
`fused_gather` lists its entries (a pass over the bucket keys, recomputing τ² only where
needed) and `top_sum` selects by radix on 16-bit digits. Exact, like a sort, with no sort.
Both passes split the entries into parts run on threads. Small tensors: `small_pass` sorts.
`pair_pass` (small tensors) sums τi·τj and counts the entries non-zero in both and those of
them with equal signs (run --report's loop: report_kernels.py).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

#: buckets: the high 16 bits of float32(|τ|) (sign 0, 8 exponent, 7 mantissa bits)
NBUCKETS = 1 << 16


#: entries per chunk: inputs are widened to float64 a chunk at a time (vectorised loops; the
#: chunk's scratch arrays stay in the L1/L2 cache)
CHUNK = 1024
JIT = dict(nogil=True, cache=True, boundscheck=False, fastmath={"reassoc", "nsz", "contract"})


@intrinsic
def f64(typingctx, v):  # noqa: ANN001, ANN201, ARG001
    """One entry as float64: a bfloat16 bit pattern (uint16) by a shift (its bits << 16 are the
    float32 of the same value: exact), float32 widened, float64 as is; no memory scratch."""
    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202, ARG001
        x = args[0]
        if v == types.uint16:
            x = builder.bitcast(builder.shl(builder.zext(x, ir.IntType(32)), ir.Constant(ir.IntType(32), 16)),
                                ir.FloatType())
        return x if v == types.float64 else builder.fpext(x, ir.DoubleType())
    return (types.float64(v), codegen) if v in (types.uint16, types.float32, types.float64) else None


@intrinsic
def wide(typingctx, a):  # noqa: ANN001, ANN201, ARG001
    """True for a float64 array, as a compile-time constant (the other dtypes' loops keep no
    trace of the branch): only there can a product τi·τj of non-zero τ underflow to 0 (float32
    and 16-bit τ are >= 2**-149 in size: their products >= 2**-298)."""
    val = isinstance(a, types.Array) and a.dtype == types.float64

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202, ARG001
        return context.get_constant(types.boolean, val)
    return types.boolean(a), codegen


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def nonzero_pair(tx, ty, pr):  # noqa: ANN001, ANN201
    """(both non-zero with equal signs, both non-zero) for float64 τ (`pr` = tx·ty): as
    `pr > 0`, `pr != 0` (NaN included) where the product underflows to 0 too."""
    agree = (pr > 0.0) | ((tx > 0.0) & (ty > 0.0)) | ((tx < 0.0) & (ty < 0.0))
    return agree, (pr != 0.0) | ((tx != 0.0) & (ty != 0.0))


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _load(a, start, m, bf, out, u32):  # noqa: ANN001, ANN201, ARG001
    """Entries start:start+m of `a` (bfloat16 bit patterns as uint16, float32 or float64) into
    float64 `out` (`bf`, `u32`: unused, kept for the callers). Unsigned indices: a signed one
    makes numba test each for wraparound, and LLVM then loads lane by lane (~3x slower)."""
    s = np.uint64(start)
    for i in range(np.uint64(m)):
        out[i] = f64(a[s + i])


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _sum(a, m):  # noqa: ANN001, ANN201
    """Σ a[:m] with 8 running sums (a float reduction LLVM vectorises; one accumulator made the
    loops 2-3x slower)."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    i = 0
    while i + 8 <= m:
        s0 += a[i]
        s1 += a[i + 1]
        s2 += a[i + 2]
        s3 += a[i + 3]
        s4 += a[i + 4]
        s5 += a[i + 5]
        s6 += a[i + 6]
        s7 += a[i + 7]
        i += 8
    r = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    while i < m:
        r += a[i]
        i += 1
    return r


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _max(a, m):  # noqa: ANN001, ANN201
    """max(a[:m]) (a >= 0) with 8 running maxima."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    i = 0
    while i + 8 <= m:
        s0 = max(s0, a[i])
        s1 = max(s1, a[i + 1])
        s2 = max(s2, a[i + 2])
        s3 = max(s3, a[i + 3])
        s4 = max(s4, a[i + 4])
        s5 = max(s5, a[i + 5])
        s6 = max(s6, a[i + 6])
        s7 = max(s7, a[i + 7])
        i += 8
    r = max(max(max(s0, s1), max(s2, s3)), max(max(s4, s5), max(s6, s7)))
    while i < m:
        r = max(r, a[i])
        i += 1
    return r


@njit(nogil=True, cache=True, boundscheck=False)
def top_sum(vals, r):  # noqa: ANN001, ANN201
    """The sum of the r largest of `vals` (>= 0): a radix selection on the bits of their float64
    patterns (ordered like the values), exact, no sort (quantised task vectors put millions of
    equal values in one bucket). Each round takes the DIGIT_BITS bits just below the highest bit
    where the least and the largest candidate differ (the bits above are common to all), so
    a round never passes over digits that cannot split, and its tables stay in the L1 cache."""
    total = 0.0
    cand = vals
    counts = np.zeros(1 << DIGIT_BITS, np.int64)
    sums = np.zeros(1 << DIGIT_BITS, np.float64)
    mask = np.uint64((1 << DIGIT_BITS) - 1)
    while r > 0:
        if cand.size <= r:
            return total + _sum(cand, cand.size)
        lo_v = hi_v = cand[0]
        for i in range(cand.size):
            lo_v = min(lo_v, cand[i])
            hi_v = max(hi_v, cand[i])
        if lo_v == hi_v:  # all equal: r copies of one value
            return total + r * cand[0]
        bits = cand.view(np.uint64)
        lh = np.empty(2, np.float64)
        lh[0] = lo_v
        lh[1] = hi_v
        lhb = lh.view(np.uint64)
        diff = lhb[0] ^ lhb[1]
        top = 63
        while (diff >> np.uint64(top)) == 0:
            top -= 1
        shift = np.uint64(max(0, top - DIGIT_BITS + 1))
        counts[:] = 0
        sums[:] = 0.0
        for i in range(cand.size):
            d = (bits[i] >> shift) & mask
            counts[d] += 1
            sums[d] += cand[i]
        d = (1 << DIGIT_BITS) - 1
        while counts[d] < r:  # whole digits above the one holding the r-th largest
            r -= counts[d]
            total += sums[d]
            d -= 1
        keep = np.empty(counts[d], np.float64)
        j = 0
        dd = np.uint64(d)
        for i in range(cand.size):
            if (bits[i] >> shift) & mask == dd:
                keep[j] = cand[i]
                j += 1
        cand = keep
    return total


#: bits per round of top_sum's radix selection (tables of 2**11 entries: 16 kB each)
DIGIT_BITS = 11


@njit(**JIT)
def pair_pass(b, x, y, bf):  # noqa: ANN001, ANN201
    """⟨τx, τy⟩, the entries where both are non-zero with equal signs, and where both are
    non-zero (τx·τy > 0 and ≠ 0: exact in float64 for float32 / 16-bit inputs)."""
    n = b.size
    fb = np.empty(CHUNK, np.float64)
    fx = np.empty(CHUNK, np.float64)
    fy = np.empty(CHUNK, np.float64)
    u = np.empty(CHUNK, np.uint32)
    dot = 0.0
    agree = 0
    both = 0
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        _load(b, start, m, bf, fb, u)
        _load(x, start, m, bf, fx, u)
        _load(y, start, m, bf, fy, u)
        if wide(b):  # float64: a product of tiny τ may underflow to 0
            for i in range(m):
                tx, ty = fx[i] - fb[i], fy[i] - fb[i]
                p = tx * ty
                dot += p
                a, nz = nonzero_pair(tx, ty, p)
                agree += a
                both += nz
        else:
            for i in range(m):
                p = (fx[i] - fb[i]) * (fy[i] - fb[i])
                dot += p
                agree += p > 0.0
                both += p != 0.0
    return dot, agree, both


@njit(**JIT)
def small_pass(b, x, bf, ks):  # noqa: ANN001, ANN201
    """model_pass + the top-k energies for a small tensor: τ² sorted (no 65536-bucket tables:
    per-tensor overhead matters for checkpoints of many small tensors)."""
    n = b.size
    fb = np.empty(n, np.float64)
    fx = np.empty(n, np.float64)
    u = np.empty(n, np.uint32)
    _load(b, 0, n, bf, fb, u)
    _load(x, 0, n, bf, fx, u)
    q = np.empty(n, np.float64)
    ss = 0.0
    bss = 0.0
    mx = 0.0
    zeros = 0
    for i in range(n):
        t = fx[i] - fb[i]
        bss += fb[i] * fb[i]
        q[i] = t * t
        ss += q[i]
        mx = max(mx, abs(t))
        zeros += t == 0.0
    q.sort()
    energy = np.zeros(ks.size, np.float64)
    for f in range(ks.size):
        for i in range(n - ks[f], n):
            energy[f] += q[i]
    return ss, bss, mx, zeros, energy


#: tensors up to this many entries take `small_pass`
SMALL = 1 << 14


def model_stats(b: np.ndarray, x: np.ndarray, fractions: tuple[float, ...], bf: bool = False
                ) -> tuple[float, float, float, int, list[float]]:
    """‖τ‖², ‖base‖², max |τ|, zeros and, per fraction f, the sum of the ceil(f·n) largest τ²
    of a small tensor (at most SMALL entries; `bf`: the arrays hold bfloat16 bit patterns)."""
    n = b.size
    if n == 0:
        return 0.0, 0.0, 0.0, 0, [0.0] * len(fractions)
    assert n <= SMALL, "large tensors: fused_stats"
    ks = np.array([min(n, max(1, math.ceil(f * n))) for f in fractions], np.int64)
    ss, bss, mx, zeros, en = small_pass(b, x, bf, ks)
    return ss, bss, mx, zeros, [float(e) for e in en]


@njit(**JIT)
def fused_pass(b, xs, bf, lo, hi, hist, keys, stats, pairs):  # noqa: ANN001, ANN201
    """Entries lo:hi of the base `b` and every model in `xs` (a tuple of arrays) in one pass:
    per model j `stats[j]` += (‖τ‖², ‖base‖², max |τ| (a max), zeros), its τ² buckets into
    `keys[j]`, and per bucket k `hist[j, k]` = (count, sum, least, largest τ²) updated (one
    cache line per entry); per pair p (in (i, j), i < j order) `pairs[p]` += (⟨τi, τj⟩,
    entries both non-zero with equal signs, entries both non-zero). Per chunk the base and
    each model are widened once (bf16 by a shift, f64), unsigned indices (no wraparound
    tests), sums in registers (`reassoc`: LLVM vectorises those loops)."""
    nm = len(xs)
    fb = np.empty(CHUNK, np.float64)
    tt = np.empty((nm, CHUNK), np.float64)
    a32 = np.empty(CHUNK, np.float32)
    abits = a32.view(np.uint32)
    for start in range(lo, hi, CHUNK):
        m = np.uint64(min(CHUNK, hi - start))
        s0 = np.uint64(start)
        _load(b, start, m, bf, fb, a32)
        bss = 0.0
        for i in range(m):
            bss += fb[i] * fb[i]
        for j in range(nm):
            x = xs[j]
            tj = tt[j]
            ss = zeros = mx = 0.0
            for i in range(m):
                t = f64(x[s0 + i]) - fb[i]
                tj[i] = t
                ss += t * t
                a = abs(t)
                mx = a if a > mx else mx
                a32[i] = np.float32(a)
                zeros += 1.0 if t == 0.0 else 0.0
            stats[j, 0] += ss
            stats[j, 1] += bss
            stats[j, 2] = max(stats[j, 2], mx)
            stats[j, 3] += zeros
            hj = hist[j]
            kj = keys[j]
            for i in range(m):
                k = abits[i] >> np.uint32(16)
                q = tj[i] * tj[i]
                kj[s0 + i] = k
                h = hj[k]
                h[0] += 1.0
                h[1] += q
                h[2] = min(h[2], q)
                h[3] = max(h[3], q)
        p = 0
        for j in range(nm):
            for l in range(j + 1, nm):
                ti, tl = tt[j], tt[l]
                dot = agree = both = 0.0
                if wide(b):  # float64: a product of tiny τ may underflow to 0
                    for i in range(m):
                        pr = ti[i] * tl[i]
                        dot += pr
                        a, nz = nonzero_pair(ti[i], tl[i], pr)
                        agree += 1.0 if a else 0.0
                        both += 1.0 if nz else 0.0
                else:
                    for i in range(m):
                        pr = ti[i] * tl[i]
                        dot += pr
                        agree += 1.0 if pr > 0.0 else 0.0
                        both += 1.0 if pr != 0.0 else 0.0
                pairs[p, 0] += dot
                pairs[p, 1] += agree
                pairs[p, 2] += both
                p += 1


@njit(**JIT)
def fused_gather(b, xs, bf, lo, hi, keys, slot, fill, out):  # noqa: ANN001, ANN201, ARG001
    """Second pass over entries lo:hi, reading the bucket keys: the τ² of the entries of
    buckets with a slot (`slot[j, k]` >= 0) listed into `out` at `fill[slot]`, recomputed from
    the inputs as stored (f64; unsigned indices)."""
    for j in range(len(xs)):
        x, kj, sj = xs[j], keys[j], slot[j]
        for i in range(np.uint64(lo), np.uint64(hi)):
            s = sj[kj[i]]
            if s >= 0:
                t = f64(x[i]) - f64(b[i])
                out[fill[s]] = t * t
                fill[s] += 1


def fused_stats(b: np.ndarray, xs: list[np.ndarray], fractions: tuple[float, ...], bf: bool,
                parts: int = 1, run: Any = None) -> tuple[list[tuple], list[tuple[float, int, int]]]:
    """Every model's (‖τ‖², ‖base‖², max |τ|, zeros, energies) and every pair's (dot, agree,
    both) for a large tensor, in two fused passes; `parts` ranges of the entries run through
    `run(fn, args_list)` (threads: the loops release the GIL), else one after the other."""
    n, nm = b.size, len(xs)
    xt = tuple(xs)
    npairs = nm * (nm - 1) // 2
    cuts = [n * p // parts for p in range(parts + 1)]
    hist = np.zeros((parts, nm, NBUCKETS, 4), np.float64)  # count, sum, least, largest τ²
    hist[..., 2] = np.inf
    keys = np.empty((nm, n), np.uint16)
    stats = np.zeros((parts, nm, 4), np.float64)
    pairs = np.zeros((parts, max(npairs, 1), 3), np.float64)
    runner = run or (lambda fn, args: [fn(*a) for a in args])
    runner(fused_pass, [(b, xt, bf, cuts[p], cuts[p + 1], hist[p], keys, stats[p], pairs[p])
                        for p in range(parts)])
    counts, sums, bmin, bmax = hist[..., 0].astype(np.int64), hist[..., 1], hist[..., 2], hist[..., 3]
    total = counts.sum(axis=0)
    bucket_sums = sums.sum(axis=0)
    lowest, highest = bmin.min(axis=0), bmax.max(axis=0)
    wanted = []  # per model, per fraction: (boundary bucket, entries above it, k)
    for j in range(nm):
        nz = np.nonzero(total[j])[0][::-1]
        ccount = np.cumsum(total[j][nz])
        row = []
        for f in fractions:
            k = min(n, max(1, math.ceil(f * n)))
            i = int(np.searchsorted(ccount, k))
            row.append((int(nz[i]), int(ccount[i - 1]) if i else 0, k))
        wanted.append(row)
    slot = np.full((nm, NBUCKETS), -1, np.int64)
    order = []  # (model, bucket) per slot: boundary buckets holding different values
    for j in range(nm):
        for bk in sorted({w[0] for w in wanted[j]}):
            if lowest[j, bk] != highest[j, bk]:
                slot[j, bk] = len(order)
                order.append((j, bk))
    sizes = np.array([total[j, bk] for j, bk in order], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    # each part lists its entries of a slot after the earlier parts' entries
    fills = [offsets[:-1] + np.array([counts[:p, j, bk].sum() for j, bk in order], np.int64)
             for p in range(parts)]
    out = np.empty(int(offsets[-1]), np.float64)
    if order:
        runner(fused_gather, [(b, xt, bf, cuts[p], cuts[p + 1], keys, slot, fills[p], out)
                              for p in range(parts)])
    st = stats.sum(axis=0)
    models = []
    for j in range(nm):
        energy = []
        for f, (bk, above_n, k) in enumerate(wanted[j]):
            s = int(slot[j, bk])
            above = float(bucket_sums[j, bk + 1:].sum())  # every bucket above the boundary
            if s < 0:  # one value in the whole bucket: its r largest are r copies of it
                energy.append(above + (k - above_n) * float(highest[j, bk]))
            else:
                energy.append(above + float(top_sum(out[offsets[s]:offsets[s + 1]], k - above_n)))
        mx = float(stats[:, j, 2].max())
        models.append((float(st[j, 0]), float(st[j, 1]), mx, int(st[j, 3]), energy))
    pr = pairs.sum(axis=0)
    return models, [(float(pr[p, 0]), int(pr[p, 1]), int(pr[p, 2])) for p in range(npairs)]
