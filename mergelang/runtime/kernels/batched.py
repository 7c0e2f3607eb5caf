"""The BATCH and UNBATCH kernels (passes/batch.py): one body run on the stack of B tensors.

Every value of the body is either batched (a leading axis of B tensors) or shared (a constant,
param or statistic: the same for every tensor). Each op runs once on the whole stack, in a form
that gives every tensor exactly the bits the op gives it alone:

- elementwise ops and casts: the plain kernel; a batched argument of lower rank than the
  result gets ones inserted after its batch axis, so broadcasting pairs the same dims;
- reductions over models, rows or cols (and max/min over a tensor): the same torch reduction
  with the dims moved past the batch axis (each result element sums the same entries in the
  same order);
- order statistics (top-k masks, ranks, bands) over a tensor or its rows: each tensor's models
  become rows of one [B*M, ...] stack, and the op's per-model kernel runs on it; off the CPU
  the top-k mask is selected for all rows at once (`topk_mask_rows_batched`: one sort, no host
  sync per tensor);
- anything else (sums over a whole tensor, whose order torch picks from the output size;
  random masks keyed by the tensor's name; linear algebra): tensor by tensor, then stacked.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from mergelang.ir.graph import Node
from mergelang.ir.ops import ELEMENTWISE, Attrs, Op
from mergelang.runtime.kernels.order import kth_largest
from mergelang.runtime.kernels.registry import KERNELS, run_node

#: launches of BATCH body ops that ran once on the stack / tensor by tensor (benchmarks, tests)
COUNTS = {"batched": 0, "per_tensor": 0}


def run_batch(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    b, k, body = a["batch"], a["loads"], a["body"]
    device = args[0].device.type
    last = {x: i for i, n in enumerate(body) for x in n.args}
    items = dict(a.get("named", ()))
    vals: list[torch.Tensor | None] = [None] * len(body)
    batched = [False] * len(body)
    for i, n in enumerate(body):
        if n.op is Op.ARG:
            j = n.attrs["index"]
            if j < k:
                vals[i] = torch.stack([args[t * k + j] for t in range(b)])
                batched[i] = True
            else:
                vals[i] = args[b * k + j - k]
            continue
        xs = [vals[x] for x in n.args]
        flags = [batched[x] for x in n.args]
        if i in items and n.op is Op.BERNOULLI and "row0" not in n.attrs:
            COUNTS["batched"] += 1
            vals[i] = bernoulli_batched(n, xs, flags, b, [dict(t)["tensor"] for t in items[i]])
        elif i in items:  # attributes that name the tensor: one by one
            COUNTS["per_tensor"] += b
            vals[i] = torch.stack([run_node(replace(n, attrs=Attrs(dict(n.attrs), **dict(items[i][t]))),
                                            [x[t] if f else x for x, f in zip(xs, flags)], device)
                                   for t in range(b)])
        else:
            vals[i] = run_batched(n, xs, flags, b, device)  # type: ignore[arg-type]
        batched[i] = any(flags)
        for x in set(n.args):
            if last[x] == i:
                vals[x] = None
    out = vals[-1]
    assert out is not None and batched[-1]
    return out


def run_batched(n: Node, xs: list[torch.Tensor], flags: list[bool], b: int, device: str
                ) -> torch.Tensor:
    """Op `n` on arguments of which `flags` say which carry the batch axis (at dim 0)."""
    if not any(flags):
        return run_node(n, xs, device)
    fn = _BATCHED.get(n.op)
    if fn is None and (n.op in ELEMENTWISE or n.op is Op.CAST):
        fn = _elementwise
    out = None if fn is None else fn(n, xs, flags, b, device)
    if out is not None:
        COUNTS["batched"] += 1
        return out
    COUNTS["per_tensor"] += b
    return torch.stack([run_node(n, [x[t] if f else x for x, f in zip(xs, flags)], device)
                        for t in range(b)])


def _elementwise(n: Node, xs, flags, b, device):
    rank = len(n.type.full_shape)
    aligned = [x.reshape((b,) + (1,) * (rank - (x.dim() - 1)) + tuple(x.shape[1:])) if f else x
               for x, f in zip(xs, flags)]
    return run_node(n, aligned, device)


def _reduce(n: Node, xs, flags, b, device):
    (x,), over, kind = xs, n.attrs["over"], n.attrs["kind"]
    if not flags[0] or kind == "quantile":
        return None
    if over == "tensor":
        if kind not in ("max", "min") or x.dim() == 1:
            return None  # sums over a whole tensor: torch splits them by the output's size
        stacked = n.type.models is not None
        dims = tuple(range(2 if stacked else 1, x.dim()))
        return x.amax(dim=dims) if kind == "max" else x.amin(dim=dims)
    keep = over in ("rows", "cols")
    dims = (1,) if over == "models" else (-1,) if over == "rows" else (-2,)
    if kind == "count":
        x, kind = (x != 0).to(torch.float32), "sum"
    fns: dict[str, Callable] = {
        "sum": lambda: x.sum(dim=dims, keepdim=keep), "mean": lambda: x.mean(dim=dims, keepdim=keep),
        "max": lambda: x.amax(dim=dims, keepdim=keep), "min": lambda: x.amin(dim=dims, keepdim=keep),
        "l1": lambda: x.abs().sum(dim=dims, keepdim=keep),
        "l2": lambda: torch.linalg.vector_norm(x, dim=dims, keepdim=keep)}
    return fns[kind]()


def _stack(n: Node, xs, flags, b, device):
    return torch.stack(xs, dim=1) if all(flags) else None


def _as_models(n: Node, xs, flags, b, device, tuples: tuple[str, ...]):
    """An order statistic over each model's tensor (or rows): the B tensors' models as the
    rows of one stack, per-model attributes repeated for every tensor."""
    if not flags[0] or not all(f is False for f in flags[1:]) or n.attrs["over"] not in ("tensor", "rows"):
        return None
    x = xs[0]
    m = n.type.models
    rows = b * (m or 1)
    attrs = {key: v * b if isinstance(v, tuple) else v for key, v in n.attrs.items() if key in tuples}
    node = replace(n, attrs=Attrs(dict(n.attrs), **attrs), type=n.type.with_(models=rows))
    flat = x.reshape((rows,) + tuple(x.shape[2 if m else 1:]))
    if n.op is Op.TOPK_MASK and device != "cpu":
        out = _topk_mask_off_cpu(node, flat)
    else:
        out = KERNELS[n.op](node, [flat] + xs[1:])
    return out.reshape(x.shape)


def _topk_mask_off_cpu(node: Node, x: torch.Tensor) -> torch.Tensor:
    over, dens = node.attrs["over"], node.attrs["density"]
    if node.attrs.get("abs"):
        x = torch.abs(x)
    rows = x.shape[0]
    dens = dens if isinstance(dens, tuple) else (dens,) * rows
    if over == "tensor":
        flat = x.reshape(rows, -1)
        ks = [int(d * flat.shape[-1]) for d in dens]
    else:
        flat = x.reshape(-1, x.shape[-1])
        per = flat.shape[0] // rows
        ks = [int(d * x.shape[-1]) for d in dens for _ in range(per)]
    return topk_mask_rows_batched(flat, ks).reshape(x.shape)


def topk_mask_rows_batched(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """True for exactly the ks[r] largest entries of row r (ties: lowest index first) — the
    mask `order.topk_mask_rows` gives row by row, for all rows at once without a host sync:
    the k-th largest by one selection (one k) or one sort (per-row k), ties by a cumsum."""
    n = x.shape[-1]
    kt = torch.tensor(ks, device=x.device, dtype=torch.int64).clamp(0, n).unsqueeze(1)
    if len(set(ks)) == 1 and 0 < ks[0] < n:
        kth = kth_largest(x, ks[0])
    else:
        srt = torch.sort(x, dim=-1).values
        kth = srt.gather(-1, (n - kt).clamp(0, n - 1))
    above = x > kth
    at = x == kth
    need = kt - above.sum(dim=-1, keepdim=True)
    mask = above | (at & (torch.cumsum(at, dim=-1) <= need))
    return torch.where(kt <= 0, False, torch.where(kt >= n, True, mask))


def random_u32_rows(numel: int, streams: list[tuple], device: torch.device) -> torch.Tensor:
    """`rng.random_u32(numel, *parts)` for every `parts` in `streams`, as the rows of one int64
    tensor: the same Philox words (integer ops only), all streams in one pass per chunk."""
    from mergelang.runtime.rng import CHUNK, MASK32, philox4x32, stream_key

    keys = [stream_key(*parts) for parts in streams]
    col = lambda i, j: torch.tensor([k[i][j] for k in keys], dtype=torch.int64, device=device).unsqueeze(1)
    k0, k1, h2, h3 = col(0, 0), col(0, 1), col(1, 0), col(1, 1)
    out = torch.empty((len(streams), numel), dtype=torch.int64, device=device)
    blocks = (numel + 3) // 4
    chunk = max(1, CHUNK.get(device.type, CHUNK["cuda"]) // len(streams))
    for start in range(0, blocks, chunk):
        stop = min(blocks, start + chunk)
        j = torch.arange(start, stop, dtype=torch.int64, device=device).unsqueeze(0)
        words = philox4x32([(j & MASK32).expand(len(streams), -1), (j >> 32).expand(len(streams), -1),
                            h2.expand(-1, j.shape[1]), h3.expand(-1, j.shape[1])], (k0, k1))  # type: ignore[arg-type]
        lanes = torch.stack(words, dim=-1).reshape(len(streams), -1)
        hi = min(stop * 4, numel)
        out[:, start * 4:hi] = lanes[:, :hi - start * 4]
    return out


def bernoulli_batched(n: Node, xs, flags, b: int, names: list[str]) -> torch.Tensor:
    """BERNOULLI for B tensors at once: every (tensor, model) stream a row of one Philox pass;
    the comparison `u < p * 2^32` in float64, as `rng.bernoulli_mask` does it."""
    like, p = xs
    a, m = n.attrs, n.type.models
    shape = tuple(like.shape[1:])
    item = shape[1:] if m else shape
    numel = 1
    for d in item:
        numel *= d
    streams = [(a["seed"], t, i, a["stream"]) for t in names for i in range(m)] if m else \
        [(a["seed"], t, "-", a["stream"]) for t in names]
    u = random_u32_rows(numel, streams, like.device).reshape(like.shape)
    if flags[1]:
        p = p.reshape((b,) + (1,) * (len(shape) - (p.dim() - 1)) + tuple(p.shape[1:]))
    thr = torch.broadcast_to(p, like.shape).to(torch.float64) * 4294967296.0
    return u.to(torch.float64) < thr


_BATCHED = {
    Op.REDUCE: _reduce, Op.STACK: _stack,
    Op.INDEX: lambda n, xs, flags, b, d: xs[0][:, n.attrs["i"]],
    Op.RESHAPE: lambda n, xs, flags, b, d: xs[0].reshape((b, *n.type.full_shape)),
    Op.TOPK_MASK: lambda n, xs, flags, b, d: _as_models(n, xs, flags, b, d, ("density",)),
    Op.RANK: lambda n, xs, flags, b, d: _as_models(n, xs, flags, b, d, ()),
    Op.BAND_MASK: lambda n, xs, flags, b, d: _as_models(n, xs, flags, b, d, ("lo", "hi")),
}

KERNELS[Op.BATCH] = run_batch
KERNELS[Op.UNBATCH] = lambda node, args: args[0][node.attrs["index"]]
