"""The graph's vocabulary: the `Op` enum, op categories and each op's type rule.

Type rules are the single source of truth for result types: the graph builder calls
:func:`infer` to type a new node and `verify` calls it again to check every node after a pass.
"""

from __future__ import annotations

import enum

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from mergelang.ir.types import TType, broadcast_shapes, format_shape


class Op(enum.Enum):
    # sources and sinks
    LOAD = "load"
    CONST = "const"
    OUTPUT = "output"
    # structure (views and conversions)
    STACK = "stack"
    INDEX = "index"
    RESHAPE = "reshape"
    CAST = "cast"
    # elementwise, unary
    NEG = "neg"
    ABS = "abs"
    SIGN = "sign"
    SQRT = "sqrt"
    EXP = "exp"
    LOG = "log"
    SIN = "sin"
    COS = "cos"
    ACOS = "acos"
    TANH = "tanh"
    FLOOR = "floor"
    ROUND = "round"            # half to even, like Python's round and torch.round
    NOT = "not"
    CLAMP = "clamp"
    # elementwise, binary
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    POW = "pow"
    MINIMUM = "minimum"
    MAXIMUM = "maximum"
    EQ = "eq"
    NE = "ne"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    AND = "and"
    OR = "or"
    # elementwise, ternary
    WHERE = "where"
    LERP = "lerp"
    # reductions with a scope (attrs: kind, over)
    REDUCE = "reduce"
    DOT = "dot"
    ROW_KL = "row_kl"          # KL(softmax(x) + eps || softmax(y) + eps) per row, in float64
    # order statistics
    TOPK_MASK = "topk_mask"
    RANK = "rank"              # attrs: over, descending, normalized
    BAND_MASK = "band_mask"    # attrs: lo, hi (int or one per model), over
    TOPK_COUNT_MASK = "topk_count_mask"  # args: x, k (run-time count); attrs: over
    ARGMAX_MASK = "argmax_mask"  # over models; attrs: last (ties: last model wins)
    # linear algebra (2-D, batched over a stack; float32 SVD)
    SVD = "svd"                # attrs: part ("U" | "S" | "Vh"), k (leading triplets kept)
    POLAR = "polar"            # orthogonal polar factor U Vh
    MATMUL = "matmul"
    SOLVE = "solve"            # A X = B for square A (float32; singular A fails at run time)
    TRANSPOSE = "transpose"
    PINV = "pinv"              # Moore-Penrose pseudo-inverse (float32 SVD)
    WUDI_ADAM = "wudi_adam"    # WUDI's loss minimised by Adam, as the reference (stack -> 2-D)
    DIAGONAL = "diagonal"      # a square matrix with its off-diagonal entries zeroed
    CAT = "cat"                # plain tensors concatenated along `axis`
    CONCAT_MODELS = "concat_models"  # a stack -> one tensor, models concatenated along `axis`
    # block-scaled FP8 output (sources/fp8.py): attrs block (rows, cols), fmax (the format's
    # largest value), part ("values": x / its block's scale, within +-fmax, cast by the OUTPUT;
    # "scale_inv": one float32 per block, block amax / fmax)
    BLOCK_QUANT = "block_quant"
    # execution only (passes/fp8_reads.py): FP8 codes x their block scales (args codes, scales;
    # attrs block), what the dequantizing source computes, done where the plan runs
    BLOCK_DEQUANT = "block_dequant"
    # randomness (counter-based, keyed by seed / tensor / model index / element index)
    BERNOULLI = "bernoulli"    # args: like, p; attrs: seed, tensor, stream
    # checks
    ASSERT = "assert"
    # bounded iteration (`iterate`): args [init, invariants...]; attrs: body (a tuple of Nodes
    # whose args index the tuple; ARG nodes stand for the loop's inputs), times, type. Runs the
    # body up to `times` rounds, stopping early at a fixed point (the state no longer changes)
    LOOP = "loop"
    ARG = "arg"                # a loop body's input; attrs: index, type
    # model-wide statistics (see stats.py): a per-model scalar over every tensor routed to one
    # call site; computed by a statistics pass before the apply pass
    MODEL_STAT = "model_stat"  # attrs: kind ("sum" | "topk_value" | "quantile_value"), key, fraction, tensor
    STAT_VALUE = "stat_value"  # arity 0; attrs: key, type; filled with a CONST at run time
    # a run-time param (tune / learn: compile once, run with many values): arity 0; attrs: expr
    # (an expression over params, ir/paramexpr.py), type; filled with a CONST before a run
    # (passes/params.py). Attrs may also hold ParamRef where an op needs the number itself
    PARAM = "param"
    # execution only (fuse.py): a region of elementwise ops run as one generated CPU loop
    FUSED = "fused"            # attrs: body, inputs, models; typed by its root, never by a rule

    def __repr__(self) -> str:
        return f"Op.{self.name}"


