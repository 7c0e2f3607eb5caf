"""`learn`'s view of a plan: constant work, done once, and dynamic work, done per step.

The plan (unfused: the generated numba loops are not differentiable) is split once into
*constant* nodes — no learnable param above them — and *dynamic* ones. Both parts run on the
plan interpreter (runtime/interpret.py) with the torch kernels (`KERNELS`, differentiable):
the constant part once without gradients, keeping only the values a dynamic node reads (the
"frontier", e.g. the task vectors `a - base`) and the outputs; the dynamic part at each step
with torch autograd, from the frontier and the current param tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from mergelang.ir.graph import MergeGraph, Node
from mergelang.ir.ops import Op
from mergelang.ir.paramexpr import evaluate
from mergelang.passes.params import param_nodes, sub_attrs
from mergelang.passes.plan import Step
from mergelang.runtime.interpret import Interpreter, steps_for

if TYPE_CHECKING:
    import torch


class GraphProgram:
    """The plan as constant work (done once) and dynamic work (done per step)."""

    def __init__(self, plan: Any, models: Mapping[str, Any], device: str):
        import torch

        from mergelang.runtime.executor import prepare_models

        g = _float_outputs(plan.graph)
        self.graph, self.device = g, device
        order = [s.nid for s in plan.steps if s.nid in g]
        self.refs = set(param_nodes(g)[1])
        dynamic: set[int] = set()
        for nid in order:
            n = g.node(nid)
            if n.op is Op.PARAM or nid in self.refs or any(a in dynamic for a in n.args):
                dynamic.add(nid)
        self.dynamic = [nid for nid in order if nid in dynamic]
        needed = {a for nid in self.dynamic for a in g.node(nid).args if a not in dynamic}
        self.outputs = [(nid, g.node(nid).attrs["name"]) for nid in order
                        if g.node(nid).op is Op.OUTPUT]
        prepare_models(plan, models, torch.device(device))
        constants = ConstantPart(plan, g, models, device)
        with torch.no_grad():
            vals = constants.run(steps_for([nid for nid in order if nid not in dynamic], g.node,
                                           lambda nid: nid not in needed))
        self.frontier: dict[int, torch.Tensor] = {nid: vals[nid] for nid in order if nid in needed}
        self.const_out: dict[str, torch.Tensor] = constants.outputs
        self.steps = steps_for(self.dynamic, g.node)

    def state(self, params: Mapping[str, "torch.Tensor"], values: Mapping[str, Any]) -> dict[str, "torch.Tensor"]:
        """The merged tensors (float32) for the current param tensors; `values` (plain
        numbers) fill ParamRef attrs, which are not differentiable."""
        part = DynamicPart(self, params, values)
        part.run(self.steps, dict(self.frontier))
        out = part.outputs
        # the loss gets its own copies of the constant tensors (and of any output that is one of
        # them): a loss that changes `state` in place must not change later steps
        kept = {t.data_ptr() for t in [*self.frontier.values(), *self.const_out.values()]}
        return {name: (out[name] if out[name].data_ptr() not in kept else out[name].clone())
                if name in out else self.const_out[name].clone() for _, name in self.outputs}


class ConstantPart(Interpreter):
    """The constant nodes: LOADs read from the models, outputs kept (detached) in `outputs`."""

    def __init__(self, plan: Any, graph: MergeGraph, models: Mapping[str, Any], device: str):
        from mergelang.runtime.kernels import KERNELS

        super().__init__(graph.node, device)
        self.plan, self.models, self.kernels = plan, models, KERNELS

    def load(self, step: Step, node: Node) -> Any:
        from mergelang.runtime.loads import read_value

        return read_value(self.plan, self.models, step.nid).to(self.device)

    def run_node(self, step: Step, node: Node, args: list[Any]) -> Any:
        if node.op is Op.OUTPUT:
            return args[0].detach()
        return self.kernels[node.op](node, args)


class DynamicPart(Interpreter):
    """The dynamic nodes: PARAM nodes are their expressions over the param tensors
    (differentiable), nodes with ParamRef attrs get `values` in them, outputs are kept as they
    are (with their gradients) in `outputs`."""

    def __init__(self, program: GraphProgram, params: Mapping[str, Any], values: Mapping[str, Any]):
        from mergelang.runtime.kernels import KERNELS

        super().__init__(program.graph.node, program.device)
        self.refs, self.params, self.values, self.kernels = program.refs, params, values, KERNELS

    def run_node(self, step: Step, n: Node, args: list[Any]) -> Any:
        if n.op is Op.PARAM:  # its expression over the param tensors (differentiable)
            import torch

            v = evaluate(n.attrs["expr"], lambda name, path: _at(self.params[name], path))
            if not isinstance(v, torch.Tensor):  # e.g. clamp(t, 0, 1) with t out of range: a
                v = torch.tensor(float(v), dtype=torch.float32, device=self.device)  # constant
            return v
        if n.op is Op.OUTPUT:
            return args[0]
        if step.nid in self.refs:
            n = Node(n.op, n.args, sub_attrs(n.attrs, self.values), n.type, n.span)
        return self.kernels[n.op](n, args)


def _at(t: Any, path: tuple[int, ...]) -> Any:
    for i in path:
        t = t[i]
    return t


def _float_outputs(graph: Any) -> Any:
    """The graph with block-scaled FP8 outputs (sources/fp8.py) as the float values they
    quantize: a loss sees weights, not FP8 codes and their scale tensors."""
    quant = [(nid, n) for nid, n in graph.items()
             if n.op is Op.OUTPUT and graph.node(n.args[0]).op is Op.BLOCK_QUANT]
    if not quant:
        return graph
    g = graph.clone()
    dropped = set()
    for nid, n in quant:
        bq = g.node(n.args[0])
        dropped.add(n.args[0])
        if bq.attrs["part"] == "scale_inv":
            g.remove_node(nid)
        else:
            g.set_node(nid, Node(Op.OUTPUT, (bq.args[0],), n.attrs.replace(dtype="float32"),
                                 bq.type, n.span))
    g.remove_nodes_from(dropped)
    return g
