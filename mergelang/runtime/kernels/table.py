"""Torch implementations of every `Op`: one small function per op, looked up by `KERNELS[op]`.

Values are float32 (or bool) tensors; a stack over models has the model axis at dim 0 and the
element dims after it, so reductions over "rows" / "cols" address dims from the right.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from mergelang.ir.graph import Node
from mergelang.ir.ops import Op
from mergelang.ir.types import torch_dtype

from mergelang.runtime.kernels import cpu_exact as kernels_fast
from mergelang.runtime.kernels.order import kth_largest, topk_mask_plain, topk_mask_rows  # noqa: F401
from mergelang.runtime.kernels.registry import DEVICE_KERNELS, KERNELS, CheckFailed, Kernel, run_node  # noqa: F401


def _dims(t: torch.Tensor, over: str, stacked: bool) -> tuple[int, ...]:
    if over == "models":
        return (0,)
    if over == "tensor":
        return tuple(range(1 if stacked else 0, t.dim()))
    return (-1,) if over == "rows" else (-2,)


def _reduce(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    over = node.attrs["over"]
    if node.attrs["kind"] == "quantile":
        return quantile(args[0], node.attrs["q"], over, _stacked_input(node, over))
    return reduce(args[0], node.attrs["kind"], over, _stacked_input(node, over))


def quantile(x: torch.Tensor, q: float, over: str, stacked: bool) -> torch.Tensor:
    """The entry at 0-based position floor(q (n - 1)) of the scope sorted ascending (numpy's
    quantile method "lower"; index product in float64)."""
    keep = over in ("rows", "cols")
    if over == "tensor":
        if x.dim() == (1 if stacked else 0):
            return x.clone()
        y, dim = (x.reshape(x.shape[0], -1), 1) if stacked else (x.reshape(-1), 0)
    else:
        y, dim = x, {"models": 0, "rows": -1, "cols": -2}[over]
    n = y.shape[dim]
    k = int(math.floor(q * (n - 1))) + 1
    return torch.kthvalue(y, k, dim=dim, keepdim=keep).values


def _stacked_input(node: Node, over: str) -> bool:
    """Whether a reduction's input had a model axis (derivable from the result type)."""
    return over == "models" or node.type.models is not None


def reduce(x: torch.Tensor, kind: str, over: str, stacked: bool) -> torch.Tensor:
    keep = over in ("rows", "cols")
    dims = _dims(x, over, stacked)  # empty for a 0-d tensor reduced over "tensor"
    if kind == "count":
        x = (x != 0).to(torch.float32)
        kind = "sum"
    if kind == "sum":
        return x.sum(dim=dims, keepdim=keep) if dims else x.clone()
    if kind == "mean":
        return x.mean(dim=dims, keepdim=keep) if dims else x.clone()
    if kind == "max":
        return x.amax(dim=dims, keepdim=keep) if dims else x.clone()
    if kind == "min":
        return x.amin(dim=dims, keepdim=keep) if dims else x.clone()
    if kind == "l1":
        return x.abs().sum(dim=dims, keepdim=keep) if dims else x.abs()
    if kind == "l2":
        return torch.linalg.vector_norm(x, dim=dims, keepdim=keep) if dims else x.abs()
    raise ValueError(kind)  # pragma: no cover


