"""Input checks (option nan_check, `--nan-check`): every floating input tensor is checked for NaN
/ Inf as it is read, so a bad value is reported even when the merge masks it out (TIES's top-k,
a `where`) and the output is finite. "error" stops with E222 naming the model and tensor; "warn"
reports W125 once per (model, tensor) and the merge goes on; "off" reads without checking.

The check is `checked.all_finite` on the tensor the read just produced (a float32 sum, or the
16-bit exponent-bit test), while its memory is still in the cache; each row chunk of a chunked
read is checked as it is read, and one (model, tensor) is reported once."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Mapping

from mergelang.diagnostics import Diagnostic, MergelangError, error, warning
from mergelang.io.checked import all_finite
from mergelang.io.checkpoint import ModelSource, WrappedSource

if TYPE_CHECKING:
    import torch


class InputCheck:
    """Collects the reports of one run (the reader threads share it)."""

    def __init__(self, mode: str, say: Callable[[str], None], spans: Mapping[str, Any],
                 warnings: list[Diagnostic]):
        self.mode, self.say, self.spans, self.warnings = mode, say, spans, warnings
        self.reported: set[tuple[str, str]] = set()
        self.lock = threading.Lock()

    def __call__(self, model: str, name: str, t: "torch.Tensor") -> None:
        if not t.is_floating_point() or not t.numel() or all_finite(t):
            return
        import torch

        with self.lock:
            if (model, name) in self.reported:
                return
            self.reported.add((model, name))
        wide = t.to(torch.float32) if t.dtype.itemsize < 2 else t  # FP8: no isnan kernel
        nan, inf = int(torch.isnan(wide).sum()), int(torch.isinf(wide).sum())
        code, make = ("E222", error) if self.mode == "error" else ("W125", warning)
        diag = make(code, f"input tensor `{name}` of model `{model}` has {nan} NaN and {inf} "
                    f"infinite values (of {t.numel()})", self.spans.get(model),
                    "the checkpoint itself holds them (even where the merge masks them out, e.g. "
                    "a TIES top-k); --nan-check warn (option nan_check = \"warn\") merges anyway, "
                    "--nan-check off skips the checks")
        if self.mode == "error":
            raise MergelangError(diag)
        with self.lock:
            self.warnings.append(diag)
        self.say(diag.render())


class CheckedInput(WrappedSource):
    """`inner`, with every tensor it reads passed to `check` (under the recipe's model name)."""

    def __init__(self, inner: ModelSource, model: str, check: InputCheck):
        super().__init__(inner)
        self.block_output = inner.block_output
        self.model, self.check = model, check

    def load_as(self, name: str, dtype: Any = None, *, view: bool = False) -> "torch.Tensor":
        t = self.inner.load_as(name, dtype, view=view)
        self.check(self.model, name, t)
        return t

    def load_rows(self, name: str, dtype: Any, start: int, stop: int, *,
                  view: bool = False) -> "torch.Tensor":
        t = self.inner.load_rows(name, dtype, start, stop, view=view)
        self.check(self.model, name, t)
        return t

    def load_stored(self, name: str, *, view: bool = False) -> "torch.Tensor":
        t = self.inner.load_stored(name, view=view)
        self.check(self.model, name, t)
        return t

    def __getattr__(self, attr: str) -> Any:  # a source's own helpers
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)


def checked_inputs(models: Mapping[str, ModelSource | None], check: InputCheck | None
                   ) -> Mapping[str, ModelSource | None]:
    """The models, each read through the check (unchanged when there is none: mode "off")."""
    if check is None:
        return models
    return {k: m if m is None else CheckedInput(m, k, check) for k, m in models.items()}
