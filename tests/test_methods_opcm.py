"""OPCM (`opcm`): continual merging by orthogonal projection.

The reference is FusionBench's OPCMForCLIP loop written here in plain torch on state dicts, in
the given order (shuffle_order = false): full-matrices SVD of the running merged task vector,
projection u^T tau v with the diagonal and the leading split x split block zeroed, lambda_t
bookkeeping and the model-wide norm rescaling after every model. 2-D tensors play the role of
the nn.Linear weights.
"""

from __future__ import annotations

import pytest
import torch

import mergelang as ml

SHAPES = {"embed.weight": (9, 5), "layers.0.proj.weight": (4, 7), "layers.0.sq.weight": (6, 6),
          "layers.0.bias": (7,), "conv": (2, 3, 2), "one": (1,)}


def make_sd(seed: int, shapes=SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _norm(sd, base):
    return torch.linalg.norm(torch.cat([(sd[k] - base[k]).reshape(-1) for k in base]))


def reference_opcm(base, models, alpha=0.5):
    merged = {k: v.clone() for k, v in models[0].items()}
    norms = [_norm(merged, base)]
    prev_lambda = 1.0
    for task in models[1:]:
        norms.append(_norm(task, base))
        avg = sum(float(n) for n in norms) / len(norms)
        lam = 1.0
        for k, w in merged.items():
            prev, tau = w - base[k], task[k] - base[k]
            if w.dim() == 2:
                u, s, vh = torch.linalg.svd(prev, full_matrices=True)
                v = vh.T
                split = int((s.cumsum(dim=0) / s.sum() > alpha).float().argmax().item())
                p = u.T @ tau @ v
                p.diagonal().fill_(0)
                p[:split, :split] = 0
                tau = u @ p @ v.T
            merged[k] = base[k] + (prev_lambda * prev + tau) / lam
        tvn = float(_norm(merged, base))
        lam *= tvn / avg
        merged = {k: base[k] + (w - base[k]) * (avg / tvn) for k, w in merged.items()}
        prev_lambda = lam
    return merged


def _check(out, want, tol=2e-5):
    for n, w in want.items():
        torch.testing.assert_close(out[n], w, rtol=tol, atol=tol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("alpha", [0.5, 0.2, 0.9, 1.0, 0.0])
@pytest.mark.parametrize("count", [2, 3, 5])
def test_opcm_matches_reference(alpha, count):
    base, *ms = (make_sd(s) for s in range(count + 1))
    env = {f"m{i}": m for i, m in enumerate(ms)}
    out = ml.merge(f"opcm(base, [{', '.join(env)}], alpha = {alpha})", base=base, **env)
    _check(out, reference_opcm(base, ms, alpha))
