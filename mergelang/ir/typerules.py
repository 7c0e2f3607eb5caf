"""Type rules: one small function per group of ops, giving a node's result type from its
attributes and argument types (raises TypeRuleError). `ir/ops.OP_INFO` names each op's rule;
`ops.infer` checks the arity and calls it."""

from __future__ import annotations

from typing import Any

from mergelang.ir.types import TType, broadcast_shapes, format_shape
from mergelang.ir.vocab import REDUCE_KINDS, SCOPES, SELECT_KINDS, STAT_KINDS, Attrs, Op, TypeRuleError

LOGICAL = frozenset({Op.AND, Op.OR, Op.NOT})
COMPARE = frozenset({Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE})


def _models(types: list[TType]) -> int | None:
    counts = {t.models for t in types if t.models is not None}
    if len(counts) > 1:
        a, b = sorted(counts)[:2]
        raise TypeRuleError(f"cannot combine a stack of {a} models with a stack of {b} models", "E202")
    return counts.pop() if counts else None


def broadcast(types: list[TType]) -> TType:
    """Broadcast element shapes (right-aligned, as torch does) and model axes."""
    models = _models(types)
    shape: tuple[int, ...] = ()
    for t in types:
        new = broadcast_shapes(shape, t.shape)
        if new is None:
            shapes = " and ".join(format_shape(x.shape) for x in types)
            raise TypeRuleError(f"shapes {shapes} do not broadcast", "E202")
        shape = new
    return TType(shape, "float32", models)


def _require(t: TType, dtype: str, what: str) -> None:
    if t.dtype != dtype:
        raise TypeRuleError(f"{what} expects {dtype} values, got {t.dtype}")


def _reduce_shape(t: TType, over: str) -> TType:
    if over == "models":
        if t.models is None:
            raise TypeRuleError("a reduction over models needs a stack of models (a list like [a, b])",
                                help="pass a list of models, or use over = \"tensor\"")
        return TType(t.shape, "float32", None)
    if over == "tensor":
        return TType((), "float32", t.models)
    if over == "rows":
        if not t.shape:
            raise TypeRuleError("a reduction over rows needs a tensor with at least one dimension")
        return TType(t.shape[:-1] + (1,), "float32", t.models)
    if over == "cols":
        if len(t.shape) < 2:
            raise TypeRuleError("a reduction over cols needs a tensor with at least two dimensions",
                                help='use over = "rows" or over = "tensor" for 1-D tensors')
        return TType(t.shape[:-2] + (1, t.shape[-1]), "float32", t.models)
    raise TypeRuleError(f"unknown scope {over!r}", "E203", f"scopes: {', '.join(SCOPES)}")


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _per_model_attr(value: Any, t: TType, what: str) -> None:
    if isinstance(value, tuple) and len(value) != t.models:
        raise TypeRuleError(f"{len(value)} {what} values for a stack of {t.models} models", "E202")


def order(op: Op, attrs: Attrs, args: list[TType]) -> TType:
    """Order statistics and random ops (all keep the shape of their input)."""
    x = args[0]
    _require(x, "float32", op.value)
    if op is Op.ARGMAX_MASK:
        if x.models is None:
            raise TypeRuleError("argmax_mask works over the models of a stack (a list like [a, b])")
        return x.with_(dtype="bool")
    if op is Op.BERNOULLI:
        p = args[1]
        _require(p, "float32", "bernoulli's probability")
        if p.models is not None and len(p.shape) != len(x.shape):
            raise TypeRuleError("internal: stacked probability not reshaped to the result rank")
        if broadcast([x, p]) != x.with_(dtype="float32"):
            raise TypeRuleError(f"bernoulli's probability {p} does not broadcast to {x}", "E202")
        return x.with_(dtype="bool")
    if op is Op.TOPK_COUNT_MASK:
        k = args[1]
        _require(k, "float32", "topk_count_mask's count")
        if k.shape or (k.models is not None and k.models != x.models):
            raise TypeRuleError(f"topk_count_mask's count must be one number (or one per model), "
                                f"got {k}", "E202")
    if attrs["over"] not in ("tensor", "rows"):
        raise TypeRuleError(f"{op.value} works over \"tensor\" or \"rows\", not {attrs['over']!r}",
                            "E203")
    if attrs["over"] == "rows" and not x.shape:
        raise TypeRuleError(f"{op.value} over rows needs a tensor with at least one dimension")
    if op is Op.TOPK_COUNT_MASK:
        if attrs["over"] == "rows" and args[1].models is not None:
            raise TypeRuleError("topk_count_mask over rows takes one shared count", "E202")
        return x.with_(dtype="bool")
    if op is Op.BAND_MASK:
        _per_model_attr(attrs["lo"], x, "lo")
        _per_model_attr(attrs["hi"], x, "hi")
        return x.with_(dtype="bool")
    return x  # RANK: float32 ranks


