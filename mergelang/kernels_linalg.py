"""Torch kernels of the linear-algebra ops (2-D, batched over a stack's model axis).

SVDs run in float32 (`torch.linalg.svd`, thin); the polar factor is U Vh of the thin SVD.
"""

from __future__ import annotations

import weakref

import torch

from .graph import Node
from .kernels import KERNELS
from .ops import Op


#: the last SVD computed: (weak reference to its input, (U, S, Vh)). The U, S and Vh parts of one
#: input are separate graph nodes, which the scheduler runs while that input is alive; this lets
#: them share one decomposition instead of computing it three times.
_LAST_SVD: list[tuple[weakref.ref, tuple[torch.Tensor, ...]]] = []


def _full_svd(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if _LAST_SVD and _LAST_SVD[0][0]() is x:
        return _LAST_SVD[0][1]
    result = tuple(torch.linalg.svd(x, full_matrices=False))
    _LAST_SVD[:] = [(weakref.ref(x), result)]
    return result


def _svd(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    (x,) = args
    k, part = node.attrs["k"], node.attrs["part"]
    u, s, vh = _full_svd(x)
    if part == "S":
        return s[..., :k].contiguous()
    return u[..., :, :k].contiguous() if part == "U" else vh[..., :k, :].contiguous()


def _polar(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(args[0], full_matrices=False)
    return u @ vh


def _concat_models(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    (x,) = args
    return torch.cat(x.unbind(0), dim=node.attrs["axis"])


def _solve(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    from .kernels import CheckFailed

    out, info = torch.linalg.solve_ex(args[0], args[1])
    if bool((info != 0).any()):
        raise CheckFailed("solve: the matrix is singular")
    return out


def _diagonal(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    x = args[0]
    return torch.diag_embed(torch.diagonal(x, dim1=-2, dim2=-1))


KERNELS.update({Op.SOLVE: _solve, Op.TRANSPOSE: lambda node, args: args[0].transpose(-2, -1),
                Op.CAT: lambda node, args: torch.cat(args, dim=node.attrs["axis"]),
                Op.DIAGONAL: _diagonal, Op.PINV: lambda node, args: torch.linalg.pinv(args[0]),
Op.SVD: _svd, Op.POLAR: _polar, Op.MATMUL: lambda node, args: args[0] @ args[1],
                Op.CONCAT_MODELS: _concat_models})
