"""mergelang: a declarative language and compiler for merging neural-network checkpoints."""

from .api import Recipe, compile, merge, parse
from .diagnostics import Diagnostic, MergelangError

__all__ = ["compile", "merge", "parse", "Recipe", "MergelangError", "Diagnostic"]
__version__ = "0.1.0"
