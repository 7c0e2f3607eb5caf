"""Linear-algebra intrinsics: svd, polar, matmul, concat_models (2-D tensors, float32)."""

from __future__ import annotations

from typing import Any

from .diagnostics import Span
from .intrinsics import intrinsic
from .ops import Attrs, Op
from .values import Const, TensorV, Value, is_number


@intrinsic("svd", "x", "part", ("k", None),
           doc="thin float32 SVD of a 2-D tensor (per model of a stack): part \"U\", \"S\" or "
               "\"Vh\", keeping the k leading singular triplets (default: all)")
def _svd(el: Any, a: dict[str, Value], span: Span) -> Value:
    part, k = a["part"], a["k"]
    if not (isinstance(part, Const) and part.value in ("U", "S", "Vh")):
        raise el.error("E203", "svd's part must be \"U\", \"S\" or \"Vh\"", span)
    x = el.to_node(a["x"], span)
    shape = el.graph.node(x).type.shape
    if isinstance(k, Const) and k.value is None:
        kk = min(shape) if len(shape) == 2 else 1
    elif is_number(k) and float(k.value) == int(k.value):  # type: ignore[union-attr]
        kk = int(k.value)  # type: ignore[union-attr]
    else:
        raise el.error("E201", f"svd's k must be a whole number known at compile time, got "
                       f"{k.describe()}", span)
    return TensorV(el.make(Op.SVD, [x], Attrs(part=part.value, k=kk), span))


@intrinsic("polar", "x", doc="orthogonal polar factor U Vh of a 2-D tensor (float32 SVD)")
def _polar(el: Any, a: dict[str, Value], span: Span) -> Value:
    return TensorV(el.make(Op.POLAR, [el.to_node(a["x"], span)], Attrs(), span))


@intrinsic("matmul", "a", "b", doc="matrix product of 2-D tensors")
def _matmul(el: Any, a: dict[str, Value], span: Span) -> Value:
    return TensorV(el.make(Op.MATMUL, [el.to_node(a["a"], span), el.to_node(a["b"], span)],
                           Attrs(), span))


@intrinsic("concat_models", "x", ("axis", 0),
           doc="one tensor from a stack: the models' tensors concatenated along `axis`")
def _concat_models(el: Any, a: dict[str, Value], span: Span) -> Value:
    axis = a["axis"]
    if not (is_number(axis) and float(axis.value) == int(axis.value)):  # type: ignore[union-attr]
        raise el.error("E201", "concat_models' axis must be a whole number", span)
    return TensorV(el.make(Op.CONCAT_MODELS, [el.to_node(a["x"], span)],
                           Attrs(axis=int(axis.value)), span))  # type: ignore[union-attr]


@intrinsic("shape", "x", doc="the shape of the tensor being merged, as a list of numbers")
def _shape(el: Any, a: dict[str, Value], span: Span) -> Value:
    from .values import ListV, ModelV

    x = a["x"]
    if not isinstance(x, (ModelV, TensorV)):
        raise el.error("E201", f"shape needs a tensor, got {x.describe()}", span)
    return ListV(tuple(Const(d) for d in el.graph.node(el.to_node(x, span)).type.shape))
