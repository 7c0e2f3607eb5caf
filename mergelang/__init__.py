"""mergelang: a declarative language and compiler for merging neural-network checkpoints."""

import os as _os

# Transparent huge pages for torch's CPU tensors (a PyTorch switch, read once, before torch's
# first allocation, so only when mergelang is imported before torch). Merging allocates many
# large short-lived tensors; with 4 KiB pages, first-touch page faults made elementwise ops 3-4x
# slower on the development VM (measured: a 92 MB torch.sub 100 ms -> 36 ms).
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .api import Recipe, compile, merge, parse
from .diagnostics import Diagnostic, MergelangError

__all__ = ["compile", "merge", "parse", "Recipe", "MergelangError", "Diagnostic"]
__version__ = "0.1.0"
