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


def sce(base, models, select_topk=1.0):
    """mergekit sce: variance top-k select, mean(tau^2) weights, sign erase, weighted mean."""
    b32 = base.detach().to(torch.float32)
    tv32 = torch.stack([m.to(torch.float32) - b32 for m in models])
    if select_topk < 1:
        # the variance in float32, like the run under test, so the same entries are selected
        var = ((tv32 - tv32.mean(0)) ** 2).mean(0)
        nonzero = int((var != 0).sum())
        k = int(nonzero * select_topk) if select_topk > 0 else 0
        order = sorted(range(var.numel()), key=lambda i: (-float(var.flatten()[i]), i))
        mask = torch.zeros(var.numel(), dtype=torch.bool)
        mask[order[:k]] = True
        tv32 = tv32 * mask.reshape(var.shape)
    tv = tv32.to(torch.float64)
    w = (tv ** 2).reshape(len(models), -1).mean(-1)
    total = w.sum()
    w = torch.full_like(w, 1 / len(models)) if abs(total) < 1e-6 else w / total
    w = w.reshape((-1,) + (1,) * (tv.dim() - 1))
    elected = torch.where(tv.sum(0) >= 0, 1.0, -1.0).to(torch.float64)
    ew = w * (torch.sign(tv) == elected)
    return _out(_f64(base) + (tv * ew).sum(0) / ew.sum(0).clamp(min=1e-6))


def consensus(base, models, k=2, lam_tall=0.4, lam=1.0):
    taus = task_vectors(base, models)
    mtl = sum(taus)
    support = sum((t.abs() > lam_tall * (mtl - t).abs()).to(torch.int64) for t in taus)
    return _out(_f64(base) + lam * torch.where(support >= k, mtl, 0.0))


def _nuslerp_core(t, v0, v1, mode):
    shape = v0.shape
    if mode == "flatten":
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif mode == "cols":
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    n0 = v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    n1 = v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = ((v0 / n0) * (v1 / n1)).sum(-1, keepdim=True)
    theta = torch.acos(cos.clamp(-1, 1))
    s = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / s
    lin = (1 - t) * v0 + t * v1
    # exactly (anti)parallel vectors have sin theta = 0; float rounding leaves ~1e-8 (float64) or
    # ~9e-8 (float32, at theta = pi) instead, so |cos| = 1 up to rounding also counts as colinear
    res = torch.where((s.abs() < 1e-8) | (1 - cos.abs() < 1e-12), lin, res)
    if mode == "cols":
        res = res.transpose(0, -1)
    return res.reshape(shape)


def nuslerp(models, weights=None, base=None, flatten=True, row_wise=False):
    w = weights_or_ones(weights, 2)
    t = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
    mode = "flatten" if flatten else ("cols" if row_wise and models[0].dim() == 2 else "rows")
    if base is None:
        return _out(_nuslerp_core(t, _f64(models[0]), _f64(models[1]), mode))
    taus = task_vectors(base, models)
    return _out(_f64(base) + _nuslerp_core(t, taus[0], taus[1], mode))


def multislerp(models, weights=None, base=None, normalize_weights=True, eps=1e-8):
    w = torch.tensor(weights_or_ones(weights, len(models)), dtype=torch.float64)
    if normalize_weights:
        w = w / w.sum()
    xs = task_vectors(base, models) if base is not None else [_f64(m) for m in models]
    flat = torch.stack([x.reshape(-1) for x in xs])
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mn = mean.norm()
    if mn < eps:
        assert len(models) == 2
        res = (flat * w[:, None]).sum(0)
    else:
        mean = mean / mn
        tangent = units - (units * mean).sum(-1, keepdim=True) * mean
        tr = (tangent * w[:, None]).sum(0)
        tn = tr.norm() + eps
        res = (mean * torch.cos(tn) + tr * (torch.sin(tn) / tn)) * (norms[:, 0] * w).sum()
    res = res.reshape(xs[0].shape)
    return _out(res if base is None else _f64(base) + res)


def karcher(models, weights=None, max_iter=10, tol=1e-5):
    """mergekit's karcher_merge_tensors in float64, with the given weights as alphas."""
    w = weights_or_ones(weights, len(models))
    alphas = [x / sum(w) for x in w]
    xs = [_f64(m) for m in models]
    norms = [float(x.norm()) for x in xs]
    units = [x / n if n > 0 else torch.zeros_like(x) for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return _out(torch.zeros_like(xs[0]))
    va = [alphas[i] for i in valid]
    na = [a / sum(va) for a in va]
    vu = [units[i] for i in valid]
    mean = sum(a * u for a, u in zip(na, vu))
    mn = float(mean.norm())
    mean = vu[0].clone() if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(na, vu):
            d = torch.clamp((mean * u).sum(), -1.0, 1.0)
            theta = torch.arccos(d)
            if theta < tol:
                continue
            tangent = tangent + a * (theta / torch.sin(theta)) * (u - d * mean)
        tn = tangent.norm()
        if tn < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = mean.norm()
        if un > tol:
            mean = mean / un
    return _out(sum(a * n for a, n in zip(alphas, norms)) * mean)


def tsv_merge(base, models, alpha=1.0):
    """FusionBench's TSV-M (compute_and_sum_svd_mem_reduction) in float64, zero-padded blocks."""
    taus = task_vectors(base, models)
    T = len(taus)
    if taus[0].dim() != 2:
        return _out(_f64(base) + alpha * sum(taus) / T)
    m, n = taus[0].shape
    k = min(m, n)
    r = int(k / T)
    sum_u = torch.zeros(m, k, dtype=torch.float64)
    sum_s = torch.zeros(k, dtype=torch.float64)
    sum_v = torch.zeros(k, n, dtype=torch.float64)
    for i, tau in enumerate(taus):
        u, s, v = torch.linalg.svd(tau, full_matrices=False)
        sum_u[:, i * r:(i + 1) * r] = u[:, :r]
        sum_s[i * r:(i + 1) * r] = s[:r]
        sum_v[i * r:(i + 1) * r, :] = v[:r, :]
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    merged = torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))
    return _out(_f64(base) + alpha * merged)


def iso_c(base, models, lam=1.0):
    taus = task_vectors(base, models)
    tv = sum(taus)
    if tv.dim() == 2:
        u, s, vh = torch.linalg.svd(tv, full_matrices=False)
        tv = s.mean() * (u @ vh)
    else:
        tv = tv / len(taus)
    return _out(_f64(base) + lam * tv)


def peft_ties(base, models, weights, density, method, lam=1.0):
    """PEFT's ties(): magnitude prune, election on unweighted tensors, weights after, / count."""
    import reference as ref0

    taus = [ref0.magnitude_trim(t, density) for t in task_vectors(base, models)]
    stacked = torch.stack(taus)
    sign = stacked.sign()
    score = stacked.sum(0) if method == "total" else sign.sum(0)
    agree = sign == torch.where(score >= 0, 1.0, -1.0).to(torch.float64)
    w = torch.tensor(weights_or_ones(weights, len(models)), dtype=torch.float64)
    w = w.reshape((-1,) + (1,) * (stacked.dim() - 1))
    mixed = (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1)
    return _out(_f64(base) + lam * mixed)
