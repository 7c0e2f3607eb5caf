"""Fused top-k selections: `topk_mask(value, density, over = "tensor")` of a fused program's
value (fuse.py's rematerialisation, attr `select`) without ever storing the value: each pass
recomputes it from the inputs (e.g. a task vector `a - base` from the two bfloat16 tensors).

Two generated forms, both exact (ties at the threshold: lowest index first, as the plain
TOPK_MASK kernel keeps them):

- **split** (`split_source`, used by `run_select` when there are more threads than models):
  the element range is cut into one part per thread, each part computing every model's value
  in one loop (an input shared by the models, like the base, is read once per pass), so one
  model, or a few on many cores, still use every thread.
  Pass 1 (`hist`) histograms the order keys' high 16 bits per part; the parts' histograms are
  added, giving each model's threshold bucket. Pass 2 (`listing`) writes the mask of the keys
  above that bucket and lists the bucket's entries (index, low 16 bits) into each part's slots
  of one shared list, in index order; the low halves' histogram then settles the threshold and
  `kernels_fused_rt.settle` marks the kept entries of the list.
- **per model** (`select_source`, `_SELECT`): one function per model doing every pass over the
  whole range, a thread per model; used when the models are at least as many as the threads
  (measured on 2 cores with 2 models: 1.63 ns per element against the split form's 1.84 — the
  split form uses ~25% less CPU, single-threaded, but scaled worse there), for a model whose
  threshold bucket holds more than ~1/16 of its entries (the list would cost more memory than
  the mask), and by `kernels_fast.topk_mask_tensor`.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from mergelang.runtime.kernels import numba_codegen as kernels_fused
from mergelang.runtime.kernels.numba_codegen import (HEADER, JIT, flat_index, indent, kernel_inputs, needed, offsets, program_lines,
                            module, run)
from mergelang.runtime.workers import parallel_map


def _list_cap(n: int) -> int:
    """The most entries of a threshold bucket the split form lists (else: the per-model form)."""
    return (n >> 4) + 4096


#: radix selection of the k largest order keys of x (`order_key`: x, or |x|), ties at the
#: threshold: lowest index first; False (out undefined) on a NaN, or if the inputs changed under
#: the selection. Pass 1 histograms the keys' high 16 bits: the threshold's bucket `top`. Pass 2
#: writes the mask of the keys above that bucket and lists the bucket's entries (index, low 16
#: bits, histogrammed), and the threshold's low half is settled over that list alone. A bucket
#: holding more than ~1/16 of the entries (the list's memory) takes three passes instead: one
#: histogramming the bucket's low halves, one writing the mask.
#: Each pass works in blocks of BLOCK elements: the keys are computed into a small buffer by a
#: loop LLVM vectorises, then histogrammed or listed (scatter: scalar, on the bucket's entries).
_SELECT = """{jit}def select{m}(k, out, n, {params}):
{prelude}    hist = np.zeros(65536, np.int64)
    keys = np.empty(BLOCK, np.uint32)
    nan = False
    for b0 in range(U64_0, un, BLOCK):
        nb = min(BLOCK, un - b0)
        for j in range(nb):
            i = b0 + j
{x}            keys[j] = order_key(x, {absolute})
            nan |= x != x
        for j in range(nb):
            hist[keys[j] >> np.uint32(16)] += 1
    if nan:
        return False
    above = 0
    hi = 65535
    while above + hist[hi] < k:
        above += hist[hi]
        hi -= 1
    count = hist[hi]
    hist[:] = 0
    top = np.uint32(hi)
    if count <= (n >> 4) + 4096:
        cidx = np.empty(count, np.uint64)
        clow = np.empty(count, np.uint16)
        c = 0
        for b0 in range(U64_0, un, BLOCK):
            nb = min(BLOCK, un - b0)
            for j in range(nb):
                i = b0 + j
{x4}                key = order_key(x, {absolute})
                keys[j] = key
                out[i] = sel((key >> np.uint32(16)) > top, U1, U0)
            for j in range(nb):
                key = keys[j]
                if (key >> np.uint32(16)) == top and c < count:
                    hist[key & np.uint32(0xFFFF)] += 1
                    cidx[c] = b0 + j
                    clow[c] = np.uint16(key & np.uint32(0xFFFF))
                    c += 1
        if c != count:
            return False
        lo = 65535
        while above + hist[lo] < k:
            above += hist[lo]
            lo -= 1
        low = np.uint16(lo)
        ties = k - above  # entries equal to the threshold that are kept, first ones first
        for j in range(count):
            v = clow[j]
            if v > low or (v == low and ties > 0):
                out[cidx[j]] = U1
                ties -= sel(v == low, 1, 0)
        return True
    for b0 in range(U64_0, un, BLOCK):
        nb = min(BLOCK, un - b0)
        for j in range(nb):
            i = b0 + j
{x}            keys[j] = order_key(x, {absolute})
        for j in range(nb):
            if (keys[j] >> np.uint32(16)) == top:
                hist[keys[j] & np.uint32(0xFFFF)] += 1
    lo = 65535
    while above + hist[lo] < k:
        above += hist[lo]
        lo -= 1
    kth = (top << np.uint32(16)) | np.uint32(lo)
    ties = k - above  # entries equal to the threshold that are kept, first ones first
    for b0 in range(U64_0, un, BLOCK):
        nb = min(BLOCK, un - b0)
        # while a block's worth of ties remain to be kept, every tied entry of the block is kept
        # (key > kth - 1; kth > 0: only a NaN has key 0): only the block where they run out is
        # done entry by entry
        cut = sel(ties >= nb, kth - np.uint32(1), kth)
        for j in range(nb):
            i = b0 + j
{x}            key = order_key(x, {absolute})
            keys[j] = key
            out[i] = sel(key > cut, U1, U0)
        if ties == 0:
            continue
        tied = 0
        for j in range(nb):
            tied += sel(keys[j] == kth, 1, 0)
        if cut != kth:
            ties -= tied
            continue
        for j in range(nb):  # the block's entries at the threshold, in index order
            if keys[j] == kth:
                out[b0 + j] = sel(ties > 0, U1, U0)
                ties -= 1
    return True