def _matrix(t: TType, what: str) -> tuple[int, int]:
    _require(t, "float32", what)
    if len(t.shape) != 2:
        raise TypeRuleError(f"{what} needs a 2-D tensor, got {format_shape(t.shape)}",
                            help="use it in a rule or branch for 2-D tensors (see ndim)")
    return t.shape[0], t.shape[1]


def linalg(op: Op, attrs: Attrs, args: list[TType]) -> TType:
    x = args[0]
    if op is Op.SVD:
        m, n = _matrix(x, "svd")
        k = attrs["k"]
        if not 0 < k <= min(m, n):
            raise TypeRuleError(f"svd keeps {k} triplets of a {m}x{n} matrix (1..{min(m, n)})",
                                "E203")
        shape = {"U": (m, k), "S": (k,), "Vh": (k, n)}.get(attrs["part"])
        if shape is None:
            raise TypeRuleError(f"svd part must be U, S or Vh, not {attrs['part']!r}", "E203")
        return TType(shape, "float32", x.models)
    if op is Op.POLAR:
        _matrix(x, "polar")
        return x
    if op is Op.MATMUL:
        (m, k1), (k2, n) = _matrix(x, "matmul"), _matrix(args[1], "matmul")
        if k1 != k2:
            raise TypeRuleError(f"matmul of {m}x{k1} and {k2}x{n} matrices", "E202")
        return TType((m, n), "float32", _models(args))
    if op is Op.SOLVE:
        (m, k), (k2, n) = _matrix(x, "solve"), _matrix(args[1], "solve")
        if m != k or k2 != m:
            raise TypeRuleError(f"solve needs a square matrix and a right-hand side with as many "
                                f"rows, got {m}x{k} and {k2}x{n}", "E202")
        return TType((k, n), "float32", _models(args))
    if op is Op.WUDI_ADAM:
        if x.models is None:
            raise TypeRuleError("wudi_adam needs a stack of task vectors (one per model)")
        m, n = _matrix(TType(x.shape, x.dtype, None), "wudi_adam")
        return TType((m, n), "float32", None)
    if op in (Op.TRANSPOSE, Op.PINV):
        m, n = _matrix(x, op.value)
        return TType((n, m), "float32", x.models)
    if op is Op.DIAGONAL:
        m, n = _matrix(x, "diagonal")
        if m != n:
            raise TypeRuleError(f"diagonal needs a square matrix, got {m}x{n}", "E202")
        return x
    if op is Op.CAT:
        axis = attrs["axis"]
        for t in args:
            if t.models is not None or t.dtype != "float32":
                raise TypeRuleError("cat joins plain float tensors (use concat_models for a stack)")
            if len(t.shape) != len(x.shape) or not 0 <= axis < len(x.shape) or any(
                    a != b for i, (a, b) in enumerate(zip(t.shape, x.shape)) if i != axis):
                raise TypeRuleError(f"cannot cat {format_shape(x.shape)} and "
                                    f"{format_shape(t.shape)} along axis {axis}", "E202")
        shape = list(x.shape)
        shape[axis] = sum(t.shape[axis] for t in args)
        return TType(tuple(shape), "float32", None)
    if op is Op.CONCAT_MODELS:
        if x.models is None:
            raise TypeRuleError("concat_models needs a stack of models")
        axis = attrs["axis"]
        if not 0 <= axis < len(x.shape):
            raise TypeRuleError(f"axis {axis} out of range for {format_shape(x.shape)}", "E203")
        shape = list(x.shape)
        shape[axis] *= x.models
        return TType(tuple(shape), x.dtype, None)
    raise TypeRuleError(f"no type rule for {op}")  # pragma: no cover


# ---------------------------------------------------------------- one rule per group of ops
def elementwise(op: Op, attrs: Attrs, args: list[TType]) -> TType:
    """Unary, binary and ternary elementwise ops: broadcast shapes and model axes; comparisons
    and logic give bools, `where` keeps its branches' dtype."""
    out = broadcast(args)
    for t in args:  # a stacked operand must carry the full element rank (model axis at dim 0)
        if t.models is not None and len(t.shape) != len(out.shape):
            raise TypeRuleError("internal: stacked operand not reshaped to the result rank")
    if op in LOGICAL:
        for t in args:
            _require(t, "bool", op.value)
        return out.with_(dtype="bool")
    if op is Op.WHERE:
        _require(args[0], "bool", "where's condition")
        if args[1].dtype == "bool" and args[2].dtype == "bool":
            return out.with_(dtype="bool")
        for t in args[1:]:
            _require(t, "float32", "where's branches")
        return out
    for t in args:
        _require(t, "float32", op.value)
    return out.with_(dtype="bool") if op in COMPARE else out


