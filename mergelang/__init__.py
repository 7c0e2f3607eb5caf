"""mergelang: a declarative language and compiler for merging neural-network checkpoints."""

from __future__ import annotations

import os as _os
from typing import TYPE_CHECKING, Any


# Transparent huge pages for torch's CPU tensors (a PyTorch switch, read once, before torch's
# first allocation, so only when mergelang is imported before torch). Merging allocates many
# large short-lived tensors; with 4 KiB pages, first-touch page faults made elementwise ops 3-4x
# slower on the development VM (measured: a 92 MB torch.sub 100 ms -> 36 ms).
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from mergelang.diagnostics import Diagnostic, MergelangError

if TYPE_CHECKING:
    from mergelang.api import Recipe, compile, merge, parse
    from mergelang.data.regmeanpp import regmeanpp
    from mergelang.data.stats import stats
    from mergelang.tools.inspect import inspect

__all__ = ["compile", "merge", "parse", "method", "inspect", "Recipe", "MergelangError", "Diagnostic",
           "stats", "regmeanpp"]
from mergelang._version import __version__ as __version__  # noqa: E402


def __getattr__(name: str) -> Any:
    # the API is imported on first use, so `import mergelang` (and `mergelang check`) does not
    # import torch up front (tests/test_imports.py)
    if name in ("Recipe", "compile", "merge", "parse"):
        from mergelang import api

        return getattr(api, name)
    if name == "method":  # @mergelang.method: merge methods written in Python (lang/plugins.py)
        from mergelang.lang.plugins import method

        return method
    if name == "stats":  # ml.stats(model, data, kind=...): data/stats.py
        from mergelang.data.stats import stats

        return stats
    if name == "regmeanpp":  # ml.regmeanpp(models, data, alpha=...): data/regmeanpp.py
        from mergelang.data.regmeanpp import regmeanpp

        return regmeanpp
    if name == "inspect":  # ml.inspect(base, models, ...): tools/inspect.py
        from mergelang.tools.inspect import inspect

        return inspect
    if name == "objectives":  # ml.objectives.entropy, .forward, .accuracy (search/objectives.py)
        import importlib

        return importlib.import_module("mergelang.objectives")
    raise AttributeError(f"module 'mergelang' has no attribute {name!r}")
