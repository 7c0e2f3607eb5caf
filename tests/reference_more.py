"""Independent plain-torch references for the stdlib methods beyond the first five.

Written from the formulas in METHODS.md (and mergekit's / FusionBench's published code for the
details METHODS.md defers to), not from mergelang code. Computed in float64, returned as float32.
Task vectors are a float32 subtraction first (as in reference.py) so that masks see the same
values as mergelang. Random sparsifiers take their keep-masks as an argument: the masks come from
the stream under test and are checked statistically on their own.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).to(torch.float64)


def _out(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def task_vectors(base, models):
    b32 = base.detach().to(torch.float32)
    return [_f64(m.detach().to(torch.float32) - b32) for m in models]


def gta_mix(base, taus, weights, consensus, normalize, lam):
    """mergekit's generalized task arithmetic after sparsification (taus already sparsified)."""
    ws = [float(w) for w in weights]
    weighted = [w * t for w, t in zip(ws, taus)]
    if consensus:
        elected = torch.where(sum(weighted) >= 0, 1.0, -1.0).to(torch.float64)
        masks = [torch.sign(wt) == elected for wt in weighted]
        mixed = sum(torch.where(m, wt, 0.0) for m, wt in zip(masks, weighted))
        div = sum(w * m.to(torch.float64) for w, m in zip(ws, masks))
        div = torch.where(div == 0, 1.0, div)
    else:
        mixed = sum(weighted)
        s = math.fsum(ws)
        div = torch.full_like(mixed, 1.0 if abs(s) < 1e-8 else s)
    if normalize:
        mixed = mixed / div
    return _out(_f64(base) + lam * mixed)


# ---------------------------------------------------------------- sparsifiers
def rescale(tau, keep, p, how):
    kept = torch.where(keep, tau, 0.0)
    if how is True:
        return torch.where(keep, tau / p, 0.0)
    if how == "l1":
        before, after = tau.abs().sum(), kept.abs().sum()
        if before < 1e-7 or after < 1e-7:
            return kept
        return kept * (before / after)
    return kept


def band_keep(tau, density, gamma):
    """Breadcrumbs: the band of descending-magnitude positions [n_top, n_top + k); ties by index."""
    n = tau.numel()
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    k = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - k - n_top
    if n_bot < 0:
        n_top += n_bot
    order = sorted(range(n), key=lambda i: (-float(tau.flatten()[i].abs()), i))
    keep = torch.zeros(n, dtype=torch.bool)
    for i in order[n_top:n_top + k]:
        keep[i] = True
    return keep.reshape(tau.shape)


def della_probs(tau, density, epsilon):
    """Keep probabilities of DELLA's MagPrune: per row, ascending magnitude rank normalised."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(-1, tau.shape[-1])
    n = rows.shape[-1]
    p = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        order = sorted(range(n), key=lambda i: (float(rows[r, i].abs()), i))
        for rank, i in enumerate(order):
            p[r, i] = (density - epsilon) + 2 * epsilon * (rank / (n - 1) if n > 1 else 0.0)
    return p.reshape(tau.shape)


# ---------------------------------------------------------------- other methods
def magmax(base, models, lam=1.0):
    taus = task_vectors(base, models)
    best = taus[0]
    for t in taus[1:]:
        best = torch.where(t.abs() >= best.abs(), t, best)  # later model wins ties
    return _out(_f64(base) + lam * best)


def model_stock(base, models, filter_wise=False):
    b = _f64(base)
    ws = [_f64(m) for m in models]
    shape = b.shape
    if not filter_wise:
        b, ws = b.reshape(-1), [w.reshape(-1) for w in ws]
    taus = [w - b for w in ws]
    cos = []
    for i in range(len(taus)):
        for j in range(i + 1, len(taus)):
            prod = taus[i].norm(dim=-1) * taus[j].norm(dim=-1)
            c = (taus[i] * taus[j]).sum(dim=-1) / prod.clamp(min=1e-6)
            cos.append(c.clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    avg = sum(ws) / n
    return _out((t * avg + (1 - t) * b).reshape(shape))


def nearswap(base, other, t):
    a, b = _f64(base), _f64(other)
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return _out(w * b + (1 - w) * a)


def weights_or_ones(weights: Sequence[float] | None, n: int) -> list[float]:
    return [1.0] * n if weights is None else [float(w) for w in weights]