def reduction(op: Op, attrs: Attrs, args: list[TType]) -> TType:
    """REDUCE (a kind over a scope), DOT (an inner product over a scope) and ROW_KL (over rows)."""
    if op is Op.DOT or op is Op.ROW_KL:
        for t in args:
            _require(t, "float32", op.value)
        return _reduce_shape(broadcast(args), attrs["over"])
    if attrs["kind"] not in REDUCE_KINDS + SELECT_KINDS:
        raise TypeRuleError(f"unknown reduction {attrs['kind']!r}")
    if attrs["kind"] != "count":
        _require(args[0], "float32", attrs["kind"])
    return _reduce_shape(args[0], attrs["over"])


def topk_mask(op: Op, attrs: Attrs, args: list[TType]) -> TType:
    (x,) = args
    _require(x, "float32", "topk_mask")
    density = attrs["density"]
    if isinstance(density, tuple) and len(density) != x.models:
        raise TypeRuleError(f"{len(density)} densities for a stack of {x.models} models", "E202")
    if attrs["over"] not in ("tensor", "rows"):
        raise TypeRuleError(f"topk_mask works over \"tensor\" or \"rows\", not {attrs['over']!r}",
                            "E203")
    if attrs["over"] == "rows" and not x.shape:
        raise TypeRuleError("topk_mask over rows needs a tensor with at least one dimension")
    return x.with_(dtype="bool")


def fp8(op: Op, attrs: Attrs, args: list[TType]) -> TType:
    """BLOCK_QUANT (values within +-fmax, or one scale per block) and BLOCK_DEQUANT."""
    x = args[0]
    if op is Op.BLOCK_DEQUANT:
        return x.with_(dtype="float32")
    _require(x, "float32", "block_quant")
    if len(x.shape) != 2 or x.models is not None:
        raise TypeRuleError(f"block quantization needs a 2-D tensor, got {x}")
    b0, b1 = attrs["block"]
    if attrs["part"] == "values":
        return x
    return TType((-(-x.shape[0] // b0), -(-x.shape[1] // b1)), "float32", None)


def structure(op: Op, attrs: Attrs, args: list[TType]) -> TType:
    """Views and conversions: STACK, INDEX, RESHAPE, CAST, ASSERT (its value), OUTPUT."""
    if op is Op.STACK:
        if not args:
            raise TypeRuleError("cannot stack an empty list of tensors")
        first = args[0]
        for t in args:
            if t.models is not None:
                raise TypeRuleError("cannot nest a stack of models inside another list")
            if t.shape != first.shape:
                raise TypeRuleError(f"list items have different shapes: {format_shape(first.shape)} "
                                    f"and {format_shape(t.shape)}", "E202")
            if t.dtype != first.dtype:
                raise TypeRuleError(f"list items have different dtypes: {first.dtype} and {t.dtype}")
        return TType(first.shape, first.dtype, len(args))
    t = args[0]
    if op is Op.INDEX:
        if t.models is None:
            raise TypeRuleError("only a stack of models can be indexed")
        i = attrs["i"]
        if not -t.models <= i < t.models:
            raise TypeRuleError(f"index {i} out of range for a stack of {t.models} models", "E203")
        return TType(t.shape, t.dtype, None)
    if op is Op.RESHAPE:
        shape = tuple(attrs["shape"])
        if _prod(shape) != _prod(t.shape):
            raise TypeRuleError(f"cannot reshape {format_shape(t.shape)} to {format_shape(shape)}")
        return TType(shape, t.dtype, t.models)
    if op is Op.ASSERT:
        _require(args[1], "bool", "assert's condition")
        return t
    return t.with_(dtype=attrs["dtype"])  # CAST, OUTPUT


def typed(op: Op, attrs: Attrs, args: list[TType]) -> TType:
    """Ops whose type is given in their attributes (sources, loops, plugins)."""
    if op is Op.LOOP and args[0] != attrs["type"]:
        raise TypeRuleError(f"internal: a loop's state {args[0]} is not its type {attrs['type']}")
    return attrs["type"]


def model_stat(op: Op, attrs: Attrs, args: list[TType]) -> TType:
    if attrs["kind"] not in STAT_KINDS:
        raise TypeRuleError(f"unknown model-wide statistic {attrs['kind']!r}", "E203")
    if attrs["kind"] != "sum":
        if args[0].dtype != "float32":
            raise TypeRuleError(f"model_{attrs['kind']} needs float32 values, got {args[0].dtype}", "E221")
    return TType((), "float32", args[0].models)


def fused(op: Op, attrs: Attrs, args: list[TType]) -> TType:  # pragma: no cover - never re-typed
    raise TypeRuleError("internal: a fused region is typed by its root, never by a rule")

