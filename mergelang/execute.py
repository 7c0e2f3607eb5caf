"""Execution: interpret an `ExecutionPlan`, streaming tensors from the input checkpoints to a sink.

Each LOAD reads one tensor (upcast to float32 unless it passes through raw); values are freed
after their last use; each OUTPUT is cast once to its dtype and handed to the sink (the
checkpoint writer, or a dict for in-memory merges).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from .checkpoint import ModelSource
from .diagnostics import MergelangError, error
from .kernels import CheckFailed, run_node
from .ops import Op
from .plan import ExecutionPlan

Sink = Callable[[str, torch.Tensor], None]


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is an error (ValueError)."""
    text = str(name)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(text)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device auto or cpu)")
    return dev


def execute(plan: ExecutionPlan, models: Mapping[str, ModelSource | None], sink: Sink,
            device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None) -> None:
    dev = resolve_device(device)
    g = plan.graph
    values: dict[int, torch.Tensor] = {}
    # model-level stage: derived models (align) solve their permutations before streaming
    for name in dict.fromkeys(g.node(s.nid).attrs["model"] for s in plan.steps
                              if g.node(s.nid).op is Op.LOAD):
        src = models[name]
        if src is not None:
            src.prepare(dev)
    for step in plan.steps:
        node = g.node(step.nid)
        if node.op is Op.LOAD:
            src = models[node.attrs["model"]]
            assert src is not None
            t = src.load(node.attrs["tensor"]).to(dev, non_blocking=True)
            values[step.nid] = t if node.type.dtype != "float32" else t.to(torch.float32)
        else:
            args = [values[a] for a in node.args]
            try:
                out = run_node(node, args)
            except CheckFailed as exc:
                raise MergelangError(error(
                    "E501", f"{exc} (tensor `{_output_name(plan, step.nid)}`)", node.span,
                    "the check depends on tensor values, so it could only run now")) from None
            if node.op is Op.OUTPUT:
                sink(node.attrs["name"], out.cpu() if out.device.type != "cpu" else out)
                if progress is not None:
                    progress(node.type.nbytes)
            else:
                values[step.nid] = out
        for nid in step.free:
            values.pop(nid, None)


def _output_name(plan: ExecutionPlan, nid: int) -> str:
    g = plan.graph
    for out in g.outputs():
        if out == nid or nid in _ancestors(g, out):
            return g.node(out).attrs["name"]
    return "?"


def _ancestors(g, nid: int) -> set[int]:
    import networkx as nx

    return nx.ancestors(g, nid)