"""


def select_source(body: tuple, kinds: tuple[str, ...], dtypes: tuple[str, ...], models: int,
                  absolute: bool) -> str:
    """The generated module selecting, per model m, the k largest values (|values| with
    `absolute`) of a program's float32 root, computed on the fly in each pass (never stored):
    `KERNELS[m](k, out, n, *inputs) -> bool` (`_SELECT`). An empty `body`: the root is input 0."""
    if body:
        params, prelude, lines, root = program_lines(body, kinds, dtypes, models)
    else:
        params, prelude = ["a0"], offsets(models)
        lines, root = [], [f"a0[{flat_index(m)}]" for m in range(max(models, 1))]
    funcs = []
    for m in range(len(root)):
        x = needed(lines, root[m]) + [f"x = {root[m]}"]
        funcs.append(_SELECT.format(jit=JIT, m=m, params=", ".join(params),
                                    prelude=indent(prelude, 4), x=indent(x, 12),
                                    x4=indent(x, 16), absolute=bool(absolute)))
    names = "".join(f"select{m}, " for m in range(len(root)))
    return HEADER + "".join(funcs) + f"KERNELS = ({names})\n"


def split_source(body: tuple, kinds: tuple[str, ...], dtypes: tuple[str, ...], models: int,
                 absolute: bool) -> str:
    """The generated module of the split form (module docstring) for a program over `models`
    models: `hist(lo, hi, n, hists, *inputs) -> nan` and `listing(lo, hi, n, tops, outs, cidx,
    clow, slots, ends, hists, *inputs)`, over elements lo..hi-1."""
    params, prelude, lines, root = program_lines(body, kinds, dtypes, models)
    m_all = range(len(root))
    absolute = bool(absolute)
    loop = ["for b0 in range(ulo, uhi, BLOCK):", "    nb = min(BLOCK, uhi - b0)",
            "    for j in range(nb):", "        i = b0 + j"]
    start = (["ulo = np.uint64(lo)", "uhi = np.uint64(hi)"] + prelude
             + [f"k{m} = np.empty(BLOCK, np.uint32)" for m in m_all]
             + [f"h{m} = hists[{m}]" for m in m_all])
    hist = (start + ["nan = False"] + loop
            + ["        " + line for line in lines]
            + [f"        k{m}[j] = order_key({root[m]}, {absolute})" for m in m_all]
            + [f"        nan |= {root[m]} != {root[m]}" for m in m_all])
    for m in m_all:
        hist += ["    for j in range(nb):", f"        h{m}[k{m}[j] >> np.uint32(16)] += 1"]
    hist.append("return nan")
    listing = (start + [line for m in m_all for line in (
        f"t{m} = tops[{m}]", f"mk{m} = outs[{m}]", f"ci{m} = cidx[{m}]", f"cl{m} = clow[{m}]",
        f"c{m} = slots[{m}]", f"e{m} = ends[{m}]")] + loop
        + ["        " + line for line in lines])
    for m in m_all:
        listing += [f"        key{m} = order_key({root[m]}, {absolute})", f"        k{m}[j] = key{m}",
                    f"        mk{m}[i] = sel((key{m} >> np.uint32(16)) > t{m}, U1, U0)"]
    for m in m_all:  # the bucket's entries: few, so this scalar loop's branch is predictable
        listing += ["    for j in range(nb):", f"        key = k{m}[j]",
                    f"        if (key >> np.uint32(16)) == t{m} and c{m} < e{m}:",
                    "            low = key & np.uint32(0xFFFF)", f"            h{m}[low] += 1",
                    f"            ci{m}[c{m}] = b0 + j", f"            cl{m}[c{m}] = np.uint16(low)",
                    f"            c{m} += 1"]
    listing += [f"slots[{m}] = c{m}" for m in m_all]
    ps = ", ".join(params)
    return (HEADER + JIT + f"def hist(lo, hi, n, hists, {ps}):\n" + indent(hist, 4) + "\n\n"
            + JIT + f"def listing(lo, hi, n, tops, outs, cidx, clow, slots, ends, hists, {ps}):\n"
            + indent(listing, 4))


def _bucket(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest entry of a 65536-bucket histogram, and how many
    entries lie above it."""
    cum = np.cumsum(hist[::-1])
    idx = int(np.searchsorted(cum, k))
    return 65535 - idx, (int(cum[idx - 1]) if idx else 0)


