"""mergelang: a declarative language and compiler for merging neural-network checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .diagnostics import Diagnostic, MergelangError

if TYPE_CHECKING:
    from .api import Recipe, compile, merge, parse

__all__ = ["compile", "merge", "parse", "Recipe", "MergelangError", "Diagnostic"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # the API is imported on first use, so `import mergelang` (and `mergelang check`) does not
    # import torch up front (tests/test_imports.py)
    if name in ("Recipe", "compile", "merge", "parse"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'mergelang' has no attribute {name!r}")
