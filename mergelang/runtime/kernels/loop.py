"""The LOOP kernel (`iterate`, see lang/loops.py): run the body's nodes in order (the plan
interpreter, runtime/interpret.py), round after round, up to `times` rounds; stop as soon as a
round leaves the state bit for bit unchanged (a fixed point: every later round would give it
again). Values are freed after their last use in a round; constants are made once per call, on
the state's device. With compute_dtype float64 (float64 inputs) constants are made in float64
and float32 results widened, as the executor does."""

from __future__ import annotations

import torch

from mergelang.ir.graph import Node
from mergelang.ir.ops import Op
from mergelang.passes.plan import Step
from mergelang.runtime.interpret import Interpreter, steps_for
from mergelang.runtime.kernels.registry import KERNELS, run_node


def run_loop(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    body: tuple[Node, ...] = node.attrs["body"]
    dev = args[0].device
    wide = any(a.dtype == torch.float64 for a in args)  # compute_dtype float64
    consts = {i: _const(n, wide, dev.type).to(dev) for i, n in enumerate(body) if n.op is Op.CONST}
    inputs = list(args)
    rounds = BodyInterpreter(body, inputs, consts, wide, dev.type)
    steps = steps_for(range(len(body)), body.__getitem__)  # a body's args are positions in it
    x = inputs[0]
    for _ in range(node.attrs["times"]):
        nxt = rounds.run(steps)[len(body) - 1]
        if torch.equal(nxt, x):
            break
        x = inputs[0] = nxt
    return x


class BodyInterpreter(Interpreter):
    """One round of a loop body: ARG nodes are the round's inputs (`inputs`, the state first),
    CONST nodes the constants made once per call; with `wide`, float32 results are widened."""

    def __init__(self, body: tuple[Node, ...], inputs: list[torch.Tensor],
                 consts: dict[int, torch.Tensor], wide: bool, device: str):
        super().__init__(body.__getitem__, device)
        self.inputs, self.consts, self.wide = inputs, consts, wide

    def run_node(self, step: Step, n: Node, args: list[torch.Tensor]) -> torch.Tensor:
        if n.op is Op.ARG:
            return self.inputs[n.attrs["index"]]
        if n.op is Op.CONST:
            return self.consts[step.nid]
        v = run_node(n, args, self.device)
        return v.double() if self.wide and v.dtype == torch.float32 else v


def _const(n: Node, wide: bool, device: str) -> torch.Tensor:
    if wide and n.type.dtype == "float32":
        return torch.tensor(n.attrs["value"], dtype=torch.float64).reshape(n.type.full_shape)
    return run_node(n, [], device)


KERNELS[Op.LOOP] = run_loop
