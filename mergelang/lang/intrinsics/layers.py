"""Intrinsics for layer-wise schedules (used by recipes translated from mergekit configs).

- `gradient(values, t)`: mergekit's "gradient" parameters: a list of numbers spread evenly over
  t in [0, 1] with linear interpolation (`[0, 1]` at t = 0.25 gives 0.25; `[0, 0.5, 1]` at t = 0.75
  gives 0.75). A single number is returned unchanged.
- `num_layers(model)`: the number of transformer blocks of a model, counted from its tensor names
  (`...layers.N.`, `...h.N.`, `...blocks.N.`), read from the checkpoint header only.
"""

from __future__ import annotations

import re

from mergelang.diagnostics import Span
from mergelang.lang.intrinsics.registry import Elab, intrinsic
from mergelang.lang.values import Const, ListV, ModelV, Value, is_number

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def gradient_value(values: list[float], t: float) -> float:
    """mergekit's `evaluate_setting` for a list of numbers at t in [0, 1]."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


@intrinsic("gradient", "values", "t",
           doc="mergekit gradient: the list `values` spread evenly over t in [0, 1], linearly "
               "interpolated (a number is returned as is)")
def _gradient(el: Elab, a: dict[str, Value], span: Span) -> Value:
    values, t = a["values"], a["t"]
    if not is_number(t):
        raise el.error("E201", f"gradient's `t` must be a number known at compile time, got "
                       f"{t.describe()}", span)
    tv = float(t.value)  # type: ignore[union-attr]
    if not 0.0 <= tv <= 1.0:
        raise el.error("E203", f"gradient's `t` must be between 0 and 1, got {tv}", span,
                       "t = i / (num_layers - 1) runs from 0 at the first layer to 1 at the last")
    if is_number(values):
        return values
    if not (isinstance(values, ListV) and values.scalars and values.items
            and all(is_number(v) for v in values.items)):
        raise el.error("E201", f"gradient needs a non-empty list of numbers, got "
                       f"{values.describe()}", span)
    return Const(gradient_value([float(v.value) for v in values.items], tv))  # type: ignore[union-attr]


@intrinsic("num_layers", "model",
           doc="number of transformer blocks of a model, from its tensor names (headers only)")
def _num_layers(el: Elab, a: dict[str, Value], span: Span) -> Value:
    m = a["model"]
    if not isinstance(m, ModelV):
        raise el.error("E201", f"num_layers needs a model, got {m.describe()}", span)
    source = el.models.get(m.name)
    if source is None:
        from mergelang.lang.values import Poisoned

        if not el.tensor:
            raise el.error("E201", "num_layers(model) can be used in merge rules only (models "
                           "are opened after params are evaluated)", span)

        raise Poisoned()
    found = {int(x.group(1)) for name in source.tensors() for x in [LAYER_RE.search(name)] if x}
    if not found:
        raise el.error("E203", f"model `{m.name}` has no numbered layers (no `layers.N.` in its "
                       "tensor names)", span)
    return Const(max(found) + 1)
