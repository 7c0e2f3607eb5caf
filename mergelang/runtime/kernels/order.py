"""Order statistics in plain torch (any device): the top-k mask of rows (ties: lowest index
first), the k-th largest value, and the whole TOPK_MASK computation without the CPU fast paths.
The table's TOPK_MASK kernel and the numba selection's fallback both end here."""

from __future__ import annotations

import torch


def topk_mask_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """True for exactly the k largest entries of every row (last dim); ties: lowest index first."""
    n = x.shape[-1]
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    kth = kth_largest(x, k)
    mask = x >= kth
    if bool((mask.sum(dim=-1) == k).all()):  # no surplus ties at the threshold (the usual case)
        return mask
    above = x > kth
    need = k - above.sum(dim=-1, keepdim=True)
    at = x == kth
    if x.dim() == 2 and x.shape[0] == 1:  # one row (a whole tensor): index the first ties
        first = torch.nonzero(at.reshape(-1)).reshape(-1)[: int(need)]
        above.reshape(-1)[first] = True
        return above
    return above | (at & (torch.cumsum(at, dim=-1) <= need))


def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of each row (keepdim), 1 <= k <= n: a selection, not a sort.
    On the CPU numpy's introselect (`np.partition`) is ~10x faster than `torch.kthvalue`
    (measured: 16M float32, 0.10 s vs 1.03 s); both pick the same element, so the value is
    identical. Elsewhere (CUDA) `torch.kthvalue`, a device-wide sort for a few long rows, or
    the radix select from `RADIX_MIN_ROW` on (`select_method`). NaN rows take the torch path."""
    n = x.shape[-1]
    how = select_method(x, k)
    if how == "partition":
        import numpy as np

        part = np.partition(x.detach().numpy(), n - k, axis=-1)[..., n - k:n - k + 1]
        return torch.from_numpy(np.ascontiguousarray(part))
    if how == "radix":
        return kth_largest_radix(x, k)
    if how == "sort":
        # CUDA's kthvalue selects each row in one thread block: a whole 16M-entry tensor (one
        # row) runs on one SM. A device-wide radix sort (CUB) uses the whole GPU; the k-th
        # largest is the same element, so the value is identical.
        return torch.sort(x, dim=-1).values[..., n - k:n - k + 1]
    return torch.kthvalue(x, n - k + 1, dim=-1, keepdim=True).values


def select_method(x: torch.Tensor, k: int) -> str:
    """How `kth_largest` selects on `x`'s device: "partition" (CPU numpy), "radix" (rows at
    least RADIX_MIN_ROW[device] long, no NaN), "sort" (a few long rows off the CPU), "kthvalue"."""
    n, dev = x.shape[-1], x.device.type
    if dev == "cpu" and x.dtype == torch.float32 and not bool(torch.isnan(x).any()):
        return "partition"
    radix = RADIX_MIN_ROW.get(dev)
    if radix is not None and n >= radix and x.dtype == torch.float32 and not bool(torch.isnan(x).any()):
        return "radix"
    if dev != "cpu" and x.numel() // max(n, 1) <= LONG_ROWS and n >= LONG_ROW:
        return "sort"
    return "kthvalue"


#: per device type, the row length from which the radix select (`kth_largest_radix`) is used;
#: None: never. CPU: numpy's introselect is faster at every size measured
#: (benchmarks/bench_select.py, docs/design.md). CUDA: to be set from the device run of
#: benchmarks/bench_select.py (benchmarks/gpu_check.sh); until then the sort / kthvalue rule.
RADIX_MIN_ROW: dict[str, int | None] = {"cpu": None, "cuda": None}


#: on a GPU, rows at least LONG_ROW long, LONG_ROWS of them at most, are selected by a sort
LONG_ROW = 1 << 16
LONG_ROWS = 64


def kth_largest_radix(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of each row (keepdim) by a two-round radix select over the
    entries' order-preserving 32-bit keys — the high 16 bits, then the low 16 bits within the
    chosen bucket, each a 65536-bin histogram per row (torch.bincount) — without sorting; the
    same selection the model-wide statistics use (runtime/stats.py). Rows without NaN; -0.0
    ranks just below +0.0 (both compare equal, so a threshold mask is the same)."""
    from mergelang.runtime.stats import bincount_rows, from_sort_keys, pick, sort_keys

    rows, n = x.reshape(-1, x.shape[-1]).shape
    keys = sort_keys(x.reshape(rows, n))
    kk = torch.full((rows,), n - k + 1, dtype=torch.int64, device=x.device)
    high, left = pick(bincount_rows(keys >> 16, 1 << 16), kk)
    sel = (keys >> 16) == high.unsqueeze(1)
    low_idx = torch.where(sel, keys & 0xFFFF, torch.full_like(keys, 1 << 16))
    low, _ = pick(bincount_rows(low_idx, (1 << 16) + 1)[:, : 1 << 16], left)
    return from_sort_keys((high << 16) | low).reshape(*x.shape[:-1], 1)


def topk_mask_plain(x: torch.Tensor, dens, over: str, absolute: bool, stacked: bool) -> torch.Tensor:
    """TOPK_MASK of `x` (a stack when `stacked`), density per model, over "tensor" or "rows"."""
    if absolute:
        x = torch.abs(x)
    models = x.unbind(0) if stacked else [x]
    out = []
    for xm, d in zip(models, dens):
        if over == "tensor":
            flat = xm.reshape(1, -1)
            out.append(topk_mask_rows(flat, int(d * flat.shape[-1])).reshape(xm.shape))
        else:
            out.append(topk_mask_rows(xm, int(d * xm.shape[-1])))
    return torch.stack(out) if stacked else out[0]
