"""Reading a tensor by another name: `tensor(model, name)` and `str(x)` to build names.

    # modality-specific -> modality-agnostic (vl-merging): the text tower's layer i merged into
    # the language model's layer i, though the two checkpoints name them differently
    re"model\\.layers\\.(?P<i>\\d+)\\.(?P<rest>.+)" =>
        linear([lm, tensor(vlm, "language_model.model.layers." + str(i) + "." + rest)])
    # experts re-ordered: expert e of the output is expert perm[e] of `b`
    re"model\\.layers\\.(?P<i>\\d+)\\.mlp\\.experts\\.(?P<e>\\d+)\\.(?P<w>.+)" =>
        tensor(b, "model.layers." + str(i) + ".mlp.experts." + str(perm[e]) + "." + w)

The name is a string known at compile time; the tensor must exist (E302, with a suggestion) and
is read once however many outputs use it.
"""

from __future__ import annotations

from mergelang.diagnostics import Span
from mergelang.lang.intrinsics.registry import Elab, intrinsic
from mergelang.lang.values import Const, ModelV, TensorV, Value, is_number


@intrinsic("tensor", "model", "name",
           doc="tensor `name` of `model` (a name known at compile time, e.g. built with + and "
               "str()), instead of the tensor being merged: renamed layers, re-ordered experts")
def _tensor(el: Elab, a: dict[str, Value], span: Span) -> Value:
    el.state.no_template = True  # a name of its own: not replayed for other tensors (lang/templates.py)
    m, name = a["model"], a["name"]
    if not isinstance(m, ModelV):
        raise el.error("E201", f"tensor's first argument must be a model, got {m.describe()}", span)
    if not (isinstance(name, Const) and isinstance(name.value, str)):
        raise el.error("E201", f"tensor's name must be a string known at compile time, got "
                       f"{name.describe()}", span)
    return TensorV(el.load(m.name, name.value, span))


@intrinsic("str", "x", doc="a number (an integer without a decimal point) or string as a string, "
                           "for building tensor names: \"layers.\" + str(i)")
def _str(el: Elab, a: dict[str, Value], span: Span) -> Value:
    x = a["x"]
    if isinstance(x, Const) and isinstance(x.value, str):
        return x
    if is_number(x):
        v = x.value  # type: ignore[union-attr]
        return Const(str(int(v)) if float(v) == int(v) else repr(float(v)))
    raise el.error("E201", f"str needs a number or a string known at compile time, got "
                   f"{x.describe()}", span)
