"""Independent plain-torch reference implementations of a few merge methods.

Written from the formulas in METHODS.md ("Merge methods the stdlib must provide"), NOT from any
mergelang code, so that the compiler's output can be checked against them. Everything is computed
in float64 internally; the results are returned as float32 tensors.

One deliberate detail: task vectors are formed as a float32 subtraction (θi − θ0 on the float32
inputs) before being upcast, because mergelang computes in float32 and the magnitude trim and the
sign election must see the same task vector to give *exactly* the same masks.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

SLERP_DOT_THRESHOLD = 0.9995
SLERP_NORM_EPS = 1e-8
DIV_EPS = 1e-8


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).to(torch.float64)


def _out(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} models")
    return weights


# ---------------------------------------------------------------------------------------------
# Interpolation


def linear(models: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
           normalize: bool = True) -> torch.Tensor:
    """Σ wi θi, then ÷ Σ wi if normalize (Σ wi = 0 → ValueError)."""
    ws = _weights(weights, len(models))
    acc = torch.zeros_like(_f64(models[0]))
    for w, m in zip(ws, models):
        acc = acc + w * _f64(m)
    if normalize:
        total = math.fsum(ws)
        if total == 0:
            raise ValueError("linear: the weights sum to zero")
        acc = acc / total
    return _out(acc)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors (mergekit's formula)."""
    t = float(t)
    a64, b64 = _f64(a), _f64(b)
    va, vb = a64.flatten(), b64.flatten()
    na, nb = torch.linalg.vector_norm(va), torch.linalg.vector_norm(vb)
    ua = va / na if na > SLERP_NORM_EPS else va
    ub = vb / nb if nb > SLERP_NORM_EPS else vb
    d = float(torch.dot(ua, ub))
    if abs(d) > SLERP_DOT_THRESHOLD:
        res = (1.0 - t) * a64 + t * b64
    else:
        theta = math.acos(d)
        s = math.sin(theta)
        res = (math.sin((1.0 - t) * theta) / s) * a64 + (math.sin(t * theta) / s) * b64
    return _out(res)


def passthrough(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return _out(_f64(x) * float(scale))


# ---------------------------------------------------------------------------------------------
# Task-vector family (mergekit's generalized task arithmetic)


def magnitude_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask keeping exactly k = int(density·n) largest |τ| of the whole tensor.

    Ties in |τ| are broken by flattened index, lowest index first (a stable sort on −|τ|).
    density >= 1 keeps everything.
    """
    density = float(density)
    n = tau.numel()
    if density >= 1.0:
        return torch.ones_like(tau, dtype=torch.bool)
    k = int(density * n)
    flat = tau.flatten().abs()
    order = torch.sort(-flat, stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:k]] = True
    return keep.reshape(tau.shape)


def magnitude_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    return torch.where(magnitude_mask(tau, density), tau, torch.zeros_like(tau))


def generalized_task_arithmetic(base: torch.Tensor, models: Sequence[torch.Tensor],
                                weights: Sequence[float] | None = None,
                                density: float | Sequence[float] = 1.0, lam: float = 1.0,
                                sparsify: str | None = None, consensus: bool = False,
                                normalize: bool = False) -> torch.Tensor:
    ws = _weights(weights, len(models))
    if isinstance(density, (int, float)):
        densities = [float(density)] * len(models)
    else:
        densities = [float(d) for d in density]
    base32 = base.detach().to(torch.float32)
    # task vectors: float32 subtraction, then float64 (see the module docstring)
    taus = [_f64(m.detach().to(torch.float32) - base32) for m in models]
    if sparsify == "magnitude":
        taus = [magnitude_trim(tau, d) for tau, d in zip(taus, densities)]
    elif sparsify is not None:
        raise ValueError(f"unknown sparsifier {sparsify!r}")
    weighted = [w * tau for w, tau in zip(ws, taus)]  # weights applied BEFORE election
    if consensus:
        total = torch.stack(weighted).sum(0)
        elected = torch.where(total >= 0, 1.0, -1.0).to(torch.float64)
        masks = [torch.sign(wt) == elected for wt in weighted]  # sign 0 never matches ±1
        mixed = torch.zeros_like(taus[0])
        div = torch.zeros_like(taus[0])
        for w, wt, m in zip(ws, weighted, masks):
            mixed = mixed + torch.where(m, wt, torch.zeros_like(wt))
            div = div + w * m.to(torch.float64)
        div = torch.where(div == 0, torch.ones_like(div), div)
    else:
        mixed = torch.stack(weighted).sum(0)
        s = math.fsum(ws)
        div = torch.full_like(mixed, 1.0 if abs(s) < DIV_EPS else s)
    if normalize:
        mixed = mixed / div
    return _out(_f64(base) + float(lam) * mixed)


def task_arithmetic(base: torch.Tensor, models: Sequence[torch.Tensor],
                    weights: Sequence[float] | None = None, lam: float = 1.0) -> torch.Tensor:
    return generalized_task_arithmetic(base, models, weights, 1.0, lam, sparsify=None,
                                       consensus=False, normalize=False)


def ties(base: torch.Tensor, models: Sequence[torch.Tensor],
         weights: Sequence[float] | None = None, density: float | Sequence[float] = 1.0,
         lam: float = 1.0, normalize: bool = True) -> torch.Tensor:
    return generalized_task_arithmetic(base, models, weights, density, lam,
                                       sparsify="magnitude", consensus=True, normalize=normalize)
