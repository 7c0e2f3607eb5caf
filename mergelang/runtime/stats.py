"""Running the statistics passes (planned by passes/stats.py): the collector that reduces their
feeds, and the radix select it and the order kernels (runtime/kernels/order.py) share.

A statistics pass streams the inputs like an ordinary merge; its sink is a `StatCollector`.
Each feed (one tensor's contribution to one statistic) becomes a `StatPartial` — a float64 sum
per model, kept float32 entries, or a radix-select histogram — and `StatCollector.merge` adds
partials into the collector. A local run merges each feed as it arrives (in plan order); a Ray
run merges the partials its workers return, the sums and entries in plan order too, so both
compute the same bits. `run_stat_passes` runs every pass of a plan and fills its values in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

import torch

from mergelang.passes import stats as plan_stats
from mergelang.passes.stats import StatSpec, fill

if TYPE_CHECKING:
    from mergelang.ir.graph import Node


def unfilled(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    """The kernel of MODEL_STAT / STAT_VALUE nodes left in a plan (registered by
    runtime/executor.py): an error if ever run."""
    raise RuntimeError(f"internal: model-wide statistic {node.attrs['key']} was not computed")


@dataclass
class StatPartial:
    """What some feeds add to a collector: float64 sums, kept entries (in feed order) and
    radix-select histograms (exact integers), by statistic key."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    hist: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, other: "StatPartial", skip: Any = ()) -> None:
        """`other` added to this (keys in `skip` left out): sums and histograms added, entries
        appended."""
        for k, v in other.sums.items():
            if k not in skip:
                self.sums[k] = v if k not in self.sums else self.sums[k] + v
        for k, parts in other.parts.items():
            if k not in skip:
                self.parts.setdefault(k, []).extend(parts)
        for k, h in other.hist.items():
            if k not in skip:
                self.hist[k] = h if k not in self.hist else self.hist[k] + h


class StatCollector:
    """The sink of a statistics pass: reduces the feeds of each statistic of that pass.

    `model_topk_value` is exact either way: small statistics keep their entries (float32) and
    take `torch.kthvalue`; above `BUFFER_LIMIT` bytes (passes/stats.py) a radix select over the
    entries' order-preserving 32-bit keys runs instead — round 1 counts the high 16 bits per
    model, round 2 the low 16 bits of the entries in the chosen bucket — with two 65536-bin
    histograms per model, at the cost of streaming the pass twice."""

    def __init__(self, specs: tuple[StatSpec, ...], limit: int | None = None):
        self.specs = {s.key: s for s in specs}
        cap = plan_stats.BUFFER_LIMIT
        self.limit = cap if limit is None else min(limit, cap)
        self.acc = StatPartial()
        self.bucket: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (high bits, rank left)
        self.done: dict[str, Any] = {}

    def __call__(self, name: str, t: torch.Tensor) -> None:
        self.merge(self.partial(name, t))

    def merge(self, partial: StatPartial) -> None:
        """Add `partial` (one feed, or a worker's unit: see the module's docstring); statistics
        already computed are left out."""
        self.acc.add(partial, self.done)

    def partial(self, name: str, t: torch.Tensor) -> StatPartial:
        """What feed `name` (tensor `t`) adds: nothing for a statistic already computed."""
        spec = self.specs[name.split("\t", 1)[0]]
        out = StatPartial()
        if spec.key in self.done:
            return out
        flat = t.reshape(spec.models or 1, -1)
        if spec.kind == "sum":
            out.sums[spec.key] = flat.to(torch.float64).sum(dim=1)
        elif self.keeps(spec):
            out.parts[spec.key] = [flat.to(torch.float32).cpu()]
        else:
            keys = sort_keys(flat.to(torch.float32).cpu())
            if spec.key in self.bucket:  # round 2: low bits of the entries in the chosen bucket
                high, _ = self.bucket[spec.key]
                sel = (keys >> 16) == high.unsqueeze(1)
                idx = torch.where(sel, keys & 0xFFFF, torch.full_like(keys, 1 << 16))
            else:
                idx = keys >> 16
            out.hist[spec.key] = bincount_rows(idx, (1 << 16) + 1)[:, : 1 << 16]
        return out

    def keeps(self, spec: StatSpec) -> bool:
        """Whether the entries are kept (else: radix select)."""
        return (spec.models or 1) * spec.numel * 4 <= self.limit

    def finish(self) -> bool:
        """Compute what this round allows; True when another round over the pass is needed."""
        acc = self.acc
        for key, total in acc.sums.items():
            self.done[key] = as_value(total, self.specs[key])
        for key, parts in acc.parts.items():
            x = torch.cat(parts, dim=1)
            parts.clear()
            if x.shape[1] == 0:  # no entries routed: no tensor uses the threshold
                self.done[key] = as_value(torch.zeros(x.shape[0]), self.specs[key])
                continue
            kk = kth_index(x.shape[1], self.specs[key])
            self.done[key] = as_value(torch.kthvalue(x, kk, dim=1).values, self.specs[key])
        again = False
        for key, h in acc.hist.items():
            spec = self.specs[key]
            if spec.numel == 0:  # no entries routed: no tensor uses the threshold
                self.done[key] = as_value(torch.zeros(h.shape[0]), spec)
            elif key not in self.bucket:
                kk = torch.full((h.shape[0],), kth_index(spec.numel, spec), dtype=torch.int64,
                                device=h.device)
                self.bucket[key] = pick(h, kk)
                again = True
            else:
                high, left = self.bucket[key]
                low, _ = pick(h, left)
                self.done[key] = as_value(from_sort_keys((high << 16) | low), spec)
        self.acc = StatPartial()
        return again

    @property
    def values(self) -> dict[str, Any]:
        return self.done


