"""The LOOP kernel (`iterate`, see lang/loops.py): run the body's nodes in order, round after
round, up to `times` rounds; stop as soon as a round leaves the state bit for bit unchanged (a
fixed point: every later round would give it again). Values are freed after their last use in
a round; constants are made once per call, on the state's device. With compute_dtype float64
(float64 inputs) constants are made in float64 and float32 results widened, as the executor does."""

from __future__ import annotations

import torch

from mergelang.ir.graph import Node
from mergelang.ir.ops import Op
from mergelang.runtime.kernels.registry import KERNELS, run_node


def run_loop(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    body: tuple[Node, ...] = node.attrs["body"]
    dev = args[0].device
    last = {a: i for i, n in enumerate(body) for a in n.args}
    wide = any(a.dtype == torch.float64 for a in args)  # compute_dtype float64
    consts = {i: _const(n, wide, dev.type).to(dev) for i, n in enumerate(body) if n.op is Op.CONST}
    inputs = list(args)
    x = inputs[0]
    for _ in range(node.attrs["times"]):
        vals: list[torch.Tensor | None] = [None] * len(body)
        for i, n in enumerate(body):
            if n.op is Op.ARG:
                vals[i] = inputs[n.attrs["index"]]
            elif n.op is Op.CONST:
                vals[i] = consts[i]
            else:
                v = run_node(n, [vals[a] for a in n.args], dev.type)  # type: ignore[misc]
                vals[i] = v.double() if wide and v.dtype == torch.float32 else v
            for a in set(n.args):
                if last[a] == i:
                    vals[a] = None
        nxt = vals[-1]
        assert nxt is not None
        if torch.equal(nxt, x):
            break
        x = inputs[0] = nxt
    return x


def _const(n: Node, wide: bool, device: str) -> torch.Tensor:
    if wide and n.type.dtype == "float32":
        return torch.tensor(n.attrs["value"], dtype=torch.float64).reshape(n.type.full_shape)
    return run_node(n, [], device)


KERNELS[Op.LOOP] = run_loop
