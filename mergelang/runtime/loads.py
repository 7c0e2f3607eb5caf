"""Loads: one LOAD node's tensor read from its model source (whole or a row chunk), and the
upcast to the dtype the compute loop works in (float32; float64 with compute_dtype float64).
Used by both executors (sequential, overlapped)."""

from __future__ import annotations

from typing import Mapping

import torch

from mergelang.io.checkpoint import ModelSource
from mergelang.passes.plan import ExecutionPlan


def read_value(plan: ExecutionPlan, models: Mapping[str, ModelSource | None], nid: int,
               upcast: bool = True) -> torch.Tensor:
    """Read one LOAD node's tensor on the CPU: float32 (unless it passes through raw: ints,
    bools), or as stored with `upcast=False` (CUDA copies the narrow dtype, upcasts there)."""
    node = plan.graph.node(nid)
    src = models[node.attrs["model"]]
    assert src is not None
    want = compute_dtype(plan) if upcast and node.type.dtype == "float32" else None
    kw = {"view": True} if node.attrs.get("view") else {}  # only kernels read it (fuse.py)
    if node.attrs.get("stored"):  # FP8 codes or their block scales (passes/fp8_reads.py)
        t = src.load_stored(node.attrs["tensor"], **kw)
        want = node.type.dtype
        if want.startswith("float8") and str(t.dtype).removeprefix("torch.") != want:
            raise RuntimeError(f"internal error: {node.attrs['tensor']!r} of model {node.attrs['model']!r} "
                               f"is stored as {t.dtype}, the plan expected {want}")
        return t
    rows = node.attrs.get("rows")
    if rows is not None:  # a row chunk (chunking.py)
        return src.load_rows(node.attrs["tensor"], want, rows[0], rows[1], **kw)
    return src.load_as(node.attrs["tensor"], want, **kw)


def upcast(plan: ExecutionPlan, nid: int, t: torch.Tensor) -> torch.Tensor:
    """A LOAD's value: float32 (float64 with compute_dtype float64), unless the tensor passes
    through raw (ints, bools)."""
    return t if plan.graph.node(nid).type.dtype != "float32" else t.to(compute_dtype(plan))


def compute_dtype(plan: ExecutionPlan) -> torch.dtype:
    """The torch dtype of the plan's float values (option compute_dtype)."""
    return torch.float64 if plan.graph.compute_dtype == "float64" else torch.float32
