"""Faster CPU kernels that give bit-identical results to the plain torch kernels in `table.py`.

Measured on the 2-core development VM, the plain kernels spent most of a `ties` merge in three
places, each replaced here by an exact equivalent (float32 and bool values on the CPU only; any
other case, or a small tensor, takes the plain kernel):

- `where(c, x, y)`: torch's CPU `where` branches per element, so a random mask costs ~4 ns per
  element. Here it is a bit select on the int32 views, `y ^ ((x ^ y) & -c)`, which copies the
  chosen operand's bits exactly (signed zeros and NaN payloads included).
- comparisons (`eq`, `ne`, `lt`, `le`, `gt`, `ge`): numpy's SIMD comparisons (IEEE semantics,
  the same as torch's), about 5x faster than torch's here.
- `topk_mask` over a whole tensor: the k-th largest value by `np.partition` (one per model, in
  two threads: numpy releases the GIL), then the mask `x >= kth` by a numpy comparison into one
  preallocated stacked buffer. When values tie at the threshold, the surplus ties are the last
  ones in index order (ties: lowest index first, as in `topk_mask_rows`). NaN anywhere: the plain
  kernel.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from mergelang.ir.ops import Op
from mergelang.ir.types import broadcast_all
from mergelang.runtime.workers import parallel_map

#: `MERGELANG_FAST=0` turns these kernels and the buffer reuse of `runtime/buffers.py` off (for checks)
ENABLED = os.environ.get("MERGELANG_FAST", "1") != "0"

#: below this many elements the plain torch kernels are used (call overhead dominates)
MIN_ELEMENTS = 1 << 16

def _cpu(*ts: torch.Tensor) -> bool:
    """The fast paths apply: CPU tensors that autograd does not track (`learn` differentiates
    through the plain torch kernels)."""
    return ENABLED and all(t.device.type == "cpu" and not t.requires_grad for t in ts)


def where(c: torch.Tensor, x: torch.Tensor, y: torch.Tensor, into: int | None = None) -> torch.Tensor:
    """`torch.where(c, x, y)`, bit for bit, as an integer bit select. `into` (1: x, 2: y) writes
    the result into that operand, which must already have the result's shape."""
    shape = broadcast_all(c.shape, x.shape, y.shape)
    numel = 1
    for d in shape:
        numel *= d
    if (numel < MIN_ELEMENTS or c.dtype != torch.bool or x.dtype != torch.float32
            or y.dtype != torch.float32 or not _cpu(c, x, y)):
        out = torch.where(c, x, y)
        return (x, y)[into - 1].copy_(out) if into else out
    m = c.view(torch.int8).to(torch.int32).neg_()  # all ones where c, else zero
    xi, yi = x.view(torch.int32), y.view(torch.int32)
    if into == 1:  # x = y ^ ((x ^ y) & m)
        if not (y.dim() == 0 and int(yi) == 0):
            xi.bitwise_xor_(yi).bitwise_and_(m).bitwise_xor_(yi)
        else:
            xi.bitwise_and_(m)
        return x
    if into == 2:  # y = x ^ ((y ^ x) & ~m)
        yi.bitwise_xor_(xi).bitwise_and_(m.bitwise_not_()).bitwise_xor_(xi)
        return y
    if y.dim() == 0 and int(yi) == 0:  # where(c, x, +0.0): the common trim/select case
        out = torch.bitwise_and(xi, m)
    else:
        out = torch.bitwise_and(torch.bitwise_xor(xi, yi), m).bitwise_xor_(yi)
    if tuple(out.shape) != tuple(shape):  # only c broadcast against x, y or the other way
        out = out.expand(shape).contiguous()
    return out.view(torch.float32)


_NP_CMP = {Op.EQ: np.equal, Op.NE: np.not_equal, Op.LT: np.less, Op.LE: np.less_equal,
           Op.GT: np.greater, Op.GE: np.greater_equal}


def compare(op: Op, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """A float32 comparison through numpy, or None when the plain kernel should run."""
    if (a.dtype != torch.float32 or b.dtype != torch.float32 or not _cpu(a, b)
            or max(a.numel(), b.numel()) < MIN_ELEMENTS):
        return None
    return torch.from_numpy(np.asarray(_NP_CMP[op](a.numpy(), b.numpy())))


def _kth_and_nan(flat: np.ndarray, k: int) -> tuple[float, bool]:
    """(k-th largest value, whether `flat` holds a NaN). np.partition sorts NaN last, so a NaN
    anywhere lands at or after position n - k."""
    n = flat.shape[0]
    part = np.partition(flat, n - k)
    return part[n - k], bool(np.isnan(part[n - k:].max()))


def _per_model(fn, *columns: list) -> list:
    """`fn` over the models' rows of `columns`: in parallel for several large rows (numpy and the
    numba kernels release the GIL; the run's worker threads, workers.py), else in this thread."""
    rows = columns[0]
    if len(rows) > 1 and rows[0].shape[0] >= MIN_ELEMENTS:
        return parallel_map(fn, *columns, threads=2)
    return [fn(*row) for row in zip(*columns)]


def _radix(absolute: bool):
    """The numba radix-select kernel over a float32 row (`kernels_select.select_source` with the
    row itself as the program), or None without numba."""
    try:
        from mergelang.runtime.kernels.numba_codegen import module
        from mergelang.runtime.kernels.numba_topk import select_source

        return module(select_source((), ("elem",), ("float32",), 0, absolute)).KERNELS[0]
    except Exception:  # pragma: no cover - numba is a dependency; a broken install falls back
        return None


def topk_mask_tensor(x: torch.Tensor, ks: list[int], absolute: bool = False) -> torch.Tensor | None:
    """Per model (dim 0 of `x`, shape (M, n)), True for exactly the ks[m] largest entries of
    x[m] (of |x[m]| with `absolute`), ties at the threshold: lowest index first. None when a row
    holds NaN (or k is out of the simple range): the caller runs the plain kernel."""
    m_count, n = x.shape
    if not _cpu(x) or x.dtype != torch.float32 or any(k <= 0 or k >= n for k in ks):
        return None
    xn = x.detach().contiguous().numpy()
    radix = _radix(absolute) if n >= MIN_ELEMENTS else None
    if radix is not None:  # radix selection: three streaming passes, no copy, no sort
        out = np.empty((m_count, n), dtype=np.bool_)
        ok = _per_model(lambda row, k, o: radix(k, o, n, row), list(xn), ks, list(out.view(np.uint8)))
        return torch.from_numpy(out) if all(ok) else None
    if absolute:
        xn = np.abs(xn)
    found = _per_model(_kth_and_nan, list(xn), ks)
    if any(nan for _, nan in found):
        return None
    out = np.empty((m_count, n), dtype=np.bool_)
    for i, ((kth, _), k) in enumerate(zip(found, ks)):
        np.greater_equal(xn[i], kth, out=out[i])
        surplus = int(np.count_nonzero(out[i])) - k
        if surplus > 0:  # drop the last `surplus` entries equal to the threshold
            tied = np.flatnonzero(xn[i] == kth)
            out[i][tied[len(tied) - surplus:]] = False
    return torch.from_numpy(out)
