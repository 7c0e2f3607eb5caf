"""Kernels: the registry (`KERNELS`, op -> torch implementation) and its members.

Importing the package fills the registry explicitly: `table` (elementwise ops, reductions,
order statistics, randomness, fused regions), `linalg` (SVD, polar, solve, ...) and `loop`
(`iterate`'s LOOP nodes).
"""

from mergelang.runtime.kernels.registry import (DEVICE_KERNELS, KERNELS, CheckFailed, Kernel,
                                                 kernel_for, run_node)
from mergelang.runtime.kernels import linalg, loop, table  # noqa: F401  (the members)

__all__ = ["DEVICE_KERNELS", "KERNELS", "CheckFailed", "Kernel", "kernel_for", "run_node"]
