"""Solving for the permutations that align one model to another.

Weight matching (Ainsworth et al., git re-basin): maximise sum over tensors of
<W_ref, P(W_other)> by coordinate descent over permutation groups. For one group, with every
other group's current permutation applied to `other`, the objective is linear in the group's
permutation: cost[i, j] = sum over members of <unit i of W_ref, unit j of W_other>, a batched
matmul per member (on GPU when present); the best permutation is a linear assignment (scipy
`linear_sum_assignment(maximize=True)`). Groups are visited in a seeded random order each sweep;
a group's permutation is replaced only when it strictly improves its objective; the descent stops
after a sweep with no improvement, or after `max_sweeps` sweeps.

`method = "ot"` solves each group's step as an exact optimal-transport problem between uniform
measures over the units (POT's `ot.emd`, cost = max(similarity) - similarity) and takes the hard
permutation from the transport plan (a linear assignment on the plan, which is the plan's own
permutation when `emd` returns a vertex of the Birkhoff polytope, as the network simplex does).
With `reg > 0` the converged hard solution is then softened: groups without head blocks get a
Sinkhorn transport map (`soft.py`), stored in `AlignResult.maps` and applied on load.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

if TYPE_CHECKING:  # imported where used: checking a recipe imports none of them
    import numpy as np
    import torch

from mergelang.sources.align.spec import AlignSpec, Group, permute_tensor, units_view

METHODS = ("weight_matching", "ot")
MAX_SWEEPS = 100


@dataclass
class AlignResult:
    perms: dict[str, torch.Tensor]
    sweeps: int
    converged: bool
    objective: list[float] = field(default_factory=list)  # after each sweep
    seconds: float = 0.0
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # soft OT maps (row-stochastic, n x n)


def assign(cost: np.ndarray, method: str = "weight_matching") -> np.ndarray:
    """The permutation p (new unit i = old unit p[i]) maximising sum_i cost[i, p[i]]."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    if method == "ot":
        import ot

        n = cost.shape[0]
        a = np.full(n, 1.0 / n)
        plan = ot.emd(a, a, cost.max() - cost)
        cost = plan
    _, cols = linear_sum_assignment(cost, maximize=True)
    return cols


def group_cost(g: Group, ref: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
               members_of: Mapping, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """cost[i, j]: similarity of unit i of `ref` and unit j of `other` (other groups applied)."""
    n = g.size
    cost = None
    permuted: dict[str, torch.Tensor] = {}
    for m in g.members:
        o = permuted.get(m.tensor)
        if o is None:
            o = permuted[m.tensor] = permute_tensor(other[m.tensor], members_of[m.tensor], perms, skip=g.name)
        c = units_view(ref[m.tensor], m, n) @ units_view(o, m, n).T
        cost = c.double() if cost is None else cost + c.double()
    assert cost is not None
    return cost


def descend(spec: AlignSpec, cost_of: Callable[[Group, dict[str, torch.Tensor]], torch.Tensor], seed: int,
            method: str, max_sweeps: int, dev: torch.device) -> tuple[dict[str, torch.Tensor], int, bool, list[float]]:
    """Coordinate descent over the groups (seeded random order each sweep): each group's
    permutation is the assignment maximising its cost (`cost_of(group, perms)`, the other
    groups' permutations applied), replaced only when it strictly improves; stops after a sweep
    without improvement or `max_sweeps`. (perms, sweeps, converged, objective per sweep)."""
    import torch

    perms = {g.name: torch.arange(g.size, device=dev) for g in spec.groups}
    rng = random.Random(seed)
    order = list(range(len(spec.groups)))
    history: list[float] = []
    converged = False
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        rng.shuffle(order)
        improved = False
        total = 0.0
        for gi in order:
            g = spec.groups[gi]
            cost = cost_of(g, perms)
            rows = torch.arange(g.size, device=dev)
            old = cost[rows, perms[g.name]].sum().item()
            new_p = torch.as_tensor(assign(cost.cpu().numpy(), method), device=dev, dtype=torch.long)
            new = cost[rows, new_p].sum().item()
            if new > old + 1e-9 * max(1.0, abs(old)):
                perms[g.name] = new_p
                improved = True
                total += new
            else:
                total += old
        history.append(total)
        if not improved:
            converged = True
            break
    return perms, sweeps, converged, history


def weight_matching(ref: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], spec: AlignSpec,
                    seed: int = 0, method: str = "weight_matching", max_sweeps: int = MAX_SWEEPS,
                    device: str | torch.device | None = None, reg: float = 0.0) -> AlignResult:
    """Permutations of `other`'s groups that best match `ref` (tensors: float, same shapes);
    with `method="ot"` and `reg > 0` also soft transport maps for the groups without head blocks."""
    import torch

    if method not in METHODS:
        raise ValueError(f"unknown alignment method {method!r}; methods: {', '.join(METHODS)}")
    if reg < 0 or (reg > 0 and method != "ot"):
        raise ValueError("`reg` must be >= 0, and > 0 only with method='ot'")
    t0 = time.perf_counter()
    dev = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = spec.tensors()
    R = {k: ref[k].to(dev, torch.float32) for k in names}
    O = {k: other[k].to(dev, torch.float32) for k in names}
    members_of = spec.by_tensor()
    perms, sweeps, converged, history = descend(
        spec, lambda g, perms: group_cost(g, R, O, members_of, perms), seed, method, max_sweeps, dev)
    maps: dict[str, torch.Tensor] = {}
    if reg > 0:
        from mergelang.sources.align.soft import is_soft_capable, sinkhorn_map

        for g in spec.groups:  # each soft map from the converged hard solution of the other groups
            if is_soft_capable(g):
                sim = group_cost(g, R, O, members_of, perms).cpu().numpy()
                maps[g.name] = torch.as_tensor(sinkhorn_map(sim, reg), dtype=torch.float64)
    return AlignResult({k: v.cpu() for k, v in perms.items()}, sweeps, converged, history,
                       time.perf_counter() - t0, maps)
