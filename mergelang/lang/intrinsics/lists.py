"""List builders for comprehensions and folds: range, zip, enumerate, reduce (all at compile
time; the lists they build are bounded like comprehensions, lang/comprehend.py)."""

from __future__ import annotations

from mergelang.diagnostics import Span, did_you_mean
from mergelang.lang.comprehend import MAX_COMP_ITEMS, items_of
from mergelang.lang.intrinsics.registry import Elab, intrinsic
from mergelang.lang.values import Const, ListV, Value


def _int(el: Elab, v: Value, what: str, span: Span) -> int:
    if isinstance(v, Const) and isinstance(v.value, int) and not isinstance(v.value, bool):
        return v.value
    if isinstance(v, Const) and isinstance(v.value, float) and v.value.is_integer():
        return int(v.value)
    raise el.error("E201", f"{what} must be a whole number known at compile time, got "
                   f"{v.describe()}", span)


@intrinsic("range", "start", ("stop", None), ("step", 1),
           doc="the list [start, start + step, ...] below stop (range(n): 0 .. n - 1), at compile time")
def _range(el: Elab, a: dict[str, Value], span: Span) -> Value:
    start = _int(el, a["start"], "range's start", span)
    if isinstance(a["stop"], Const) and a["stop"].value is None:
        start, stop = 0, start
    else:
        stop = _int(el, a["stop"], "range's stop", span)
    step = _int(el, a["step"], "range's step", span)
    if step == 0:
        raise el.error("E203", "range's step must not be 0", span)
    n = len(range(start, stop, step))
    if n > MAX_COMP_ITEMS:
        raise el.error("E113", f"range of {n} items is longer than {MAX_COMP_ITEMS}", span)
    return ListV(tuple(Const(i) for i in range(start, stop, step)))


@intrinsic("zip", "a", "b", ("c", None), ("d", None),
           doc="pairs (triples, ...) of items at the same position: zip([1, 2], [a, b]) is "
               "[[1, a], [2, b]]; the lists must have the same length")
def _zip(el: Elab, a: dict[str, Value], span: Span) -> Value:
    lists = [items_of(el, v, span) for k, v in a.items()
             if not (k in ("c", "d") and isinstance(v, Const) and v.value is None)]
    lengths = {len(x) for x in lists}
    if len(lengths) > 1:
        raise el.error("E202", f"zip of lists of different lengths ({', '.join(str(len(x)) for x in lists)})",
                       span)
    return ListV(tuple(ListV(tuple(x[i] for x in lists)) for i in range(len(lists[0]))))


@intrinsic("enumerate", "x", ("start", 0),
           doc="[[start, x[0]], [start + 1, x[1]], ...]: positions with items")
def _enumerate(el: Elab, a: dict[str, Value], span: Span) -> Value:
    start = _int(el, a["start"], "enumerate's start", span)
    return ListV(tuple(ListV((Const(start + i), v)) for i, v in enumerate(items_of(el, a["x"], span))))


@intrinsic("reduce", "fn", "x", ("init", None),
           doc="a fold: acc = init (or x[0]), then acc = fn(acc, item) for each item; fn is the "
               "name of a recipe or stdlib function of two arguments, as a string")
def _reduce(el: Elab, a: dict[str, Value], span: Span) -> Value:
    name = a["fn"]
    if not (isinstance(name, Const) and isinstance(name.value, str)):
        raise el.error("E201", f"reduce's `fn` must be a function name (a string), got "
                       f"{name.describe()}", span)
    fn = el.fns.get(name.value)
    if fn is None:
        from mergelang.lang.intrinsics.registry import INTRINSICS

        if name.value in INTRINSICS:
            raise el.error("E201", f"reduce folds with a recipe or standard-library function, and "
                           f"`{name.value}` is a built-in", span,
                           f"wrap it: fn f(acc, x) {{ return {name.value}(acc, x) }}, then reduce(\"f\", ...)")
        raise el.error("E102", f"unknown function `{name.value}`", span,
                       did_you_mean(name.value, el.fns))
    params = [p.name for p in fn.params]
    if len(params) < 2 or any(p.default is None for p in fn.params[2:]):
        raise el.error("E105", f"reduce needs a function of two arguments; `{fn.name}` takes "
                       f"{len(params)}", span)
    items = list(items_of(el, a["x"], span))
    init = a["init"]
    if isinstance(init, Const) and init.value is None:
        if not items:
            raise el.error("E203", "reduce of an empty list needs `init`", span)
        acc, items = items[0], items[1:]
    else:
        acc = init
    for item in items:
        acc = el.apply(fn, {params[0]: acc, params[1]: item}, span)
    return acc
