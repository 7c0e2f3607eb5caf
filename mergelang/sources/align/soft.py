"""Soft alignment (OT fusion, Singh & Jaggi 2020): transport maps instead of permutations.

`method = "ot", reg > 0`: after the hard descent has converged, every group whose members move
single positions (no whole-head blocks) gets an entropic optimal-transport plan between uniform
measures over its units, computed by POT's Sinkhorn (`ot.sinkhorn`; log-domain below reg 2e-3)
from the group's similarity (the other groups' hard permutations applied), with cost
`M = (max(sim) - sim) / (max(sim) - min(sim))` in [0, 1] so that `reg` is relative to the
cost's range. The plan's rows are normalised to sum to 1, giving a row-stochastic map `T`
(n x n): new unit `i` of the aligned model is `sum_j T[i, j] * old unit j`, applied on load as a
matrix product along each member's axis (`W' = T W` for rows, `W' = W T^T` for columns). A
permutation is the special case `T[i, p[i]] = 1`. As `reg -> 0` the plan tends to the hard one;
`reg = 0` *is* the hard permutation. Groups that move whole heads (block > 1) stay hard.

A soft map is not a symmetry of the model: the aligned model alone no longer computes the same
function (it is a blend of units); it is meant to be averaged with the reference.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from mergelang.sources.align.groups import Group, Member


def is_soft_capable(g: Group) -> bool:
    """Whole-head groups (a member with block > 1) stay hard permutations."""
    return all(m.block == 1 for m in g.members)


def sinkhorn_map(sim: np.ndarray, reg: float) -> np.ndarray:
    """Row-stochastic transport map from a similarity matrix (rows: ref units, cols: other units)."""
    import ot

    n = sim.shape[0]
    span = float(sim.max() - sim.min())
    M = (sim.max() - sim) / (span if span > 0 else 1.0)
    a = np.full(n, 1.0 / n)
    # M is in [0, 1]: exp(-M / reg) stays a normal float64 down to reg ~ 1/700, so the plain
    # (fast, matrix-vector) Sinkhorn is safe above 2e-3; below, the log-domain one
    method = "sinkhorn" if reg >= 2e-3 else "sinkhorn_log"
    plan = ot.sinkhorn(a, a, M, reg, method=method, numItermax=10000, stopThr=1e-9)
    plan = np.asarray(plan, dtype=np.float64)
    return plan / plan.sum(axis=1, keepdims=True)


def mix_member(t: torch.Tensor, m: Member, n: int, T: torch.Tensor) -> torch.Tensor:
    """Apply the map `T` (n x n) to the member's units: new unit i = sum_j T[i, j] old unit j."""
    x = t.movedim(m.axis, 0)
    end = m.start + m.repeat * n * m.block
    seg = x[m.start:end]
    rest = seg.shape[1:]
    seg = seg.reshape(m.repeat, n, m.block, -1).to(T.dtype)
    seg = torch.einsum("ij,rjbk->ribk", T, seg).reshape(-1, *rest).to(t.dtype)
    return torch.cat([x[: m.start], seg, x[end:]], 0).movedim(0, m.axis)


def transform_tensor(t: torch.Tensor, members: Sequence[tuple[Group, Member]],
                     perms: Mapping[str, torch.Tensor], maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Permute `t` by the hard groups and mix it by the soft ones (they act on commuting layouts)."""
    from mergelang.sources.align.groups import permute_tensor

    hard = [(g, m) for g, m in members if g.name not in maps]
    t = permute_tensor(t, hard, perms)
    for g, m in members:
        T = maps.get(g.name)
        if T is not None:
            t = mix_member(t, m, g.size, T.to(t.device))
    return t
