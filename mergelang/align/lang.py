"""The `align(model, to = ref, method = "weight_matching", seed = 0)` intrinsic.

Evaluating `align(...)` registers a derived model, named after the call (e.g.
`align(other, to=base)`), in the compilation's model table: an `AlignedSource` that reads `other`
and permutes each tensor on load. The result is a `ModelV` for that name, so an aligned model is
usable wherever a model is (in lists, functions, as the input of another `align`). Everything
checked here comes from config.json and safetensors headers; the permutations themselves are
solved in the model-level stage before streaming (`AlignedSource.prepare`, called by `execute`).
"""

from __future__ import annotations

from typing import Any

from ..diagnostics import Span
from ..intrinsics import intrinsic
from ..values import Const, ModelV, Value
from .solve import METHODS
from .source import AlignedSource
from .spec import SpecError, spec_for

DOC = ("the model permuted (hidden units, heads) to match `to`, for merging: "
       "method = \"weight_matching\" | \"ot\"; permutations are applied on load")


def derived_name(model: str, to: str, method: str, seed: int) -> str:
    extra = "" if method == "weight_matching" else f", method={method}"
    extra += "" if seed == 0 else f", seed={seed}"
    return f"align({model}, to={to}{extra})"


@intrinsic("align", "model", "to", ("method", "weight_matching"), ("seed", 0), doc=DOC)
def _align(el: Any, a: dict[str, Value], span: Span) -> Value:
    from ..elaborate import Poisoned

    model, to, method, seed = a["model"], a["to"], a["method"], a["seed"]
    for what, v in (("model", model), ("to", to)):
        if not isinstance(v, ModelV):
            raise el.error("E601", f"align's `{what}` must be a model, got {v.describe()}", span,
                           "align works on whole checkpoints, e.g. align(other, to = base)")
    if not (isinstance(method, Const) and method.value in METHODS):
        got = method.value if isinstance(method, Const) else method.describe()
        raise el.error("E602", f"unknown alignment method {got!r}", span,
                       "method = " + " | ".join(f'"{m}"' for m in METHODS))
    if not (isinstance(seed, Const) and isinstance(seed.value, int) and not isinstance(seed.value, bool)):
        raise el.error("E201", f"align's `seed` must be an integer, got {seed.describe()}", span)
    name = derived_name(model.name, to.name, method.value, seed.value)  # type: ignore[union-attr]
    if name in el.models:
        return ModelV(name, span)
    if not el.tensor:
        raise el.error("E601", "align(...) makes a model, so it can only be used in merge rules "
                       "and functions, not in a param", span)
    src, ref = el.models.get(model.name), el.models.get(to.name)  # type: ignore[union-attr]
    if src is None or ref is None:
        raise Poisoned()  # a model failed to open: already reported
    shapes = {k: v.shape for k, v in src.tensors().items()}
    ref_shapes = {k: v.shape for k, v in ref.tensors().items()}
    try:
        spec = spec_for(src.config() or ref.config(), shapes)
    except SpecError as exc:
        raise el.error("E603", f"cannot align `{model.name}`: {exc}", span,  # type: ignore[union-attr]
                       "built-in specs: Llama, Mistral, Qwen2/3 and GPT-2 (from config.json)") from None
    problems = spec.check(shapes)
    if problems:
        raise el.error("E603", f"cannot align `{model.name}`: the {spec.arch} spec does not fit its "  # type: ignore[union-attr]
                       f"tensors: {problems[0]}", span, "is config.json the model's own?")
    for t in spec.tensors():
        if ref_shapes.get(t) != shapes[t]:
            got = "missing" if t not in ref_shapes else f"shape {list(ref_shapes[t])}"
            raise el.error("E604", f"cannot align `{model.name}` to `{to.name}`: tensor `{t}` has shape "  # type: ignore[union-attr]
                           f"{list(shapes[t])} in `{model.name}` but is {got} in `{to.name}`", span,  # type: ignore[union-attr]
                           "alignment needs two models of the same architecture and size")
    el.models[name] = AlignedSource(name, src, ref, spec, method.value, seed.value)
    return ModelV(name, span)
