"""Torch kernels of the linear-algebra ops (2-D, batched over a stack's model axis).

SVDs run in the compute dtype (`torch.linalg.svd`, thin: float32, or float64 with option
compute_dtype); the polar factor is U Vh of the thin SVD. The singular vectors of numerically
zero singular values are not determined and are written as 0 (`determined_svd`).
"""

from __future__ import annotations

import weakref

import torch

from mergelang.ir.graph import Node
from mergelang.runtime.kernels.registry import KERNELS
from mergelang.ir.ops import Op


#: the last SVD computed: (weak reference to its input, (U, S, Vh)). The U, S and Vh parts of one
#: input are separate graph nodes, which the scheduler runs while that input is alive; this lets
#: them share one decomposition instead of computing it three times.
_LAST_SVD: list[tuple[weakref.ref, tuple[torch.Tensor, ...]]] = []


def _full_svd(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if _LAST_SVD and _LAST_SVD[0][0]() is x:
        return _LAST_SVD[0][1]
    result = determined_svd(x)
    _LAST_SVD[:] = [(weakref.ref(x), result)]
    return result


def determined_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD with the singular vectors of numerically zero singular values written as 0.

    Singular values at most max(m, n) * eps * s_max (numpy's `matrix_rank` tolerance, with
    float32's eps in both compute dtypes: the inputs are at most float32-precise, so directions
    below that are input rounding) are zero up to rounding: their singular vectors are any
    orthonormal basis of a null space, which LAPACK picks differently by build, dtype and input
    rounding (a task vector with dead ReLU units has such zero directions). Writing them as 0
    keeps U diag(S) Vh (to rounding) and makes every product of the factors determined: `polar`
    becomes the partial isometry on the matrix's range (the canonical polar factor), 0 on its
    null space; float32 and float64 runs then agree there."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    tol = s[..., :1] * max(x.shape[-2], x.shape[-1]) * torch.finfo(torch.float32).eps
    keep = (s > tol).to(s.dtype)
    return u * keep.unsqueeze(-2), s, vh * keep.unsqueeze(-1)


def _svd(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    (x,) = args
    k, part = node.attrs["k"], node.attrs["part"]
    u, s, vh = _full_svd(x)
    if part == "S":
        energy = node.attrs.get("energy")
        if energy is None:
            return s[..., :k].contiguous()
        # the smallest rank whose singular values hold `energy` of the total (sum of s^2), at
        # most k; the values beyond it are zeroed (the factors keep k columns)
        e = s.double() ** 2
        cum = e.cumsum(-1)
        keep = (cum < energy * cum[..., -1:]).sum(-1, keepdim=True) + 1
        idx = torch.arange(s.shape[-1], device=s.device)
        return torch.where(idx < keep, s, 0.0)[..., :k].contiguous()
    return u[..., :, :k].contiguous() if part == "U" else vh[..., :k, :].contiguous()


def _polar(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    u, _, vh = determined_svd(args[0])
    return u @ vh


def _concat_models(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    (x,) = args
    return torch.cat(x.unbind(0), dim=node.attrs["axis"])


def _solve(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    from mergelang.runtime.kernels.registry import CheckFailed

    out, info = torch.linalg.solve_ex(args[0], args[1])
    if bool((info != 0).any()):
        raise CheckFailed("solve: the matrix is singular")
    return out


def _diagonal(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    x = args[0]
    return torch.diag_embed(torch.diagonal(x, dim1=-2, dim2=-1))


def _wudi_adam(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    """Adam on WUDI's loss from X = sum of the task vectors, as FusionBench's `wudi_merging`
    (torch.optim.Adam, weight decay 0). Zero task vectors get weight 0 (the reference divides by
    their zero norm and produces NaN)."""
    tvs = args[0] if args[0].dtype == torch.float64 else args[0].to(torch.float32)
    n2 = tvs.reshape(tvs.shape[0], -1).square().sum(-1)
    w = torch.where(n2 > 0, 1.0 / torch.where(n2 > 0, n2, torch.ones_like(n2)), torch.zeros_like(n2))
    x = torch.nn.Parameter(tvs.sum(0).clone())
    opt = torch.optim.Adam([x], lr=node.attrs["lr"], weight_decay=0)
    tvs_t = tvs.transpose(1, 2)
    with torch.enable_grad():
        for _ in range(node.attrs["steps"]):
            product = torch.matmul(x.unsqueeze(0) - tvs, tvs_t)
            loss = (product.square().sum((1, 2)) * w).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return x.detach()


KERNELS.update({Op.SOLVE: _solve, Op.WUDI_ADAM: _wudi_adam, Op.TRANSPOSE: lambda node, args: args[0].transpose(-2, -1),
                Op.CAT: lambda node, args: torch.cat(args, dim=node.attrs["axis"]),
                Op.DIAGONAL: _diagonal, Op.PINV: lambda node, args: torch.linalg.pinv(args[0]),
Op.SVD: _svd, Op.POLAR: _polar, Op.MATMUL: lambda node, args: args[0] @ args[1],
                Op.CONCAT_MODELS: _concat_models})


def _block_quant(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    """Block-scaled FP8 (sources/fp8.py): per block of `block` entries, scale_inv = amax / fmax;
    "values" gives x / scale_inv (0 where the block is all zeros), clamped to +-fmax for the
    cast to FP8 that the OUTPUT does (round to nearest even)."""
    (x,) = args
    (b0, b1), fmax = node.attrs["block"], node.attrs["fmax"]
    r, c = x.shape
    b0, b1 = max(1, min(b0, r)), max(1, min(b1, c))  # a block past the tensor: one block of it
    rb, cb = -(-r // b0), -(-c // b1)
    padded = torch.nn.functional.pad(x.abs(), (0, cb * b1 - c, 0, rb * b0 - r))
    scale = padded.reshape(rb, b0, cb, b1).amax(dim=(1, 3)) / fmax
    if node.attrs["part"] == "scale_inv":
        return scale
    s = scale.repeat_interleave(b0, 0)[:r].repeat_interleave(b1, 1)[:, :c]
    return torch.where(s == 0, 0.0, x / s).clamp(-fmax, fmax)


KERNELS[Op.BLOCK_QUANT] = _block_quant


def _block_dequant(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    """FP8 codes x their block scales on the codes' device (sources/fp8.dequantize)."""
    from mergelang.sources.fp8 import dequantize

    return dequantize(args[0], args[1].to(args[0].device), tuple(node.attrs["block"]))


KERNELS[Op.BLOCK_DEQUANT] = _block_dequant