UNARY = frozenset({Op.NEG, Op.ABS, Op.SIGN, Op.SQRT, Op.EXP, Op.LOG, Op.SIN, Op.COS, Op.ACOS,
                   Op.TANH, Op.FLOOR, Op.ROUND, Op.NOT, Op.CLAMP})
ARITH_BINARY = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MINIMUM,
                          Op.MAXIMUM})
COMPARE = frozenset({Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE})
LOGICAL = frozenset({Op.AND, Op.OR, Op.NOT})
BINARY = ARITH_BINARY | COMPARE | {Op.AND, Op.OR}
TERNARY = frozenset({Op.WHERE, Op.LERP})
ELEMENTWISE = UNARY | BINARY | TERNARY
REDUCTIONS = frozenset({Op.REDUCE, Op.DOT})
LINALG_OPS = frozenset({Op.SVD, Op.POLAR, Op.MATMUL, Op.CONCAT_MODELS, Op.SOLVE, Op.TRANSPOSE,
                        Op.PINV, Op.DIAGONAL, Op.CAT, Op.WUDI_ADAM})
ORDER_OPS = frozenset({Op.RANK, Op.BAND_MASK, Op.TOPK_COUNT_MASK, Op.ARGMAX_MASK, Op.BERNOULLI})
VIEWS = frozenset({Op.RESHAPE, Op.INDEX})
#: ops that are cheap enough to evaluate at compile time when all inputs are constants
FOLDABLE = ELEMENTWISE | REDUCTIONS | {Op.STACK, Op.INDEX, Op.RESHAPE, Op.CAST}

REDUCE_KINDS = ("sum", "mean", "max", "min", "count", "l1", "l2")
#: reductions that select one entry (attr q: the fraction; numpy's quantile method "lower")
SELECT_KINDS = ("quantile",)
SCOPES = ("models", "tensor", "rows", "cols")

ARITY: dict[Op, int | None] = {op: 1 for op in UNARY}
ARITY.update({op: 2 for op in BINARY})
ARITY.update({Op.WHERE: 3, Op.LERP: 3, Op.REDUCE: 1, Op.DOT: 2, Op.ROW_KL: 2, Op.TOPK_MASK: 1, Op.ASSERT: 2,
              Op.SVD: 1, Op.POLAR: 1, Op.MATMUL: 2, Op.SOLVE: 2, Op.TRANSPOSE: 1, Op.PINV: 1,
              Op.WUDI_ADAM: 1, Op.BLOCK_QUANT: 1, Op.BLOCK_DEQUANT: 2,
              Op.DIAGONAL: 1, Op.CONCAT_MODELS: 1, Op.CAT: None,
              Op.RANK: 1, Op.BAND_MASK: 1, Op.TOPK_COUNT_MASK: 2, Op.ARGMAX_MASK: 1, Op.BERNOULLI: 2,
              Op.LOAD: 0, Op.CONST: 0, Op.OUTPUT: 1, Op.STACK: None, Op.INDEX: 1, Op.RESHAPE: 1,
              Op.CAST: 1, Op.MODEL_STAT: 1, Op.STAT_VALUE: 0, Op.PARAM: 0, Op.FUSED: None, Op.LOOP: None,
              Op.ARG: 0})
STAT_KINDS = ("sum", "topk_value", "quantile_value")


@dataclass(frozen=True)
class ParamRef:
    """A run-time param's number (an expression over params, ir/paramexpr.py) inside an op's
    attrs (e.g. a top-k density): replaced by its value before a run (passes/params.py), never
    seen by a kernel."""

    expr: tuple

    def __repr__(self) -> str:
        from mergelang.ir.paramexpr import render

        return render(self.expr)


class Attrs(Mapping[str, Any]):
    """An immutable, hashable attribute mapping (values must be hashable: use tuples)."""

    __slots__ = ("_items", "_hash")

    def __init__(self, items: Mapping[str, Any] | None = None, **kw: Any):
        merged = dict(items or {}, **kw)
        self._items = tuple(sorted(merged.items()))
        self._hash = hash(self._items)

    def __getitem__(self, key: str) -> Any:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Attrs) and self._items == other._items

    def replace(self, **kw: Any) -> "Attrs":
        return Attrs(dict(self._items), **kw)

    def __repr__(self) -> str:
        return " ".join(f"{k}={_fmt(v)}" for k, v in self._items)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return repr(v)
    return str(v)