def kth_index(n: int, spec: StatSpec) -> int:
    """1-based rank of the threshold among n entries (ties-merging's topk_values_mask)."""
    if spec.kind == "quantile_value":
        return min(max(int(n * spec.fraction) + spec.offset, 0), n - 1) + 1
    return max(n - int(n * spec.fraction), 1)


def bincount_rows(idx: torch.Tensor, bins: int) -> torch.Tensor:
    rows = idx.shape[0]
    offs = torch.arange(rows, dtype=torch.int64, device=idx.device).unsqueeze(1) * bins
    return torch.bincount((idx + offs).reshape(-1), minlength=rows * bins).reshape(rows, bins)


def pick(h: torch.Tensor, kk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the bin holding the kk-th smallest entry (1-based) and its rank within it."""
    cum = h.cumsum(dim=1)
    b = torch.searchsorted(cum, kk.unsqueeze(1)).squeeze(1)
    below = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0).unsqueeze(1)).squeeze(1),
                        torch.zeros_like(b))
    return b, kk - below


def sort_keys(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys in [0, 2^32) with the same order (-0.0 just below +0.0)."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= 1 << 31, 0xFFFFFFFF - bits, bits + (1 << 31))


def from_sort_keys(k: torch.Tensor) -> torch.Tensor:
    bits = torch.where(k >= 1 << 31, k - (1 << 31), 0xFFFFFFFF - k)
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)
    return bits.to(torch.int32).view(torch.float32)


def as_value(t: torch.Tensor, spec: StatSpec) -> Any:
    vals = [float(v) for v in t.tolist()]
    return tuple(vals) if spec.models is not None else vals[0]


def stat_limit(pass_plan: Any, memory_budget: int | None) -> int | None:
    """Bytes a statistics pass may keep entries in: the budget's headroom above its peak."""
    return None if memory_budget is None else max(0, memory_budget - pass_plan.peak_bytes)


def run_stat_passes(plan: Any, run: Callable[[Any, Callable[[str, torch.Tensor], None]], None],
                    memory_budget: int | None = None) -> Any:
    """Run `plan`'s statistics passes with `run(pass_plan, sink)`; the apply plan, filled. With
    a memory budget, entries are kept only within the budget's headroom above the pass's peak."""
    values: dict[str, Any] = {}
    for pp in plan.prepasses:
        col = StatCollector(plan.stats, stat_limit(pp, memory_budget))
        filled = fill(pp, values)
        run(filled, col)
        while col.finish():
            run(filled, col)
        values.update(col.values)
    return fill(replace(plan, prepasses=(), stats=()), values)
