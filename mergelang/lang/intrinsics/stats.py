"""Model-wide statistics as intrinsics: `model_sum`, `model_topk_value`, `model_quantile_value`
elaborate into MODEL_STAT nodes; `mergelang.passes.stats` plans the passes that compute them."""

from __future__ import annotations


from mergelang.diagnostics import Span
from mergelang.ir.ops import Attrs, Op
from mergelang.lang.intrinsics.registry import Elab, intrinsic
from mergelang.lang.values import TensorV, Value, is_number


# ---------------------------------------------------------------- the intrinsics
def _stat(el: Elab, kind: str, x: Value, fraction: float, span: Span, offset: int = 0) -> Value:
    nid = el.to_node(x, span)
    chain = [f.call_span.location() + f.tag for f in el.stack] + [span.location()]
    where = " > ".join(chain)
    models = el.graph.node(nid).type.models
    frac = f", {fraction:g}" if kind != "sum" else ""
    frac += f", {offset:+d}" if offset else ""
    stack = f" x{models}" if models else ""
    key = f"model_{kind}(…{frac}){stack} @ {where}"
    extra = {"offset": offset} if offset else {}
    return TensorV(el.make(Op.MODEL_STAT, [nid], Attrs(kind=kind, key=key, fraction=fraction,
                                                       tensor=el.tensor, **extra), span))


@intrinsic("model_sum", "x",
           doc="sum of x over every entry of every tensor routed to this call site: one number "
               "per model for a stack (the statistic is computed by a pass before the merge)")
def _model_sum(el: Elab, a: dict[str, Value], span: Span) -> Value:
    return _stat(el, "sum", a["x"], 0.0, span)


@intrinsic("model_topk_value", "x", "fraction",
           doc="per model, the threshold t such that x >= t keeps the top `fraction` of the "
               "entries of every tensor routed to this call site: the (N - int(N * fraction))-th "
               "smallest of the N entries (the smallest one when that is 0), as original TIES")
def _model_topk_value(el: Elab, a: dict[str, Value], span: Span) -> Value:
    f = a["fraction"]
    if not (is_number(f) and 0.0 <= float(f.value) <= 1.0):  # type: ignore[union-attr]
        raise el.error("E220", f"model_topk_value's fraction must be a number in [0, 1] known at "
                       f"compile time, got {f.describe()}", span, "e.g. 0.2 keeps the top 20%")
    return _stat(el, "topk_value", a["x"], float(f.value), span)  # type: ignore[union-attr]


@intrinsic("model_quantile_value", "x", "fraction", ("offset", 0),
           doc="per model, the entry at 0-based position int(N * fraction) + offset (clamped to "
               "0..N-1) of the ascending sort of the N entries of every tensor routed to this "
               "call site (torch.sort(x)[int(d * fraction) + offset], as PCB-merging's clamp)")
def _model_quantile_value(el: Elab, a: dict[str, Value], span: Span) -> Value:
    f, off = a["fraction"], a["offset"]
    if not (is_number(f) and 0.0 <= float(f.value) <= 1.0):  # type: ignore[union-attr]
        raise el.error("E220", f"model_quantile_value's fraction must be a number in [0, 1] known "
                       f"at compile time, got {f.describe()}", span, "e.g. 0.5 is the median")
    if not (is_number(off) and float(off.value) == int(off.value)):  # type: ignore[union-attr]
        raise el.error("E230", f"model_quantile_value's offset must be an integer known at "
                       f"compile time, got {off.describe()}", span, "e.g. offset = -1")
    return _stat(el, "quantile_value", a["x"], float(f.value), span,  # type: ignore[union-attr]
                 int(off.value))  # type: ignore[union-attr]
