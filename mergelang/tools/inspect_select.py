"""inspect's large-tensor statistics in ONE pass over the entries (`bracket_stats`): the sums
of inspect_kernels.fused_pass plus exact top-k energies, without its 65536-bucket tables.

A sample of τ² (one entry per block of `step` entries, at a hashed position in the block:
stratified, so a period in the tensor's layout does not bias it) is sorted; per fraction f
(k = ceil(f·n)) it brackets the k-th largest τ²: `hi`, with at most p − d sample entries above
it, and `lo`, with at least p + d (p = k·m/n the expected sample rank, d = Z binomial standard
deviations + 2). Those values, and each sample value repeated often (quantised task vectors:
millions of equal τ²) as the pair (v⁻, v] (v⁻ the float below v: the interval holds v alone),
are the `cuts`. The pass counts, per cut c, the τ² > c (and sums them at each bracket's top;
branch-free, vectorised: the chunk's τ² stay in the L1 cache) and lists the τ² of the entries
inside bracket intervals that may hold several values (`spans`). Afterwards, per fraction, the
count above `hi` must be < k and above `lo` >= k; walking the intervals (c_r, c_r-1] down from
`hi`, one holding a single value adds copies of it, a span its listed entries (all, or the
largest by `top_sum`). Where that does not settle it (the bracket missed, a list overflowed, τ
not finite) the tensor is recomputed by the exact bucket method (inspect_kernels.fused_stats):
those results are the bucket method's. Exact, like a sort. The design: docs/design.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from mergelang.tools.inspect_kernels import (
    CHUNK,
    JIT,
    f64,
    fused_stats,
    nonzero_pair,
    top_sum,
    wide,
)

#: one sampled entry per block of SAMPLE_STEP entries (a power of two) ...
SAMPLE_STEP = 64
#: ... or a smaller step (down to 1) so that at least SAMPLE_MIN entries are sampled
SAMPLE_MIN = 32768
#: the bracket's margin, in binomial standard deviations of the sample rank
Z = 5.0
#: a sample value repeated at least HEAVY · (sample size) times (and twice) gets its own cuts
HEAVY = 1 / 512
#: cuts per model at most (each costs a compare and a count per entry, a bracket's top a sum)
MAX_CUTS = 16
#: the bits of |v| from those of a float64 v
ABS = np.int64(0x7FFFFFFFFFFFFFFF)
#: list buffers per model: LIST_SCALE x the entries expected in the spans + LIST_SLACK (a
#: part that lists more overflows: the tensor falls back)
LIST_SCALE = 2.0
LIST_SLACK = 4 * CHUNK
#: False: every large tensor by the bucket method (benchmarks/bench_inspect.py --compare)
USE_BRACKET = True
#: how often each path ran (tests, benchmarks): bracket, fallback
COUNTS = {"bracket": 0, "fallback": 0}


@njit(**JIT)
def sample_sq(b, xs, step, out, lo, hi):
    """out[j, i] = τ² of model j at one entry of block i, lo <= i < hi (`step` entries a block,
    a power of two; the entry's place in the block from a multiplicative hash of i)."""
    mask = np.uint64(step - 1)
    for j in range(len(xs)):
        x = xs[j]
        oj = out[j]
        for i in range(np.uint64(lo), np.uint64(hi)):
            h = (i * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
            e = i * np.uint64(step) + (h & mask)
            t = f64(x[e]) - f64(b[e])
            oj[i] = t * t


@njit(**JIT)
def bracket_pass(b, xs, lo, hi, cuts, ncut, wsum, spans, spanb, nspan, acc, stats, mxb, pairs, buf, fill):
    """Entries lo:hi of the base and every model: `stats[j]` += (‖τ‖², ‖base‖², zeros),
    `mxb[j]`: the largest bit pattern of |τ| (max |τ| for a finite τ); per cut r < ncut[j]
    `acc[j, r]` += (count of τ² > cuts[j, r], their sum where wsum[j, r]); the τ² in each of
    the nspan[j] spans (between cuts spans[j, s, 0] and spans[j, s, 1]; as bit patterns
    spanb[j, s] = (lo, width): τ² in it when its bits - lo <= width, unsigned) listed into
    buf[j] from fill[j] (a chunk that might not fit marks fill[j] past the end: overflow); per
    pair `pairs[p]` += (⟨τi, τj⟩, both non-zero with equal signs, both non-zero), as
    fused_pass. Per chunk, every loop runs over rows in the L1 cache."""
    nm = len(xs)
    fb = np.empty(CHUNK, np.float64)
    tt = np.empty((nm, CHUNK), np.float64)
    tb = tt.view(np.int64)
    q = np.empty(CHUNK, np.float64)
    gl = np.empty(cuts.shape[1], np.int64)
    fl = np.empty(CHUNK, np.uint8)
    for start in range(lo, hi, CHUNK):
        m = np.uint64(min(CHUNK, hi - start))
        s0 = np.uint64(start)
        bss = 0.0
        for i in range(m):
            v = f64(b[s0 + i])
            fb[i] = v
            bss += v * v
        for j in range(nm):
            x = xs[j]
            tj = tt[j]
            ss = 0.0
            for i in range(m):
                t = f64(x[s0 + i]) - fb[i]
                tj[i] = t
                qq = t * t
                q[i] = qq
                ss += qq
            mb = zeros = 0  # max |τ| as its bits (integer max: vectorised), τ = ±0
            for i in range(m):
                mb = max(mb, tb[j, i] & ABS)
                zeros += (tb[j, i] << 1) == 0
            stats[j, 0] += ss
            stats[j, 1] += bss
            stats[j, 2] += zeros
            mxb[j] = max(mxb[j], mb)
            for r in range(ncut[j]):
                c = cuts[j, r]
                g = 0
                if wsum[j, r]:
                    s = 0.0
                    for i in range(m):
                        w = q[i] > c
                        g += w
                        s += q[i] if w else 0.0
                    acc[j, r, 1] += s
                else:
                    for i in range(m):
                        g += q[i] > c
                gl[r] = g
                acc[j, r, 0] += g
            listed = 0
            for r in range(spans.shape[1]):
                listed += gl[spans[j, r, 0]] - gl[spans[j, r, 1]]
            if listed:
                _list(q, m, fl, spanb[j], nspan[j], buf[j], fill, j)
        _pairs(tt, nm, m, pairs, wide(b))


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _list(q, m, fl, sb, ns, bj, fill, j):
    """Append the τ² of q[:m] inside a span to bj from fill[j]: flags by one unsigned compare
    per span on the bit patterns (τ² >= 0: ordered like the values), two spans a loop (sb
    padded with a span that holds nothing), then the flagged entries of each 8-entry word that
    has any, one set bit at a time."""
    qb = q.view(np.uint64)
    for r in range(0, ns, 2):
        l0, w0, l1, w1 = sb[r, 0], sb[r, 1], sb[r + 1, 0], sb[r + 1, 1]
        for i in range(m):
            v = qb[i]
            u = ((v - l0) <= w0) | ((v - l1) <= w1)
            fl[i] = u if r == 0 else fl[i] | u
    f = fill[j]
    if f + np.int64(m) > bj.size:
        fill[j] = bj.size + 1
        return
    nw = (m + np.uint64(7)) >> np.uint64(3)
    for i in range(m, nw << np.uint64(3)):
        fl[i] = 0  # a last, partial word: no flags left from an earlier chunk
    fw = fl.view(np.uint64)
    for w in range(nw):
        x = fw[w]
        while x:  # one flag (bit 0 of a byte) at a time: its entry is w·8 + (trailing zeros) / 8
            bj[np.uint64(f)] = q[(w << np.uint64(3)) | (_ctz(x) >> np.uint64(3))]
            f += 1
            x &= x - np.uint64(1)
    fill[j] = f


@intrinsic
def _ctz(typingctx, v):
    """The trailing zero bits of a non-zero uint64 (one instruction)."""
    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64), ir.IntType(1)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.cttz.i64")
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])
    return (types.uint64(types.uint64), codegen) if v == types.uint64 else None


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _pairs(tt, nm, m, pairs, exact):
    """Per pair (⟨τi, τj⟩, both non-zero with equal signs, both non-zero) += the chunk's;
    `exact` (float64 inputs, a compile-time constant: inspect_kernels.wide) also counts the
    entries whose product underflows to 0."""
    p = 0
    for j in range(nm):
        for l in range(j + 1, nm):
            ti, tl = tt[j], tt[l]
            dot = 0.0
            agree = both = 0
            if exact:
                for i in range(m):
                    pr = ti[i] * tl[i]
                    dot += pr
                    a, nz = nonzero_pair(ti[i], tl[i], pr)
                    agree += a
                    both += nz
            else:
                for i in range(m):
                    pr = ti[i] * tl[i]
                    dot += pr
                    agree += pr > 0.0
                    both += pr != 0.0
            pairs[p, 0] += dot
            pairs[p, 1] += agree
            pairs[p, 2] += both
            p += 1


