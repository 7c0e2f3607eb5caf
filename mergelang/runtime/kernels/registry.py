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

KERNELS: dict[Op, Kernel] = {}


class CheckFailed(Exception):
    """A runtime `checked(...)` condition was false (becomes an E501 diagnostic)."""


def run_node(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    """Evaluate one non-LOAD node."""
    return KERNELS[node.op](node, args)
