"""The op table: for every `Op`, one `OpInfo` with its arity, its type rule and its traits.

This is the one place that says what an op is. The graph builder types a new node with
:func:`infer` (arity check + the op's rule, ir/typerules.py) and `verify` calls it again after
every pass; constant folding asks `foldable`, row chunking `row_local`, the fuse pass `opcode`,
`iterate`'s loop builder `in_loop`, and the kernel registries are checked against `devices`
(tests/test_architecture.py). Adding an op: a member of `Op` (ir/vocab.py), a line here, a
kernel (runtime/kernels/), and an intrinsic that makes it (lang/intrinsics/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mergelang.ir import typerules as rules
from mergelang.ir.types import TType
from mergelang.ir.vocab import (REDUCE_KINDS, SCOPES, SELECT_KINDS, STAT_KINDS, Attrs, Op,  # noqa: F401
                                ParamRef, TypeRuleError)

Rule = Callable[[Op, Attrs, list[TType]], TType]


@dataclass(frozen=True)
class OpInfo:
    """What an op is. `row_local`: "yes" (row i of the result needs row i of its row
    arguments), "scoped" (so when its `over` attribute is "rows" or "models"), "elementwise" (so
    when its `elementwise` attribute says so: plugins) or "no". `devices`: where a kernel runs
    it ("any": the torch kernel, every device; "cpu": a CPU-only kernel; none: the runtime
    resolves the node itself, e.g. LOAD, or it is filled before a run, e.g. PARAM)."""

    arity: int | None
    rule: Rule
    elementwise: bool = False
    foldable: bool = False
    row_local: str = "no"
    opcode: str | None = None  # its instruction in a fused CPU loop (passes/fuse.py)
    in_loop: bool = True  # may appear in an `iterate` loop body (lang/loops.py)
    devices: tuple[str, ...] = ("any",)


def _ew(arity: int, opcode: str | None = None) -> OpInfo:
    return OpInfo(arity, rules.elementwise, elementwise=True, foldable=True, row_local="yes",
                  opcode=opcode)


_UNARY_OPS = (Op.NEG, Op.ABS, Op.SIGN, Op.SQRT, Op.EXP, Op.LOG, Op.SIN, Op.COS, Op.ACOS, Op.TANH,
              Op.FLOOR, Op.ROUND, Op.NOT, Op.CLAMP)
_BINARY_OPS = (Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MINIMUM, Op.MAXIMUM, Op.EQ, Op.NE, Op.LT,
               Op.LE, Op.GT, Op.GE, Op.AND, Op.OR)
#: ops with an instruction in the fused CPU loops (the instruction is the op's value)
_FUSED_OPCODES = {Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.NEG, Op.ABS, Op.SIGN, Op.MINIMUM, Op.MAXIMUM,
                  Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE, Op.AND, Op.OR, Op.NOT, Op.WHERE}


def _table() -> dict[Op, OpInfo]:
    t: dict[Op, OpInfo] = {}
    for op in _UNARY_OPS:
        t[op] = _ew(1)
    for op in _BINARY_OPS:
        t[op] = _ew(2)
    t[Op.WHERE] = _ew(3)
    t[Op.LERP] = _ew(3)
    for op in _FUSED_OPCODES:
        t[op] = OpInfo(**{**t[op].__dict__, "opcode": op.value})
    t.update({
        # sources and sinks: the runtime reads LOADs itself; CONSTs are values
        Op.LOAD: OpInfo(0, rules.typed, in_loop=False, devices=()),
        Op.CONST: OpInfo(0, rules.typed),
        Op.OUTPUT: OpInfo(1, rules.structure, row_local="yes", in_loop=False),
        # structure
        Op.STACK: OpInfo(None, rules.structure, foldable=True, row_local="yes", opcode="stack"),
        Op.INDEX: OpInfo(1, rules.structure, foldable=True, row_local="yes"),
        Op.RESHAPE: OpInfo(1, rules.structure, foldable=True, row_local="yes"),
        Op.CAST: OpInfo(1, rules.structure, foldable=True, row_local="yes"),
        Op.ASSERT: OpInfo(2, rules.structure, row_local="yes"),
        # reductions and order statistics
        Op.REDUCE: OpInfo(1, rules.reduction, foldable=True, row_local="scoped"),
        Op.DOT: OpInfo(2, rules.reduction, foldable=True, row_local="scoped"),
        Op.ROW_KL: OpInfo(2, rules.reduction, row_local="scoped"),  # attrs over = "rows", eps
        Op.TOPK_MASK: OpInfo(1, rules.topk_mask, row_local="scoped"),
        Op.RANK: OpInfo(1, rules.order, row_local="scoped"),
        Op.BAND_MASK: OpInfo(1, rules.order, row_local="scoped"),
        Op.TOPK_COUNT_MASK: OpInfo(2, rules.order, row_local="scoped"),
        Op.ARGMAX_MASK: OpInfo(1, rules.order, row_local="yes"),
        Op.BERNOULLI: OpInfo(2, rules.order, row_local="yes"),
        # FP8
        Op.BLOCK_QUANT: OpInfo(1, rules.fp8, devices=("any", "cpu")),
        Op.BLOCK_DEQUANT: OpInfo(2, rules.fp8),
        # control, statistics, run-time params
        Op.LOOP: OpInfo(None, rules.typed),
        Op.ARG: OpInfo(0, rules.typed, devices=()),  # a loop body's input, bound by the loop
        Op.MODEL_STAT: OpInfo(1, rules.model_stat, in_loop=False, devices=()),
        Op.STAT_VALUE: OpInfo(0, rules.typed, in_loop=False, devices=()),
        Op.PARAM: OpInfo(0, rules.typed, in_loop=False, devices=()),
        Op.PLUGIN: OpInfo(None, rules.typed, row_local="elementwise"),
        Op.FUSED: OpInfo(None, rules.fused, devices=("cpu",)),
        Op.BATCH: OpInfo(None, rules.typed, in_loop=False),  # passes/batch.py
        Op.UNBATCH: OpInfo(1, rules.typed, in_loop=False),
    })
    for op in (Op.SVD, Op.POLAR, Op.MATMUL, Op.SOLVE, Op.TRANSPOSE, Op.PINV, Op.WUDI_ADAM, Op.DIAGONAL,
               Op.CAT, Op.CONCAT_MODELS):
        t[op] = OpInfo(None if op is Op.CAT else 2 if op in (Op.MATMUL, Op.SOLVE) else 1, rules.linalg)
    return t


#: every op's arity, type rule and traits (contract name)
OP_INFO: dict[Op, OpInfo] = _table()

# views of the table, for the passes that ask one question of many ops
ELEMENTWISE = frozenset(op for op, i in OP_INFO.items() if i.elementwise)
FOLDABLE = frozenset(op for op, i in OP_INFO.items() if i.foldable)
ARITY: dict[Op, int | None] = {op: i.arity for op, i in OP_INFO.items()}


def infer(op: Op, attrs: Attrs, args: list[TType]) -> TType:
    """The result type of `op` applied to arguments of types `args` (raises TypeRuleError)."""
    info = OP_INFO[op]
    if info.arity is not None and len(args) != info.arity:
        raise TypeRuleError(f"{op.value} takes {info.arity} arguments, got {len(args)}")
    return info.rule(op, attrs, args)