def sample_step(n: int) -> int:
    """The sampling step for n entries: SAMPLE_STEP, halved until SAMPLE_MIN entries fit."""
    s = SAMPLE_STEP
    while s > 1 and n // s < SAMPLE_MIN:
        s //= 2
    return s


def below(v: float) -> float:
    """The float64 just below v."""
    return math.nextafter(float(v), -math.inf)


class Plan(NamedTuple):
    """One model's cuts (descending), whether each needs its sum (a bracket's top), the spans
    (index pairs (lower, upper) into the cuts) whose entries are listed, the brackets (lo, hi)
    per rank, and the sample entries inside the spans."""

    cuts: list[float]
    wsum: list[bool]
    spans: list[tuple[int, int]]
    brackets: list[tuple[float, float]]
    inside: int


def plan_cuts(a: np.ndarray, n: int, ks: list[int]) -> Plan:
    """The Plan of one model from the ascending sorted sample `a` of its n entries' τ² and the
    ranks ks (module docstring)."""
    m = a.size
    brackets, heavy = [], {}
    for k in ks:
        pf = k / n
        p = pf * m
        d = Z * math.sqrt(m * pf * (1 - pf)) + 2
        i = math.floor(p - d)
        hi = math.inf if i < 0 else float(a[m - 1 - i])
        c = math.ceil(p + d)
        lo = -1.0 if c >= m else below(a[m - 1 - c])  # #{sample > lo} >= c even with ties
        brackets.append((lo, hi))
        seg = a[np.searchsorted(a, lo, "right"):np.searchsorted(a, hi, "right")]
        if seg.size >= 2:
            edge = np.flatnonzero(np.diff(seg)) + 1  # the runs of equal values
            starts = np.concatenate(([0], edge))
            runs = np.diff(np.concatenate((starts, [seg.size])))
            for st in np.flatnonzero(runs >= max(2, HEAVY * m)):
                heavy[float(seg[starts[st]])] = int(runs[st])
    cuts = {x for lh in brackets for x in lh}
    for v in sorted(heavy, key=lambda v: -heavy[v]):  # the most repeated values first
        new = {v, below(v)} - cuts
        if len(cuts) + len(new) <= MAX_CUTS:
            cuts |= new
    cd = sorted(cuts, reverse=True)
    tops = {hi for _, hi in brackets}
    spans: list[tuple[int, int]] = []
    for r in range(1, len(cd)):
        lower, upper = cd[r], cd[r - 1]
        if lower == below(upper) or not any(lo <= lower and upper <= hi for lo, hi in brackets):
            continue  # one value (no list), or outside every bracket
        if spans and spans[-1][0] == r - 1:
            spans[-1] = (r, spans[-1][1])
        else:
            spans.append((r, r - 1))
    inside = sum(int(np.searchsorted(a, cd[u], "right") - np.searchsorted(a, cd[lw], "right"))
                 for lw, u in spans)
    return Plan(cd, [c in tops for c in cd], spans, brackets, inside)