def _dot(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    a, b = args
    over = node.attrs["over"]
    return reduce(a * b, "sum", over, _stacked_input(node, over))


def _topk_mask(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    (x,) = args
    density, over = node.attrs["density"], node.attrs["over"]
    absolute = bool(node.attrs.get("abs"))  # |x| folded in by fuse.py (CPU plans)
    stacked = node.type.models is not None
    models = x.unbind(0) if stacked else [x]
    dens = density if isinstance(density, tuple) else (density,) * len(models)
    if over == "tensor":  # the fast exact path (CPU, float32, no NaN), else the plain one below
        flat = x.reshape(len(models), -1)
        fast = kernels_fast.topk_mask_tensor(flat, [int(d * flat.shape[-1]) for d in dens], absolute)
        if fast is not None:
            return fast.reshape(x.shape)
    return topk_mask_plain(x, dens, over, absolute, stacked)


def _const(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    ty = node.type
    return torch.tensor(node.attrs["value"], dtype=torch_dtype(ty.dtype)).reshape(ty.full_shape)


def _assert(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    value, cond = args
    if not bool(cond.all()):
        raise CheckFailed(node.attrs["message"])
    return value


def _clamp(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    return torch.clamp(args[0], min=node.attrs["lo"], max=node.attrs["hi"])


def _sign(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    return torch.sign(args[0])


def _row_kl(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    """KL(p || q) per row, p and q the softmax over the last axis of the two arguments plus eps,
    computed in float64 (in float32, the sum of p log(p/q) over nearly equal rows cancels to
    noise) and returned in the arguments' dtype."""
    x, y = torch.broadcast_tensors(*(a.to(torch.float64) for a in args))
    eps = node.attrs["eps"]
    p = torch.softmax(x, dim=-1) + eps
    q = torch.softmax(y, dim=-1) + eps
    return (p * torch.log(p / q)).sum(dim=-1, keepdim=True).to(args[0].dtype)


def _simple(fn: Callable[..., torch.Tensor]) -> Kernel:
    return lambda node, args: fn(*args)


KERNELS.update({
    Op.CONST: _const,
    Op.STACK: lambda node, args: torch.stack(args),
    Op.INDEX: lambda node, args: args[0][node.attrs["i"]],
    Op.RESHAPE: lambda node, args: args[0].reshape(node.type.full_shape),
    Op.CAST: lambda node, args: args[0].to(torch_dtype(node.attrs["dtype"])),
    Op.NEG: _simple(torch.neg), Op.ABS: _simple(torch.abs), Op.SIGN: _sign,
    Op.SQRT: _simple(torch.sqrt), Op.EXP: _simple(torch.exp), Op.LOG: _simple(torch.log),
    Op.SIN: _simple(torch.sin), Op.COS: _simple(torch.cos), Op.ACOS: _simple(torch.acos),
    Op.TANH: _simple(torch.tanh), Op.FLOOR: _simple(torch.floor), Op.ROUND: _simple(torch.round),
    Op.NOT: _simple(torch.logical_not), Op.CLAMP: _clamp,
    Op.ADD: _simple(torch.add), Op.SUB: _simple(torch.sub), Op.MUL: _simple(torch.mul),
    Op.DIV: _simple(torch.div), Op.POW: _simple(torch.pow), Op.MINIMUM: _simple(torch.minimum),
    Op.MAXIMUM: _simple(torch.maximum), Op.EQ: _simple(torch.eq), Op.NE: _simple(torch.ne),
    Op.LT: _simple(torch.lt), Op.LE: _simple(torch.le), Op.GT: _simple(torch.gt),
    Op.GE: _simple(torch.ge), Op.AND: _simple(torch.logical_and), Op.OR: _simple(torch.logical_or),
    Op.WHERE: _simple(torch.where), Op.LERP: lambda node, args: args[0] + args[2] * (args[1] - args[0]),
    Op.REDUCE: _reduce, Op.DOT: _dot, Op.ROW_KL: _row_kl, Op.TOPK_MASK: _topk_mask, Op.ASSERT: _assert,
    Op.OUTPUT: lambda node, args: args[0].to(torch_dtype(node.attrs["dtype"])),
})


# ---------------------------------------------------------------- order statistics and randomness
def _rows(x: torch.Tensor, over: str, stacked: bool) -> torch.Tensor:
    """A 2-D view: one row per ranked group (a model's whole tensor, or one row of it)."""
    if over == "tensor":
        return x.reshape(x.shape[0] if stacked else 1, -1)
    return x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)


def order_ranks(x: torch.Tensor, over: str, stacked: bool, descending: bool) -> torch.Tensor:
    """int64 rank (0-based) of every entry within its group; ties: lowest index first."""
    flat = _rows(x, over, stacked)
    idx = torch.sort(flat, dim=-1, descending=descending, stable=True).indices
    pos = torch.arange(flat.shape[-1], device=x.device).expand_as(idx)
    return torch.empty_like(idx).scatter_(-1, idx, pos).reshape(x.shape)


def _group_size(x: torch.Tensor, over: str, stacked: bool) -> int:
    return _rows(x, over, stacked).shape[-1]


def _rank(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    (x,) = args
    over, stacked = node.attrs["over"], node.type.models is not None
    r = order_ranks(x, over, stacked, node.attrs["descending"])
    out = x.dtype if x.dtype == torch.float64 else torch.float32  # compute_dtype float64
    if not node.attrs["normalized"]:
        return r.to(out)
    n = _group_size(x, over, stacked)
    return (r.to(torch.float64) / max(n - 1, 1)).to(out)


def _per_model(value: Any, x: torch.Tensor, stacked: bool) -> torch.Tensor | int:
    if not isinstance(value, tuple):
        return value
    return torch.tensor(value, device=x.device).reshape((-1,) + (1,) * (x.dim() - 1))


def _band_mask(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    (x,) = args
    stacked = node.type.models is not None
    r = order_ranks(x, node.attrs["over"], stacked, descending=True)
    lo = _per_model(node.attrs["lo"], x, stacked)
    hi = _per_model(node.attrs["hi"], x, stacked)
    return (r >= lo) & (r < hi)


def _argmax_mask(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    (x,) = args
    n = x.shape[0]
    if node.attrs["last"]:  # argmax returns the first maximum: search the flipped stack
        i = n - 1 - torch.argmax(torch.flip(x, dims=(0,)), dim=0, keepdim=True)
    else:
        i = torch.argmax(x, dim=0, keepdim=True)
    return torch.arange(n, device=x.device).reshape((n,) + (1,) * (x.dim() - 1)) == i


def _bernoulli(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    from mergelang.runtime.rng import bernoulli_mask

    like, p = args
    a = node.attrs
    p = torch.broadcast_to(p, like.shape)
    shape = tuple(like.shape) if node.type.models is None else tuple(like.shape[1:])
    off = a.get("row0", 0) * math.prod(shape[1:])  # a row chunk: its place in the whole stream
    if node.type.models is None:
        return bernoulli_mask(p, shape, a["seed"], a["tensor"], "-", a["stream"], offset=off)
    return torch.stack([bernoulli_mask(p[i], shape, a["seed"], a["tensor"], i, a["stream"], offset=off)
                        for i in range(like.shape[0])])


def _topk_count_mask(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    x, k = args
    stacked = node.type.models is not None
    r = order_ranks(x, node.attrs["over"], stacked, descending=True)
    kk = torch.floor(k.to(torch.float64) * node.attrs["fraction"]).to(torch.int64)
    if stacked and kk.dim():
        kk = kk.reshape((-1,) + (1,) * (x.dim() - 1))
    return r < kk


KERNELS.update({Op.TOPK_COUNT_MASK: _topk_count_mask, Op.RANK: _rank, Op.BAND_MASK: _band_mask, Op.ARGMAX_MASK: _argmax_mask,
                Op.BERNOULLI: _bernoulli})



def _compare(op: Op, fn: Callable[..., torch.Tensor]) -> Kernel:
    def kernel(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
        fast = kernels_fast.compare(op, args[0], args[1])
        return fast if fast is not None else fn(*args)
    return kernel


_COMPARE = {Op.EQ: torch.eq, Op.NE: torch.ne, Op.LT: torch.lt, Op.LE: torch.le, Op.GT: torch.gt,
            Op.GE: torch.ge}
KERNELS.update({Op.WHERE: _simple(torch.where), **{op: _simple(fn) for op, fn in _COMPARE.items()}})
# the CPU-exact forms (same bits as torch, fewer passes; they fall back to torch themselves)
DEVICE_KERNELS.update({(Op.WHERE, "cpu"): _simple(kernels_fast.where),
                       **{(op, "cpu"): _compare(op, fn) for op, fn in _COMPARE.items()}})


def _fused(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    """A FUSED node: its generated loop, or (attr `select`) the top-k mask of its program's
    value, selected without storing the value. numba is imported only when a plan fuses."""
    if node.attrs.get("select") is not None:
        from mergelang.runtime.kernels.numba_topk import run_select

        return run_select(node, args)
    from mergelang.runtime.kernels.numba_codegen import run

    return run(node, args)


DEVICE_KERNELS[(Op.FUSED, "cpu")] = _fused  # fused regions exist in CPU plans only


def _block_quant_cpu(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    """BLOCK_QUANT on the CPU: the numba kernels when the fuse pass marked the node (attr
    `numba`; its values part then gives the FP8 codes, attr `codes`), else torch's."""
    if node.attrs.get("numba"):
        try:
            from mergelang.runtime.kernels.numba_fp8 import run
        except Exception:  # numba could not load its kernels here: torch's, same bytes
            run = None
        if run is not None:
            return run(node, args)
        plain = KERNELS[Op.BLOCK_QUANT](node, args)
        codes = node.attrs.get("codes")
        return plain.to(getattr(torch, codes)) if codes else plain
    return KERNELS[Op.BLOCK_QUANT](node, args)


DEVICE_KERNELS[(Op.BLOCK_QUANT, "cpu")] = _block_quant_cpu