class TypeRuleError(Exception):
    """A type rule was violated; the builder turns this into an E201/E202 diagnostic."""

    def __init__(self, message: str, code: str = "E201", help: str | None = None):
        super().__init__(message)
        self.code = code
        self.help = help


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


def infer(op: Op, attrs: Attrs, args: list[TType]) -> TType:
    """The result type of `op` applied to arguments of types `args` (raises TypeRuleError)."""
    n = ARITY[op]
    if n is not None and len(args) != n:
        raise TypeRuleError(f"{op.value} takes {n} arguments, got {len(args)}")
    if op in ELEMENTWISE:
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
    if op is Op.REDUCE:
        if attrs["kind"] not in REDUCE_KINDS + SELECT_KINDS:
            raise TypeRuleError(f"unknown reduction {attrs['kind']!r}")
        if attrs["kind"] != "count":
            _require(args[0], "float32", attrs["kind"])
        return _reduce_shape(args[0], attrs["over"])
    if op is Op.DOT or op is Op.ROW_KL:  # ROW_KL: attrs over = "rows", eps
        for t in args:
            _require(t, "float32", op.value)
        return _reduce_shape(broadcast(args), attrs["over"])
    if op is Op.TOPK_MASK:
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
    if op in ORDER_OPS:
        return _infer_order(op, attrs, args)
    if op in LINALG_OPS:
        return _infer_linalg(op, attrs, args)
    if op is Op.BLOCK_QUANT:
        x = args[0]
        _require(x, "float32", "block_quant")
        if len(x.shape) != 2 or x.models is not None:
            raise TypeRuleError(f"block quantization needs a 2-D tensor, got {x}")
        b0, b1 = attrs["block"]
        if attrs["part"] == "values":
            return x
        return TType((-(-x.shape[0] // b0), -(-x.shape[1] // b1)), "float32", None)
    if op is Op.BLOCK_DEQUANT:
        return args[0].with_(dtype="float32")
    if op is Op.ASSERT:
        _require(args[1], "bool", "assert's condition")
        return args[0]
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
    if op is Op.INDEX:
        t = args[0]
        if t.models is None:
            raise TypeRuleError("only a stack of models can be indexed")
        i = attrs["i"]
        if not -t.models <= i < t.models:
            raise TypeRuleError(f"index {i} out of range for a stack of {t.models} models", "E203")
        return TType(t.shape, t.dtype, None)
    if op is Op.RESHAPE:
        t = args[0]
        shape = tuple(attrs["shape"])
        if _prod(shape) != _prod(t.shape):
            raise TypeRuleError(f"cannot reshape {format_shape(t.shape)} to {format_shape(shape)}")
        return TType(shape, t.dtype, t.models)
    if op is Op.CAST:
        return args[0].with_(dtype=attrs["dtype"])
    if op in (Op.LOAD, Op.CONST, Op.STAT_VALUE, Op.ARG, Op.PARAM):
        return attrs["type"]
    if op is Op.LOOP:
        if args[0] != attrs["type"]:
            raise TypeRuleError(f"internal: a loop's state {args[0]} is not its type {attrs['type']}")
        return attrs["type"]
    if op is Op.MODEL_STAT:
        if attrs["kind"] not in STAT_KINDS:
            raise TypeRuleError(f"unknown model-wide statistic {attrs['kind']!r}", "E203")
        if attrs["kind"] != "sum":
            if args[0].dtype != "float32":
                raise TypeRuleError(f"model_{attrs['kind']} needs float32 values, got {args[0].dtype}", "E221")
        return TType((), "float32", args[0].models)
    if op is Op.OUTPUT:
        return args[0].with_(dtype=attrs["dtype"])
    raise TypeRuleError(f"no type rule for {op}")  # pragma: no cover - every op has a rule


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _per_model_attr(value: Any, t: TType, what: str) -> None:
    if isinstance(value, tuple) and len(value) != t.models:
        raise TypeRuleError(f"{len(value)} {what} values for a stack of {t.models} models", "E202")


def _infer_order(op: Op, attrs: Attrs, args: list[TType]) -> TType:
    """Type rules of the order-statistics and random ops (all keep the shape of their input)."""
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


def _infer_linalg(op: Op, attrs: Attrs, args: list[TType]) -> TType:
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
