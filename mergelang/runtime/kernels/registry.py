"""The kernel registry: `KERNELS[op]` is the torch implementation of an `Op` (any device).

`table.py` (elementwise, reductions, order statistics, randomness) and `linalg.py` fill it; the
package `__init__` imports both. The CPU-exact fast paths (`cpu_exact.py`) and the generated
numba loops (`numba_codegen.py`, `numba_topk.py`) are layered under the torch kernels: a kernel
calls them where they apply and falls back to torch otherwise.
"""

from __future__ import annotations

from typing import Callable

import torch

from mergelang.ir.graph import Node
from mergelang.ir.ops import Op

Kernel = Callable[[Node, list[torch.Tensor]], torch.Tensor]

#: op -> its torch kernel, for any device (the fallback of every lookup)
KERNELS: dict[Op, Kernel] = {}
#: (op, device type) -> a kernel for that device, layered over the torch kernel (e.g. the
#: CPU-exact bit-select `where`, the generated numba loops of FUSED nodes on "cpu")
DEVICE_KERNELS: dict[tuple[Op, str], Kernel] = {}


class CheckFailed(Exception):
    """A runtime `checked(...)` condition was false (becomes an E501 diagnostic)."""


def kernel_for(op: Op, device: str = "cpu") -> Kernel:
    """The kernel of `op` on a device type: the device's own, else the torch kernel."""
    return DEVICE_KERNELS.get((op, device)) or KERNELS[op]


def run_node(node: Node, args: list[torch.Tensor], device: str = "cpu") -> torch.Tensor:
    """Evaluate one non-LOAD node on a device type ("cpu", "cuda")."""
    return kernel_for(node.op, device)(node, args)
