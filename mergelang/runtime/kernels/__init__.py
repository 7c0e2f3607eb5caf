"""Kernels: the registry (`KERNELS`, op -> torch implementation) and its members.

Importing the package fills the registry explicitly: `table` (elementwise ops, reductions,
order statistics, randomness, fused regions), `linalg` (SVD, polar, solve, ...), `loop`
(`iterate`'s LOOP nodes), `batched` (BATCH steps, passes/batch.py) and `plugin` (methods written in Python).
"""

from mergelang.runtime.kernels.registry import (DEVICE_KERNELS, KERNELS, CheckFailed, Kernel,
                                                 kernel_for, run_node)
from mergelang.runtime.kernels import batched, linalg, loop, plugin, table  # noqa: F401  (the members)

__all__ = ["DEVICE_KERNELS", "KERNELS", "CheckFailed", "Kernel", "kernel_for", "run_node"]
