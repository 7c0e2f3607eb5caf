"""Built-in functions (intrinsics): the primitives stdlib methods are written with.

Each intrinsic has a signature (checked like a recipe function's) and an implementation that
either computes at compile time (numbers, lists of numbers) or adds graph nodes.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from mergelang.diagnostics import Span
from mergelang.ir.ops import REDUCE_KINDS, SCOPES, Attrs, Op, ParamRef
from mergelang.lang.loops import MAX_UNROLL
from mergelang.lang.values import REQUIRED, Const, Deferred, ListV, ModelV, TensorV, Value, is_number

from mergelang.lang.intrinsics.registry import INTRINSICS, Elab, Impl, Intrinsic, intrinsic  # noqa: F401


# ---------------------------------------------------------------- elementwise math
def _sign(x: float) -> float:
    return float((x > 0) - (x < 0))


_UNARY: dict[str, tuple[Op, Callable[[float], float], str]] = {
    "abs": (Op.ABS, abs, "absolute value"),
    "sign": (Op.SIGN, _sign, "-1, 0 or +1"),
    "sqrt": (Op.SQRT, math.sqrt, "square root"),
    "exp": (Op.EXP, math.exp, "e to the x"),
    "log": (Op.LOG, math.log, "natural logarithm"),
    "sin": (Op.SIN, math.sin, "sine"),
    "cos": (Op.COS, math.cos, "cosine"),
    "acos": (Op.ACOS, math.acos, "arc cosine"),
    "tanh": (Op.TANH, math.tanh, "hyperbolic tangent"),
    "floor": (Op.FLOOR, math.floor, "largest integer <= x"),
    "round": (Op.ROUND, round, "nearest integer (halves to even, as Python and torch)"),
}


def _unary_impl(op: Op, py: Callable[[float], float]) -> Impl:
    return lambda el, a, span: el.unary(op, a["x"], span, py)


for _name, (_op, _py, _doc) in _UNARY.items():
    intrinsic(_name, "x", doc=f"elementwise {_doc}")(_unary_impl(_op, _py))


def _bounds(el: Elab, v: Value, what: str, span: Span) -> float | None:
    if isinstance(v, Const) and v.value is None:
        return None
    if not is_number(v):
        raise el.error("E201", f"clamp's `{what}` must be a number known at compile time, got "
                       f"{v.describe()}", span)
    return float(v.value)  # type: ignore[union-attr]


@intrinsic("clamp", "x", ("min", None), ("max", None), doc="limit x to [min, max]")
def _clamp(el: Elab, a: dict[str, Value], span: Span) -> Value:
    lo, hi = _bounds(el, a["min"], "min", span), _bounds(el, a["max"], "max", span)
    def py(x: float) -> float:
        return min(max(x, lo if lo is not None else x), hi if hi is not None else x)
    return el.unary(Op.CLAMP, a["x"], span, py, lo=lo, hi=hi)


def _binary(op: Op, py: Callable[[float, float], float]) -> Impl:
    def impl(el: Elab, a: dict[str, Value], span: Span) -> Value:
        x, y = a["a"], a["b"]
        if is_number(x) and is_number(y):
            if isinstance(x.value, Deferred) or isinstance(y.value, Deferred):  # type: ignore[union-attr]
                return Const(Deferred(("f2", py, Deferred.leaf(x.value), Deferred.leaf(y.value))))  # type: ignore[union-attr]
            return Const(py(x.value, y.value))  # type: ignore[union-attr]
        if (isinstance(x, ListV) and x.scalars and (is_number(y) or isinstance(y, ListV) and y.scalars)) \
                or (isinstance(y, ListV) and y.scalars and is_number(x)):  # per-model numbers
            xs = x.items if isinstance(x, ListV) else None
            ys = y.items if isinstance(y, ListV) else None
            n = len(xs if xs is not None else ys)  # type: ignore[arg-type]
            if xs is not None and ys is not None and len(xs) != len(ys):
                raise el.error("E202", f"lists of different lengths ({len(xs)} and {len(ys)})", span)
            return ListV(tuple(impl(el, {"a": xs[i] if xs else x, "b": ys[i] if ys else y}, span)
                               for i in range(n)))
        return TensorV(el.make(op, [el.to_node(x, span), el.to_node(y, span)], Attrs(), span))
    return impl


intrinsic("minimum", "a", "b", doc="elementwise minimum")(_binary(Op.MINIMUM, min))
intrinsic("maximum", "a", "b", doc="elementwise maximum")(_binary(Op.MAXIMUM, max))


@intrinsic("where", "cond", "a", "b", doc="elementwise choice: a where cond is true, else b")
def _where(el: Elab, a: dict[str, Value], span: Span) -> Value:
    cond = a["cond"]
    if isinstance(cond, Const):
        if not isinstance(cond.value, bool):
            raise el.error("E201", f"where's condition must be a bool, got {cond.describe()}", span)
        return a["a"] if cond.value else a["b"]
    if isinstance(cond, ListV) and all(isinstance(c, Const) and isinstance(c.value, bool)
                                       for c in cond.items) and \
            all(is_number(v) or isinstance(v, ListV) and v.scalars and len(v.items) == len(cond.items)
                for v in (a["a"], a["b"])):  # per-model numbers known at compile time: a list
        def pick(v: Value, i: int) -> Value:
            return v.items[i] if isinstance(v, ListV) else v
        return ListV(tuple(pick(a["a"], i) if c.value else pick(a["b"], i)  # type: ignore[union-attr]
                           for i, c in enumerate(cond.items)))
    args = [el.to_node(v, span) for v in (cond, a["a"], a["b"])]
    return TensorV(el.make(Op.WHERE, args, Attrs(), span))


@intrinsic("lerp", "a", "b", "t", doc="linear interpolation a + t (b - a)")
def _lerp(el: Elab, a: dict[str, Value], span: Span) -> Value:
    args = [el.to_node(a[k], span) for k in ("a", "b", "t")]
    return TensorV(el.make(Op.LERP, args, Attrs(), span))


@intrinsic("div", "a", "b", ("on_zero", None),
           doc="a / b; where b == 0 the result is on_zero (when given)")
def _div(el: Elab, a: dict[str, Value], span: Span) -> Value:
    x, y, z = a["a"], a["b"], a["on_zero"]
    if isinstance(z, Const) and z.value is None:
        return el.binop("div", x, y, span)
    if is_number(y):
        return z if y.value == 0 else el.binop("div", x, y, span)  # type: ignore[union-attr]
    zero = el.binop("eq", y, Const(0.0), span)
    safe = _where(el, {"cond": zero, "a": Const(1.0), "b": y}, span)
    return _where(el, {"cond": zero, "a": z, "b": el.binop("div", x, safe, span)}, span)


# ---------------------------------------------------------------- reductions
def _is_stacked(el: Elab, v: Value) -> bool:
    if isinstance(v, ListV):
        return True
    if isinstance(v, TensorV):
        return el.graph.node(v.nid).type.stacked
    return False


def _scope(el: Elab, v: Value, over: Value, span: Span, allowed: tuple[str, ...] = SCOPES) -> str:
    if isinstance(over, Const) and over.value is None:
        return "models" if _is_stacked(el, v) else "tensor"
    if not (isinstance(over, Const) and over.value in allowed):
        raise el.error("E203", f"unknown scope {getattr(over, 'value', over)!r}", span,
                       "over = " + " | ".join(f'"{s}"' for s in allowed))
    return over.value  # type: ignore[return-value]


def _differentiable(py: Callable[[list[Any]], Any], kind: str) -> Callable[[list[Any]], Any]:
    """`py` over numbers; over torch tensors (`learn` evaluates param expressions with them) the
    same reduction in torch, so the gradient flows through it (math.fsum would drop it)."""
    def reduce(xs: list[Any]) -> Any:
        if not any(type(x).__module__.startswith("torch") for x in xs):
            return py(xs)
        import torch

        t = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in xs])
        return {"sum": t.sum, "mean": t.mean, "max": t.max, "min": t.min, "count": (t != 0).float().sum,
                "l1": t.abs().sum, "l2": lambda: t.pow(2).sum().sqrt()}[kind]()
    return reduce


_PY_REDUCE: dict[str, Callable[[list[float]], float]] = {k: _differentiable(f, k) for k, f in {
    "sum": math.fsum, "mean": lambda xs: math.fsum(xs) / len(xs), "max": max, "min": min,
    "count": lambda xs: float(sum(1 for x in xs if x)), "l1": lambda xs: math.fsum(abs(x) for x in xs),
    "l2": lambda xs: math.sqrt(math.fsum(x * x for x in xs)),
}.items()}


def _reduce_impl(kind: str) -> Impl:
    def impl(el: Elab, a: dict[str, Value], span: Span) -> Value:
        x = a["x"]
        over = _scope(el, x, a["over"], span)
        if isinstance(x, ListV) and x.scalars and over in ("models", "tensor") and x.items:
            vals = [i.value for i in x.items]  # type: ignore[union-attr]
            if any(isinstance(v, Deferred) for v in vals):  # run-time params: folded when given
                return Const(Deferred(("fl", _PY_REDUCE[kind], tuple(Deferred.leaf(v) for v in vals))))
            return Const(_PY_REDUCE[kind](vals))
        if is_number(x) and over == "tensor":
            return Const(_PY_REDUCE[kind]([x.value]))  # type: ignore[union-attr]
        return TensorV(el.make(Op.REDUCE, [el.to_node(x, span)], Attrs(kind=kind, over=over), span))
    return impl


_REDUCE_DOCS = {"sum": "sum", "mean": "mean", "max": "maximum", "min": "minimum",
                "count": "number of true (non-zero) entries", "l1": "L1 norm (sum of |x|)",
                "l2": "L2 norm"}
for _kind in REDUCE_KINDS:
    intrinsic(_kind, "x", ("over", None),
              doc=f"{_REDUCE_DOCS[_kind]} over a scope: \"models\" (default for stacks), "
                  "\"tensor\", \"rows\" or \"cols\"")(_reduce_impl(_kind))
intrinsic("norm", "x", ("over", None), doc="L2 norm over a scope (same as l2)")(_reduce_impl("l2"))


@intrinsic("dot", "a", "b", ("over", "tensor"), doc="inner product over a scope")
def _dot(el: Elab, a: dict[str, Value], span: Span) -> Value:
    over = _scope(el, a["a"], a["over"], span)
    args = [el.to_node(a[k], span) for k in ("a", "b")]
    return TensorV(el.make(Op.DOT, args, Attrs(over=over), span))


@intrinsic("row_kl", "x", "y", ("eps", 1e-8),
           doc="KL(p || q) per row (last axis; a 1-D tensor is one row), p and q the softmax of "
               "the rows of x and y plus eps: sum p log(p / q), computed in float64 (a float32 "
               "sum over nearly equal rows cancels to noise), one value per row")
def _row_kl(el: Elab, a: dict[str, Value], span: Span) -> Value:
    eps = a["eps"]
    if not (is_number(eps) and float(eps.value) >= 0):  # type: ignore[union-attr]
        raise el.error("E203", f"row_kl's eps must be a number >= 0 known at compile time, got "
                       f"{eps.describe()}", span)
    args = [el.to_node(a[k], span) for k in ("x", "y")]
    return TensorV(el.make(Op.ROW_KL, args, Attrs(over="rows", eps=float(eps.value)), span))  # type: ignore[union-attr]


@intrinsic("quantile", "x", "q", ("over", None),
           doc="the q-quantile over a scope without interpolation: the entry at position "
               "floor(q (n - 1)) of the n values sorted ascending (numpy's method \"lower\"); "
               "q in [0, 1] known at compile time")
def _quantile(el: Elab, a: dict[str, Value], span: Span) -> Value:
    q = a["q"]
    if not (is_number(q) and 0 <= q.value <= 1):  # type: ignore[union-attr]
        raise el.error("E203", f"quantile's q must be a number in [0, 1] known at compile time, "
                       f"got {getattr(q, 'value', q.describe())}", span)
    over = _scope(el, a["x"], a["over"], span)
    return TensorV(el.make(Op.REDUCE, [el.to_node(a["x"], span)],
                           Attrs(kind="quantile", q=float(q.value), over=over), span))  # type: ignore[union-attr]


@intrinsic("topk_mask", "x", "density", ("over", "tensor"),
           doc="true for exactly int(density * n) largest entries per tensor or row "
               "(ties: lowest index first)")
def _topk_mask(el: Elab, a: dict[str, Value], span: Span) -> Value:
    d = a["density"]
    refs = _param_refs(d)
    if refs is not None:  # a run-time param (tune): its number, filled per run
        density, values = refs, []
    elif is_number(d):
        density = float(d.value)  # type: ignore[union-attr]
        values = [density]
    elif isinstance(d, ListV) and d.scalars:
        density = tuple(float(i.value) for i in d.items)  # type: ignore[union-attr]
        values = list(density)
    else:
        raise el.error("E201", f"density must be a number (or one per model) known at compile time, "
                       f"got {d.describe()}", span)
    for v in values:
        if not 0.0 <= v <= 1.0:
            raise el.error("E203", f"density must be between 0 and 1, got {v}", span)
    over = _scope(el, a["x"], a["over"], span, ("tensor", "rows"))
    return TensorV(el.make(Op.TOPK_MASK, [el.to_node(a["x"], span)],
                           Attrs(density=density, over=over), span))


def _param_refs(v: Value) -> Any:
    """A run-time density as ParamRef attrs (one, or one per model; passes/params.py), else
    None (a list mixing numbers and run-time params refers to the numbers as constants)."""
    if isinstance(v, Const) and isinstance(v.value, Deferred):
        return ParamRef(v.value.tree)
    if isinstance(v, ListV) and any(isinstance(i, Const) and isinstance(i.value, Deferred) for i in v.items) \
            and all(is_number(i) for i in v.items):
        return tuple(ParamRef(i.value.tree if isinstance(i.value, Deferred) else ("c", i.value))  # type: ignore[union-attr]
                     for i in v.items)
    return None


@intrinsic("known", "x", doc="true when x is known at compile time (a number, string, bool, none "
           "or list of them), false for a tensor or a run-time param (tune, learn); use it only "
           "to pick between equal computations (a shortcut), or a tuned merge differs from a run")
def _known(el: Elab, a: dict[str, Value], span: Span) -> Value:
    def known(v: Value) -> bool:
        if isinstance(v, Const):
            return not isinstance(v.value, Deferred)
        return isinstance(v, ListV) and all(known(i) for i in v.items)
    return Const(known(a["x"]))


# ---------------------------------------------------------------- lists and models
def _count(el: Elab, v: Value, span: Span) -> int:
    if isinstance(v, ListV):
        return len(v.items)
    if isinstance(v, TensorV) and el.graph.node(v.nid).type.stacked:
        return el.graph.node(v.nid).type.models
    raise el.error("E201", f"expected a list, got {v.describe()}", span)


@intrinsic("len", "x", doc="number of items in a list (or models in a stack)")
def _len(el: Elab, a: dict[str, Value], span: Span) -> Value:
    return Const(_count(el, a["x"], span))


@intrinsic("per_model", "weights", "models",
           doc="one weight per model: none -> all 1, a number -> repeated, a list -> checked")
def _per_model(el: Elab, a: dict[str, Value], span: Span) -> Value:
    n = _count(el, a["models"], span)
    w = a["weights"]
    if isinstance(w, Const) and w.value is None:
        return ListV(tuple(Const(1.0) for _ in range(n)))
    if is_number(w):
        return ListV(tuple(w for _ in range(n)))
    if isinstance(w, ListV):
        if len(w.items) != n:
            raise el.error("E203", f"{len(w.items)} weights for {n} models", span,
                           "give one weight per model")
        return w
    return w  # a tensor of weights (e.g. per-element); shapes are checked where it is used


@intrinsic("model_index", "models",
           doc="the positions of a list or stack of n models: the list [0, 1, ..., n - 1]")
def _model_index(el: Elab, a: dict[str, Value], span: Span) -> Value:
    return ListV(tuple(Const(i) for i in range(_count(el, a["models"], span))))


@intrinsic("numel", "x", doc="number of elements of the tensor being merged")
def _numel(el: Elab, a: dict[str, Value], span: Span) -> Value:
    x = a["x"]
    if isinstance(x, ModelV) or isinstance(x, TensorV):
        ty = el.graph.node(el.to_node(x, span)).type
        n = 1
        for d in ty.shape:
            n *= d
        return Const(n)
    raise el.error("E201", f"numel needs a tensor, got {x.describe()}", span)


@intrinsic("checked", "value", "cond", ("message", "check failed"),
           doc="value, after checking cond (at compile time when it is known, else at run time)")
def _checked(el: Elab, a: dict[str, Value], span: Span) -> Value:
    cond, msg = a["cond"], a["message"]
    text = msg.value if isinstance(msg, Const) and isinstance(msg.value, str) else "check failed"
    if isinstance(cond, Const):
        if cond.value is not True:
            raise el.error("E204", text, span)
        return a["value"]
    node = el.make(Op.ASSERT, [el.to_node(a["value"], span), el.to_node(cond, span)],
                   Attrs(message=text), span)
    return TensorV(node)


@intrinsic("fail", "message", doc="stop with an error (use in a compile-time `if`)")
def _fail(el: Elab, a: dict[str, Value], span: Span) -> Value:
    msg = a["message"]
    raise el.error("E203", msg.value if isinstance(msg, Const) else "failed", span)


# ---------------------------------------------------------------- order statistics, randomness
def _bool_const(el: Elab, v: Value, what: str, span: Span) -> bool:
    if not (isinstance(v, Const) and isinstance(v.value, bool)):
        raise el.error("E201", f"`{what}` must be true or false, got {v.describe()}", span)
    return v.value


@intrinsic("rank", "x", ("over", "tensor"), ("descending", False), ("normalized", False),
           doc="0-based rank of each entry within its tensor (per model) or row; ties: lowest "
               "index first; normalized: rank / (n - 1) in [0, 1] (0 when n = 1)")
def _rank(el: Elab, a: dict[str, Value], span: Span) -> Value:
    over = _scope(el, a["x"], a["over"], span, ("tensor", "rows"))
    attrs = Attrs(over=over, descending=_bool_const(el, a["descending"], "descending", span),
                  normalized=_bool_const(el, a["normalized"], "normalized", span))
    return TensorV(el.make(Op.RANK, [el.to_node(a["x"], span)], attrs, span))


def _count_attr(el: Elab, v: Value, what: str, span: Span) -> int | tuple[int, ...]:
    if is_number(v) and float(v.value) == int(v.value):  # type: ignore[union-attr]
        return int(v.value)  # type: ignore[union-attr]
    if isinstance(v, ListV) and v.scalars and all(float(i.value) == int(i.value)  # type: ignore[union-attr]
                                                 for i in v.items):
        return tuple(int(i.value) for i in v.items)  # type: ignore[union-attr]
    raise el.error("E201", f"band_mask's `{what}` must be an integer (or one per model) known at "
                   f"compile time, got {v.describe()}", span)


@intrinsic("band_mask", "x", "lo", "hi", ("over", "tensor"),
           doc="true for the entries whose descending rank r (ties: lowest index first) has "
               "lo <= r < hi; lo and hi are counts, one per model or shared")
def _band_mask(el: Elab, a: dict[str, Value], span: Span) -> Value:
    over = _scope(el, a["x"], a["over"], span, ("tensor", "rows"))
    attrs = Attrs(lo=_count_attr(el, a["lo"], "lo", span), hi=_count_attr(el, a["hi"], "hi", span),
                  over=over)
    return TensorV(el.make(Op.BAND_MASK, [el.to_node(a["x"], span)], attrs, span))


@intrinsic("argmax_mask", "x", ("ties", "last"),
           doc="over the models of a stack: true at the one model with the largest entry "
               "(ties = \"last\": the later model wins, \"first\": the earlier)")
def _argmax_mask(el: Elab, a: dict[str, Value], span: Span) -> Value:
    ties = a["ties"]
    if not (isinstance(ties, Const) and ties.value in ("last", "first")):
        raise el.error("E203", f"ties must be \"last\" or \"first\", got {getattr(ties, 'value', ties)!r}",
                       span)
    return TensorV(el.make(Op.ARGMAX_MASK, [el.to_node(a["x"], span)],
                           Attrs(last=ties.value == "last"), span))


@intrinsic("bernoulli", "x", "p", ("seed", 0), ("stream", ""),
           doc="a random mask shaped like x, true with probability p (a number, one per model, or "
               "a tensor); counter-based (Philox4x32-10) stream keyed by (seed, tensor name, "
               "model index, stream, element index): identical on any device, run after run")
def _bernoulli(el: Elab, a: dict[str, Value], span: Span) -> Value:
    seed, stream = a["seed"], a["stream"]
    if not (isinstance(seed, Const) and isinstance(seed.value, int) and not isinstance(seed.value, bool)):
        raise el.error("E201", f"seed must be an integer known at compile time, got {seed.describe()}",
                       span)
    if not (isinstance(stream, Const) and isinstance(stream.value, str)):
        raise el.error("E201", f"stream must be a string, got {stream.describe()}", span)
    x = el.to_node(a["x"], span)
    p = el.to_node(a["p"], span)
    tx, tp = el.graph.node(x).type, el.graph.node(p).type
    if tp.stacked and len(tp.shape) < len(tx.shape):
        p = el.make(Op.RESHAPE, [p], Attrs(shape=(1,) * (len(tx.shape) - len(tp.shape)) + tp.shape),
                    span)
    return TensorV(el.make(Op.BERNOULLI, [x, p],
                           Attrs(seed=seed.value, tensor=el.tensor, stream=stream.value), span))


@intrinsic("pairs", "x", doc="all pairs i < j of a stack's models, as a list of two stacks "
                             "[x[i] for each pair, x[j] for each pair]")
def _pairs(el: Elab, a: dict[str, Value], span: Span) -> Value:
    n = _count(el, a["x"], span)
    if n < 2:
        raise el.error("E203", f"pairs needs at least 2 models, got {n}", span)
    x = el.to_node(a["x"], span)
    idx = [(i, j) for i in range(n) for j in range(i + 1, n)]
    pick = [[el.make(Op.INDEX, [x], Attrs(i=p[k]), span) for p in idx] for k in (0, 1)]
    return ListV(tuple(TensorV(el.make(Op.STACK, nodes, Attrs(), span)) for nodes in pick))


@intrinsic("ndim", "x", doc="number of dimensions of the tensor being merged")
def _ndim(el: Elab, a: dict[str, Value], span: Span) -> Value:
    x = a["x"]
    if isinstance(x, (ModelV, TensorV)):
        return Const(len(el.graph.node(el.to_node(x, span)).type.shape))
    raise el.error("E201", f"ndim needs a tensor, got {x.describe()}", span)


@intrinsic("topk_count_mask", "x", "k", ("fraction", 1.0), ("over", "tensor"),
           doc="true for the floor(k * fraction) largest entries per tensor (per model) or row; k "
               "may be computed at run time (e.g. a count), the product is taken in float64 "
               "(ties: lowest index first)")
def _topk_count_mask(el: Elab, a: dict[str, Value], span: Span) -> Value:
    over = _scope(el, a["x"], a["over"], span, ("tensor", "rows"))
    frac = a["fraction"]
    if not is_number(frac):
        raise el.error("E201", f"fraction must be a number known at compile time, got "
                       f"{frac.describe()}", span)
    x, k = el.to_node(a["x"], span), el.to_node(a["k"], span)
    return TensorV(el.make(Op.TOPK_COUNT_MASK, [x, k], Attrs(over=over, fraction=float(frac.value)),  # type: ignore[union-attr]
                           span))


@intrinsic("iterate", "fn", "init", "times", ("args", None),
           doc="bounded iteration: x = init, then x = fn(x, args...) up to `times` times (fn: the "
               "name of a recipe or stdlib function, times: a number known at compile time); runs "
               "as one loop node that stops early once a round leaves x unchanged")
def _iterate(el: Elab, a: dict[str, Value], span: Span) -> Value:
    name, times, extra = a["fn"], a["times"], a["args"]
    if not (isinstance(name, Const) and isinstance(name.value, str)):
        raise el.error("E201", f"iterate's `fn` must be a function name (a string), got "
                       f"{name.describe()}", span)
    fn = el.fns.get(name.value)
    if fn is None:
        from mergelang.diagnostics import did_you_mean
        raise el.error("E102", f"unknown function `{name.value}`", span, did_you_mean(name.value, el.fns))
    if not (is_number(times) and float(times.value) == int(times.value) and times.value >= 0):  # type: ignore[union-attr]
        raise el.error("E203", f"iterate's `times` must be a whole number >= 0 known at compile "
                       f"time, got {getattr(times, 'value', times.describe())}", span)
    args = list(extra.items) if isinstance(extra, ListV) else [] if _none(extra) else [extra]
    params = [p.name for p in fn.params]
    if len(args) + 1 > len(params):
        raise el.error("E105", f"`{fn.name}` takes {len(params)} arguments, iterate passes "
                       f"{len(args) + 1}", span)
    n = int(times.value)  # type: ignore[union-attr]
    if n >= 2:  # one LOOP node (compile time and memory independent of n), when the body allows
        from mergelang.lang.loops import build_loop

        looped = build_loop(el, fn, params, a["init"], args, n, span)
        if looped is not None:
            return looped
    if n > MAX_UNROLL:
        raise el.error("E203", f"iterate's body cannot run as a loop (it reads a model by name, "
                       f"computes model-wide statistics or changes the state's type), and "
                       f"{n} rounds is more than the {MAX_UNROLL} it unrolls", span,
                       "pass the models the body needs as arguments (args = [...])")
    x = a["init"]
    for i in range(n):
        x = el.apply(fn, dict(zip(params, [x, *args])), span, tag=f"#{i + 1}")
    return x


def _none(v: Value) -> bool:
    return isinstance(v, Const) and v.value is None


assert all(p.default is REQUIRED or not hasattr(p.default, "span")
           for i in INTRINSICS.values() for p in i.sig.params)

