"""The graph's words: the `Op` enum, node attributes (`Attrs`), run-time param references and
the error a type rule raises. What each op is (arity, type rule, traits) is `ir/ops.OP_INFO`."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Iterator, Mapping


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
    # a merge method written in Python (lang/plugins.py): args the tensor arguments in order;
    # attrs name, origin (where the function was loaded from), values (the compile-time
    # arguments), elementwise, type (from the method's shape rule)
    PLUGIN = "plugin"
    # execution only (fuse.py): a region of elementwise ops run as one generated CPU loop
    FUSED = "fused"            # attrs: body, inputs, models; typed by its root, never by a rule
    # execution only (passes/batch.py): B same-shape tensors' identical steps run once on their
    # stack; args: B x `loads` per-tensor inputs (tensor-major), then the shared ones; attrs:
    # body (like LOOP's; ARG index < loads: a stacked input), batch, loads, type ([B, *shape])
    BATCH = "batch"
    UNBATCH = "unbatch"        # tensor `index` of a BATCH's stacked result; attrs: index, type

    def __repr__(self) -> str:
        return f"Op.{self.name}"


REDUCE_KINDS = ("sum", "mean", "max", "min", "count", "l1", "l2")
#: reductions that select one entry (attr q: the fraction; numpy's quantile method "lower")
SELECT_KINDS = ("quantile",)
SCOPES = ("models", "tensor", "rows", "cols")
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


