"""The plan interpreter: the one walk over a program's steps, shaped like torch.fx's `Interpreter`.

A program is a sequence of steps (`passes.plan.Step`: a node id and the values whose last use is
that step, e.g. an `ExecutionPlan`'s steps, or `steps_for(order, node_of)`) plus `node_of`, which
gives a step's node; a node's args are the ids of the values it reads. `Interpreter.run` walks
the steps in order and keeps each value in an environment until its last use:

- a LOAD's value is `load(step, node)`;
- any other node's is `run_node(step, node, args)`, `args` the values of its args in order (the
  per-node method; by default the node's kernel on `device`);
- an OUTPUT's value (what `run_node` gives for it) goes to `output(step, node, value)` and is not
  kept;
- after each step the values in `step.free` are dropped, each passed to `free(nid, value)`.

Subclasses override these hooks: the executor's compute loop (`runtime/executor.StepInterpreter`:
buffer reuse, live-byte metering, outputs to the writer), `learn`'s constant and per-step
programs (search/learn.py), the body of a LOOP (runtime/kernels/loop.py) and constant folding
(passes/optimize.py: the values are the graph's CONST nodes). A new kind of node is run by a
subclass whose `run_node` handles its op and calls `super().run_node(...)` for the others.

This module imports no torch (constant folding imports it while compiling): the kernels are
imported the first time the default `run_node` runs.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Callable, Iterable, Sequence

from mergelang.ir.graph import Node
from mergelang.ir.ops import Op
from mergelang.passes.plan import Step

_LOAD, _OUTPUT = Op.LOAD, Op.OUTPUT


def steps_for(order: Iterable[Any], node_of: Callable[[Any], Node],
              keep: Callable[[Any], bool] | None = None) -> list[Step]:
    """Steps running `order`, each value freed after its last use among them (values `keep`
    rejects are never freed; a value no step reads is never freed either)."""
    order = list(order)
    last: dict[Any, int] = {}
    for i, nid in enumerate(order):
        for a in node_of(nid).args:
            last[a] = i
    frees: list[list[Any]] = [[] for _ in order]
    for a, i in last.items():
        if keep is None or keep(a):
            frees[i].append(a)
    return [Step(nid, tuple(f)) for nid, f in zip(order, frees)]


class Interpreter:
    """Runs steps of nodes found by `node_of`, kernels on device type `device` ("cpu", "cuda")."""

    def __init__(self, node_of: Callable[[Any], Node], device: str = "cpu"):
        self.node_of = node_of
        self.device = device
        #: OUTPUT values by tensor name (the default `output` hook)
        self.outputs: dict[str, Any] = {}

    def run(self, steps: Sequence[Step], env: dict[Any, Any] | None = None) -> dict[Any, Any]:
        """Run `steps` in order; `env` holds values already known (e.g. inputs). Returns the
        environment: the values no step freed."""
        env = {} if env is None else env
        node_of, load, run_node, output, free = (self.node_of, self.load, self.run_node,
                                                 self.output, self.free)
        for step in steps:
            nid = step.nid
            node = node_of(nid)
            op = node.op
            if op is _LOAD:
                env[nid] = load(step, node)
            elif op is _OUTPUT:  # no local holds it: the sink decides how long it lives
                output(step, node, run_node(step, node, [env[a] for a in node.args]))
            else:
                env[nid] = run_node(step, node, [env[a] for a in node.args])
            for a in step.free:
                free(a, env.pop(a, None))
        return env

    # -- the hooks ------------------------------------------------------------------------

    def load(self, step: Step, node: Node) -> Any:
        """The value of a LOAD node (an interpreter of programs that read tensors defines it)."""
        raise NotImplementedError(f"{type(self).__name__} cannot run LOAD nodes")

    def run_node(self, step: Step, node: Node, args: list[Any]) -> Any:
        """The value of `node` (not a LOAD) from its args' values: its kernel on `device`."""
        return self.kernel(node, args, self.device)

    def output(self, step: Step, node: Node, value: Any) -> None:
        """An OUTPUT's value (`run_node`'s result for it): kept in `outputs` by tensor name."""
        self.outputs[node.attrs["name"]] = value

    def free(self, nid: Any, value: Any) -> None:
        """`value` (None: not in the environment) was dropped after its last use."""

    @cached_property
    def kernel(self) -> Callable[..., Any]:
        """`kernels.run_node(node, args, device)`: imported on first use (it imports torch)."""
        from mergelang.runtime.kernels.registry import run_node

        return run_node