def bracket_stats(b: np.ndarray, xs: list[np.ndarray], fractions: tuple[float, ...], bf: bool,
                  parts: int = 1, run: Any = None, tamper: Callable[[np.ndarray], None] | None = None
                  ) -> tuple[list[tuple], list[tuple[float, int, int]]]:
    """fused_stats' results (every model's (‖τ‖², ‖base‖², max |τ|, zeros, energies), every
    pair's (dot, agree, both)) in one pass over `parts` ranges of the entries (through
    `run(fn, args_list)`: threads), falling back to fused_stats where a bracket missed.
    `tamper` (tests) may alter the sorted sample (nm rows) before the cuts are planned."""
    if not USE_BRACKET:
        return fused_stats(b, xs, fractions, bf, parts, run)
    n, nm = b.size, len(xs)
    xt = tuple(xs)
    runner = run or (lambda fn, args: [fn(*a) for a in args])
    step = sample_step(n)
    smp = np.empty((nm, n // step), np.float64)
    at = [smp.shape[1] * p // parts for p in range(parts + 1)]
    runner(sample_sq, [(b, xt, step, smp, at[p], at[p + 1]) for p in range(parts)])
    smp.sort(axis=1)
    if tamper is not None:
        tamper(smp)
    ks = [min(n, max(1, math.ceil(f * n))) for f in fractions]
    if not np.isfinite(smp).all():  # NaN / Inf in τ: the bucket method's results (as before)
        return _fallback(b, xs, fractions, bf, parts, run)
    plans = [plan_cuts(smp[j], n, ks) for j in range(nm)]
    cuts_at = [n * p // parts for p in range(parts + 1)]
    expect = max(p.inside for p in plans) * step  # entries listed, expected, per model
    cap = int(LIST_SCALE * (expect / parts + 4 * math.sqrt(expect + 1)) + LIST_SLACK)
    cap = min(max(np.diff(cuts_at)), cap)
    arrays = tables(plans, parts, cap if any(p.spans for p in plans) else 1)
    cuts, wsum, spans, spanb, acc, stats, mxb, pairs, buf, fill = arrays
    ncut = np.array([len(p.cuts) for p in plans], np.int64)
    nspan = np.array([len(p.spans) for p in plans], np.int64)
    runner(bracket_pass, [(b, xt, cuts_at[p], cuts_at[p + 1], cuts, ncut, wsum, spans, spanb, nspan,
                           acc[p], stats[p], mxb[p], pairs[p], buf[p], fill[p]) for p in range(parts)])
    st = stats.sum(axis=0)
    if not np.isfinite(st[:, :2]).all():
        return _fallback(b, xs, fractions, bf, parts, run)
    g = acc.sum(axis=0)
    mx = mxb.max(axis=0).view(np.float64)
    models = []
    for j in range(nm):
        listed = None if (fill[:, j] > buf.shape[2]).any() else \
            np.concatenate([buf[p, j, :fill[p, j]] for p in range(parts)])
        energy = _energies(plans[j], g[j], listed, ks)
        if energy is None:
            return _fallback(b, xs, fractions, bf, parts, run)
        models.append((float(st[j, 0]), float(st[j, 1]), float(mx[j]), int(st[j, 2]), energy))
    COUNTS["bracket"] += 1
    pr = pairs.sum(axis=0)
    return models, [(float(pr[p, 0]), int(pr[p, 1]), int(pr[p, 2])) for p in range(len(pr) if nm > 1 else 0)]


def tables(plans: list[Plan], parts: int, cap: int) -> tuple[np.ndarray, ...]:
    """The pass's inputs (cuts, wsum, spans, spanb; empty slots: -inf cuts, spans that count
    and list nothing) and per-part outputs (acc, stats, mxb, pairs, buf, fill)."""
    nm = len(plans)
    r = max(len(p.cuts) for p in plans)
    ns = 2 * max(1, -(-max(len(p.spans) for p in plans) // 2))  # _list: two spans a loop
    cuts = np.full((nm, r), -np.inf)
    wsum = np.zeros((nm, r), np.bool_)
    spans = np.zeros((nm, ns, 2), np.int64)
    spanb = np.zeros((nm, ns, 2), np.uint64)
    spanb[:, :, 0] = np.uint64(0xFFFFFFFFFFFFFFFF)
    for j, p in enumerate(plans):
        cuts[j, :len(p.cuts)] = p.cuts
        wsum[j, :len(p.cuts)] = p.wsum
        for s, (lw, u) in enumerate(p.spans):
            spans[j, s] = (lw, u)
            lo = p.cuts[lw]
            lo1 = 0 if lo < 0 else int(np.float64(lo).view(np.uint64)) + 1
            spanb[j, s] = (lo1, int(np.float64(p.cuts[u]).view(np.uint64)) - lo1)
    npairs = max(1, nm * (nm - 1) // 2)
    return (cuts, wsum, spans, spanb, np.zeros((parts, nm, r, 2)), np.zeros((parts, nm, 3)),
            np.zeros((parts, nm), np.int64), np.zeros((parts, npairs, 3)),
            np.empty((parts, nm, cap)), np.zeros((parts, nm), np.int64))


def _energies(plan: Plan, g: np.ndarray, listed: np.ndarray | None, ks: list[int]) -> list[float] | None:
    """Per rank k the sum of the k largest τ², from the counts above each cut (g[r, 0]), the sum
    above each bracket's top (g[r, 1]) and the listed τ²; None where a bracket missed."""
    cd = plan.cuts
    out = []
    for k, (lo, hi) in zip(ks, plan.brackets):
        rh, rl = cd.index(hi), cd.index(lo)
        if g[rh, 0] >= k or g[rl, 0] < k:
            return None  # the k-th largest is outside the bracket
        need, total = k - int(g[rh, 0]), float(g[rh, 1])
        for r in range(rh + 1, rl + 1):  # the intervals (cd[r], cd[r - 1]] from the top
            c = int(g[r, 0] - g[r - 1, 0])
            if c and cd[r] == below(cd[r - 1]):  # one value: copies of it
                take = min(c, need)
                total += take * cd[r - 1]
            elif c:
                if listed is None:
                    return None  # the list overflowed
                vals = listed[(listed > cd[r]) & (listed <= cd[r - 1])]
                if vals.size != c:
                    return None
                take = min(c, need)
                total += float(vals.sum()) if take == c else float(top_sum(vals, take))
            else:
                take = 0
            need -= take
            if not need:
                break
        out.append(total)
    return out


def _fallback(b: np.ndarray, xs: list[np.ndarray], fractions: tuple[float, ...], bf: bool,
              parts: int, run: Any) -> tuple[list[tuple], list[tuple[float, int, int]]]:
    COUNTS["fallback"] += 1
    return fused_stats(b, xs, fractions, bf, parts, run)