#: marks a model the split form does not list (its bucket is too large): no key's high half
#: equals it or exceeds it
_UNLISTED = np.uint32(0x10000)


def _split_select(node, arrays: list[np.ndarray], dtypes: tuple[str, ...], ks: list[int], n: int,
                  out: np.ndarray, parts: int) -> bool:
    """The split form into `out` (rows x n bytes) over `parts` parts of the range; False on a
    NaN (or inputs that changed under it): the caller takes the plain path."""
    from mergelang.runtime.kernels.numba_runtime import settle

    body, kinds, models = node.attrs["body"], node.attrs["inputs"], node.attrs["models"]
    absolute = node.attrs["select"][1]
    rows = len(ks)
    mod = module(split_source(body, kinds, dtypes, models, absolute))
    cuts = [n * p // parts for p in range(parts + 1)]
    hists = np.zeros((parts, rows, 65536), np.int64)
    nans = parallel_map(lambda p: mod.hist(cuts[p], cuts[p + 1], n, hists[p], *arrays), range(parts),
                        threads=parts)
    if any(nans):
        return False
    total = hists.sum(axis=0)
    tops = np.full(rows, _UNLISTED, np.uint32)
    above = [0] * rows
    for m, k in enumerate(ks):
        top, above[m] = _bucket(total[m], k)
        if total[m, top] <= _list_cap(n):
            tops[m] = top
    listed = [m for m in range(rows) if tops[m] != _UNLISTED]
    counts = np.zeros((parts, rows), np.int64)  # each part's entries in each listed bucket
    for m in listed:
        counts[:, m] = hists[:, m, tops[m]]
    ends = np.cumsum(counts, axis=0)
    slots = ends - counts  # each part's first slot in the shared list, per model
    width = max([int(ends[-1, m]) for m in listed], default=0)
    cidx = np.empty((rows, width), np.uint64)
    clow = np.empty((rows, width), np.uint16)
    hists[:] = 0  # now: the listed entries' low halves
    parallel_map(lambda p: mod.listing(cuts[p], cuts[p + 1], n, tops, out, cidx, clow, slots[p],
                                       ends[p], hists[p], *arrays), range(parts), threads=parts)
    if not np.array_equal(slots, ends):  # every listed entry was found again
        return False
    low = hists.sum(axis=0)
    for m in listed:
        lo, above_low = _bucket(low[m], ks[m] - above[m])
        settle(out[m], cidx[m], clow[m], int(ends[-1, m]), np.uint16(lo),
               ks[m] - above[m] - above_low)
    return _per_model_select(node, arrays, dtypes, ks, n, out, [m for m in range(rows) if m not in listed])


def _per_model_select(node, arrays: list[np.ndarray], dtypes: tuple[str, ...], ks: list[int], n: int,
                      out: np.ndarray, models: list[int]) -> bool:
    """The per-model form for these models (rows of `out`), one thread per model."""
    if not models:
        return True
    a = node.attrs
    kernels = module(select_source(a["body"], a["inputs"], dtypes, a["models"], a["select"][1])).KERNELS
    return all(parallel_map(lambda m: kernels[m](ks[m], out[m], n, *arrays), models,
                            threads=len(models)))


def run_select(node, args: list[torch.Tensor]) -> torch.Tensor:
    """`topk_mask(value, density, over = "tensor")` of a program's value without storing the
    value (fuse.py's rematerialisation): the split form when there are more threads than models
    (module docstring), else the per-model form, a thread per model. A NaN, or a k of 0 or n,
    takes the plain path: the value is computed once and handed to the TOPK_MASK kernel (same
    result as without fusion)."""
    from mergelang.runtime.kernels.order import topk_mask_plain

    density, absolute = node.attrs["select"]
    ty = node.type
    n, rows = math.prod(ty.shape), max(node.attrs["models"], 1)
    dens = density if isinstance(density, tuple) else (density,) * rows
    ks = [int(d * n) for d in dens]
    if all(0 < k < n for k in ks):
        arrays, dtypes = kernel_inputs(node.attrs["inputs"], args)
        out = np.empty((rows, n), dtype=np.bool_)
        parts = kernels_fused.threads_for(n)
        if (_split_select(node, arrays, dtypes, ks, n, out.view(np.uint8), parts) if parts > rows
                else _per_model_select(node, arrays, dtypes, ks, n, out.view(np.uint8), list(range(rows)))):
            return torch.from_numpy(out).reshape(ty.full_shape)
    plain = SimpleNamespace(attrs={**node.attrs, "select": None}, type=ty.with_(dtype="float32"))
    return topk_mask_plain(run(plain, args), dens, "tensor", bool(absolute), ty.models is not None)
