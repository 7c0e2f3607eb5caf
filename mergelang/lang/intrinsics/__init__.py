"""The built-in functions the standard library is written with: the registry and its members.

Importing this package registers every member's intrinsics (explicitly, below). Intrinsics that
declare derived models (`lora`, `stack_layers`, `layer_range`, `align`) live with their model
sources in `mergelang.sources`, whose `__init__` registers them the same way.
"""

from mergelang.lang.intrinsics.registry import INTRINSICS, Impl, Intrinsic, intrinsic
from mergelang.lang.intrinsics import core, layers, linalg, lists, names, stats  # noqa: F401  (the members)

__all__ = ["INTRINSICS", "Impl", "Intrinsic", "intrinsic"]
