"""Elaboration: evaluate the recipe for every tensor of the reference model into one graph.

This is an abstract interpreter. Scalars and lists of scalars are computed in Python at compile
time; models stand for "this tensor of that checkpoint" and become shared LOAD nodes; every
tensor operation becomes a typed graph node (types come from safetensors headers, so all shape
errors surface here, before any tensor data is read). Functions are inlined at their call site;
an error inside a standard-library function points at the user's call, with a note saying where
in the library it happened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from mergelang.lang import ast
from mergelang.lang.blocks import BlockState, block_value, build_blocks, match_rule
from mergelang.lang.context import ElabContext, ElabState, Frame  # noqa: F401  (re-exported)
from mergelang.lang.loops import NotLoopable
from mergelang.lang.arith import MAX_INT_BITS, PYOPS, compile_time_op  # noqa: F401
from mergelang.lang.templates import Recording
from mergelang.diagnostics import CompileError, Diagnostic, Span, did_you_mean, error
from mergelang.ir.graph import MergeGraph
from mergelang.ir.ops import ELEMENTWISE, Attrs, Op, TypeRuleError
from mergelang.ir.types import TType, format_shape, is_floating
from mergelang.lang.values import MAX_TOTAL_CHARS
from mergelang.lang.values import (REQUIRED, Const, Deferred, ListV, ModelV, Param, Poisoned, Signature, TensorV, Value,
                                   is_number)

MAX_DEPTH = 64

BINOPS: dict[str, Op] = {
    "add": Op.ADD, "sub": Op.SUB, "mul": Op.MUL, "div": Op.DIV, "pow": Op.POW, "eq": Op.EQ,
    "ne": Op.NE, "lt": Op.LT, "le": Op.LE, "gt": Op.GT, "ge": Op.GE, "and": Op.AND, "or": Op.OR,
}


@dataclass(frozen=True, eq=False)
class Elaborator:
    """Builds the merge graph from a frozen `ElabContext`; `build` fills `graph`. Nothing is
    assigned to an elaborator after construction: a loop body (`body_view`) and a template
    recording (`recording_view`) are views of it with their own graph (and loads), sharing its
    `state` and block state (lang/blocks.py)."""

    ctx: ElabContext
    graph: Any = field(default_factory=MergeGraph)  # a MergeGraph, or a recording's view of one
    loads: dict[tuple[str, str, bool], int] = field(default_factory=dict)
    state: ElabState = field(default_factory=ElabState)
    block_state: BlockState = field(default_factory=BlockState)
    in_loop_body: bool = False  # elaborating an `iterate` body into a LOOP node (loops.py)
    recorder: Recording | None = None  # recording a template (lang/templates.py)
    root: "Elaborator | None" = None  # the elaborator a view was made from
    intrinsics: Mapping[str, Any] = field(init=False, repr=False)
    #: the context's fields, as plain attributes (read on every name lookup)
    fns: Mapping[str, ast.FnDef] = field(init=False, repr=False)
    models: Mapping[str, Any] = field(init=False, repr=False)
    params: Mapping[str, Value] = field(init=False, repr=False)
    runtime: Mapping[str, Value] = field(init=False, repr=False)
    derived: Mapping[str, Value] = field(init=False, repr=False)
    diags: Any = field(init=False, repr=False)
    out_dtype: str | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from mergelang.lang.intrinsics import INTRINSICS

        intrinsics = INTRINSICS
        if self.ctx.plugins:  # Python methods (lang/plugins.py): called like intrinsics
            from mergelang.lang.plugins import as_intrinsic

            intrinsics = {**INTRINSICS, **{n: as_intrinsic(m) for n, m in self.ctx.plugins.items()}}
        object.__setattr__(self, "intrinsics", intrinsics)  # part of construction
        for name in ("fns", "models", "params", "runtime", "derived", "diags", "out_dtype"):
            object.__setattr__(self, name, getattr(self.ctx, name))

    def with_context(self, **changes: Any) -> "Elaborator":
        """This elaborator over a context with `changes` (the next compile stage's): the same
        graph, loads and state."""
        return replace(self, ctx=replace(self.ctx, **changes))

    def body_view(self) -> "Elaborator":
        """A view elaborating into a fresh graph of its own, reading no model (loops.py)."""
        return replace(self, graph=MergeGraph(), loads={}, in_loop_body=True, recorder=None,
                       root=self.base)

    def recording_view(self, rec: Recording) -> "Elaborator":
        """A view whose `graph.make` and `load` calls `rec` records (lang/templates.py)."""
        return replace(self, graph=rec.view, recorder=rec, root=self.base)

    @property
    def base(self) -> "Elaborator":
        return self.root or self

    model_spans = property(lambda self: self.ctx.model_spans)
    stack = property(lambda self: self.state.stack)
    _tensor = property(lambda self: self.state.tensor)  # without marking it read

    @property
    def tensor(self) -> str:
        """The output tensor being elaborated. Reading it marks the elaboration as depending on
        the name (so it is not replayed for other tensors: lang/templates.py)."""
        self.state.name_read = True
        return self.state.tensor

    def build(self, *blocks: ast.MergeBlock) -> MergeGraph:
        """The merge blocks' graph (lang/blocks.py)."""
        return build_blocks(self, blocks)

    def match(self, block: ast.MergeBlock, name: str) -> tuple[int, dict[str, Value]]:
        """The rule of `block` that applies to tensor `name`, and its captures."""
        return match_rule(self, block, name)

    # ------------------------------------------------------------------ errors
    def error(self, code: str, message: str, span: Span, help: str | None = None) -> CompileError:
        return CompileError(self.diagnostic(code, message, span, help))

    def diagnostic(self, code: str, message: str, span: Span, help: str | None = None) -> Diagnostic:
        """Point library-internal errors at the innermost call in the user's own files."""
        notes: tuple = ()
        if span.source.library:
            for frame in reversed(self.stack):
                if not frame.call_span.source.library:
                    notes = ((f"inside `{self.stack[-1].fn}` at {span.location()}", None),)
                    span = frame.call_span
                    break
        if self.state.tensor:
            notes += ((f"while merging tensor `{self.state.tensor}`", None),)
        return error(code, message, span, help, notes)

    # ------------------------------------------------------------------ evaluation
    def eval(self, e: ast.Expr, env: dict[str, Value]) -> Value:
        if isinstance(e, (ast.Number, ast.String, ast.Bool)):
            return Const(e.value)
        if isinstance(e, ast.NoneLit):
            return Const(None)
        if isinstance(e, ast.Name):
            return self.lookup(e, env)
        if isinstance(e, ast.ListExpr):
            lst = ListV(tuple(self.eval(i, env) for i in e.items))
            return self._bounded(lst, e)
        if isinstance(e, ast.ListComp):
            from mergelang.lang.comprehend import comprehend

            return self._bounded(comprehend(self, e, env), e)
        if isinstance(e, ast.Unary):
            v = self.eval(e.operand, env)
            if e.op == "pos":
                return v
            if e.op == "neg":
                return self.binop("mul", Const(-1), v, e.span) if not isinstance(v, Const) \
                    else self.binop("sub", Const(0), v, e.span)
            return self.logical_not(v, e.span)
        if isinstance(e, ast.Binary):
            left = self.eval(e.left, env)
            if e.op in ("and", "or") and isinstance(left, Const) and isinstance(left.value, bool):
                if left.value == (e.op == "or"):
                    return left  # short circuit at compile time
                return self.eval(e.right, env)
            return self.binop(e.op, left, self.eval(e.right, env), e.span)
        if isinstance(e, ast.IfExpr):
            cond = self.eval(e.cond, env)
            if not (isinstance(cond, Const) and isinstance(cond.value, bool)):
                raise self.error("E201", f"`if` needs a bool known at compile time, got "
                                 f"{cond.describe()}", e.cond.span,
                                 "for an elementwise choice use where(cond, a, b)")
            return self.eval(e.then if cond.value else e.else_, env)
        if isinstance(e, ast.Call):
            return self.call(e, env)
        if isinstance(e, ast.Index):
            return self.index(self.eval(e.target, env), self.eval(e.index, env), e)
        raise TypeError(f"unknown expression {e!r}")  # pragma: no cover

    def _bounded(self, lst: ListV, e: ast.Expr) -> ListV:
        """E329 for a compile-time list too large to be a value (lang/values.ListV.too_big)."""
        why = lst.too_big()
        if why:
            raise self.error("E329", f"this list is too large for a compile-time value: {why}",
                             e.span, "compile-time lists are weights, layer values and names: "
                             "a few thousand elements at most")
        return lst

    def lookup(self, e: ast.Name, env: dict[str, Value]) -> Value:
        if e.id in env:
            return env[e.id]
        if e.id in self.runtime:
            return self.runtime_value(e.id, self.runtime[e.id], ())
        if e.id in self.derived:  # a param computed from run-time params (`param b = 1 - a`)
            return self.derived[e.id]
        if e.id in self.params:
            return self.params[e.id]
        if e.id in self.models:
            return ModelV(e.id, e.span)
        names = list(env) + list(self.params) + list(self.models)
        raise self.error("E101", f"unknown name `{e.id}`", e.span, did_you_mean(e.id, names))

    def index(self, target: Value, idx: Value, e: ast.Index) -> Value:
        if not (isinstance(idx, Const) and isinstance(idx.value, int) and not isinstance(idx.value, bool)):
            raise self.error("E201", f"an index must be an integer, got {idx.describe()}", e.index.span)
        if isinstance(target, ListV):
            n = len(target.items)
            if not -n <= idx.value < n:
                raise self.error("E203", f"index {idx.value} is out of range for a list of {n}",
                                 e.index.span)
            return target.items[idx.value]
        if isinstance(target, TensorV):
            return TensorV(self.make(Op.INDEX, [target.nid], Attrs(i=idx.value), e.span))
        raise self.error("E201", f"cannot index {target.describe()}", e.target.span)

    # ------------------------------------------------------------------ calls
    def call(self, e: ast.Call, env: dict[str, Value]) -> Value:
        fn = self.fns.get(e.func)
        sig = signature_of(fn) if fn is not None else None
        intrinsic = None
        if sig is None:
            intrinsic = self.intrinsics.get(e.func)
            if intrinsic is None:
                raise self.error("E102", f"unknown function `{e.func}`", e.func_span,
                                 did_you_mean(e.func, list(self.fns) + list(self.intrinsics)))
            sig = intrinsic.sig
        given = self.bind(sig, e, env)
        if intrinsic is not None:
            return intrinsic.impl(self, given, e.span)
        assert fn is not None
        return self.apply(fn, given, e.span)

    def apply(self, fn: ast.FnDef, given: dict[str, Value], span: Span, tag: str = "") -> Value:
        """Inline a recipe function with bound arguments (defaults fill the rest)."""
        if len(self.stack) >= MAX_DEPTH:
            raise self.error("E108", f"calls nest deeper than {MAX_DEPTH} (recursion in `{fn.name}`?)",
                             span)
        local: dict[str, Value] = {}
        for p in fn.params:
            local[p.name] = given[p.name] if p.name in given else self.eval(p.default, dict(local))
        self.stack.append(Frame(fn.name, span, local, tag))
        try:
            for let in self.live_lets(fn):  # a `let` the result does not use costs nothing
                self.state.lets_evaluated += 1
                local[let.name] = self.eval(let.value, local)
            return self.eval(fn.ret, local)
        finally:
            self.stack.pop()

    def live_lets(self, fn: ast.FnDef) -> tuple[ast.Let, ...]:
        """ast.live_lets of `fn`, computed once per function."""
        got = self.state.live.get(id(fn))
        if got is None or got[0] is not fn:
            if self.state.checking is None:
                self.state.checking = ast.checking_fns(self.fns)
            got = self.state.live[id(fn)] = (fn, ast.live_lets(fn, self.state.checking))
        return got[1]

    def bind(self, sig: Signature, e: ast.Call, env: dict[str, Value]) -> dict[str, Value]:
        """Match a call's arguments to parameters (static checks already ran; re-check anyway)."""
        names = sig.names
        if len(e.args) > len(names):
            raise self.error("E105", f"`{sig.name}` takes {len(names)} arguments, got {len(e.args)}",
                             e.args[len(names)].span, f"signature: {sig.render()}")
        given: dict[str, Value] = {}
        for p, a in zip(sig.params, e.args):
            given[p.name] = self.eval(a, env)
        for kw in e.kwargs:
            if kw.name not in names:
                raise self.error("E103", f"unknown keyword argument `{kw.name}` for `{sig.name}`",
                                 kw.span, did_you_mean(kw.name, names) or f"signature: {sig.render()}")
            if kw.name in given:
                raise self.error("E107", f"argument `{kw.name}` given twice", kw.span)
            given[kw.name] = self.eval(kw.value, env)
        for p in sig.params:
            if p.name not in given:
                if p.required:
                    raise self.error("E104", f"`{sig.name}` needs argument `{p.name}`", e.span,
                                     f"signature: {sig.render()}")
                if not hasattr(p.default, "span"):  # intrinsic default: a Python value
                    given[p.name] = Const(p.default)
        return given

    # ------------------------------------------------------------------ tensors
    def load(self, model: str, tensor: str, span: Span, raw: bool = False) -> int:
        if self.in_loop_body:
            raise NotLoopable()  # a model read inside a loop body: `iterate` unrolls instead
        if self.recorder is not None:  # the load is what a template records, not its node
            return self.recorder.load(self.base.load, model, tensor, span, raw)
        key = (model, tensor, raw)
        if key in self.loads:
            return self.loads[key]
        source = self.models.get(model)
        if source is None:
            raise Poisoned()
        if source.block_output is not None:
            return block_value(self, model, source, tensor, span, raw)
        info = source.tensors().get(tensor)
        if info is None:
            raise self.error("E302", f"tensor `{tensor}` is missing in model `{model}`", span,
                             did_you_mean(tensor, source.tensors()) or
                             f"`{model}` has {len(source.tensors())} tensors; use a rule that "
                             "does not read it for this tensor")
        if not raw and not is_floating(info.dtype):
            raise self.error("E201", f"tensor `{tensor}` of `{model}` is {info.dtype}; only "
                             "floating-point tensors can be computed with", span)
        ty = TType(info.shape, info.dtype if raw else "float32")
        attrs = Attrs(model=model, tensor=tensor, type=ty, src_dtype=info.dtype)
        scaled = None if raw else getattr(source, "block_scale", lambda _: None)(tensor)
        if scaled is not None:  # block-scaled FP8: fused loops may read its codes + scales
            attrs = attrs.replace(scale=(scaled[0], *scaled[1]))
        nid = self.graph.make(Op.LOAD, [], attrs, span)
        self.loads[key] = nid
        return nid

    def to_node(self, v: Value, span: Span) -> int:
        if isinstance(v, TensorV):
            return v.nid
        if isinstance(v, ModelV):
            return self.load(v.name, self.state.tensor, v.span)
        if isinstance(v, Const):
            if isinstance(v.value, Deferred):  # a run-time param's number: filled per run
                return self.graph.make(Op.PARAM, [], Attrs(expr=v.value.tree, type=TType(())))
            if isinstance(v.value, bool):
                return self.const(v.value, TType((), "bool"))
            if is_number(v):
                return self.const(float(v.value), TType(()))
            raise self.error("E201", f"expected a tensor or a number, got {v.describe()}", span)
        if v.scalars and not any(isinstance(i.value, Deferred) for i in v.items):  # type: ignore[union-attr]
            vals = tuple(float(i.value) for i in v.items)  # type: ignore[union-attr]
            if not vals:
                raise self.error("E203", "empty list", span)
            return self.const(vals, TType((), "float32", len(vals)))
        items = [self.to_node(i, span) for i in v.items]
        if not items:
            raise self.error("E203", "cannot use an empty list as a stack of tensors", span)
        return self.make(Op.STACK, items, Attrs(), span)

    def runtime_value(self, name: str, v: Value, path: tuple[int, ...]) -> Value:
        """A run-time param's value: a Deferred number per element (lang/values.py), folded in
        Python like any compile-time number and a PARAM node where it meets a tensor."""
        if isinstance(v, ListV):
            return ListV(tuple(self.runtime_value(name, x, path + (i,)) for i, x in enumerate(v.items)))
        return Const(Deferred(("p", name, path)))

    def const(self, value: Any, ty: TType) -> int:
        return self.graph.make(Op.CONST, [], Attrs(value=value, type=ty))

    def make(self, op: Op, args: list[int], attrs: Attrs, span: Span) -> int:
        """Add a typed node; stacked operands of elementwise ops are reshaped to the full rank."""
        g = self.graph
        if op in ELEMENTWISE:
            rank = max(len(g.node(a).type.shape) for a in args)
            fixed = []
            for a in args:
                t = g.node(a).type
                if t.stacked and len(t.shape) < rank:
                    shape = (1,) * (rank - len(t.shape)) + t.shape
                    a = self._make(Op.RESHAPE, [a], Attrs(shape=shape), span)
                fixed.append(a)
            args = fixed
        return self._make(op, args, attrs, span)

    def _make(self, op: Op, args: list[int], attrs: Attrs, span: Span) -> int:
        try:
            return self.graph.make(op, args, attrs, span)
        except TypeRuleError as exc:
            loads = self._loads_of(args) if exc.code == "E202" else []
            shapes = {m: sh for m, _, sh in loads}
            if len(shapes) >= 2 and len(set(shapes.values())) >= 2:
                # name the models and their shapes, not the internal op the error surfaced in
                tensors = sorted({t for _, t, _ in loads})
                listed = ", ".join(f"`{m}` is {format_shape(sh)}" for m, sh in shapes.items())
                msg = (f"the models' tensors have different shapes: {listed} (tensor "
                       f"{', '.join(f'`{t}`' for t in tensors[:3])})")
                raise self.error("E202", msg, span, exc.help or "merged models need the same "
                                 "architecture: check the model paths, or route this tensor with its "
                                 "own rule (e.g. `=> base`)") from None
            types = ", ".join(str(self.graph.node(a).type) for a in args)
            msg = f"{exc} (in `{op.value}` of {types})" if args else str(exc)
            raise self.error(exc.code, msg, span, exc.help) from None

    def _loads_of(self, args: list[int], limit: int = 256) -> list[tuple[str, str, tuple[int, ...]]]:
        """The (model, tensor, shape) of the loads the operands come from (a bounded walk)."""
        g = self.graph
        out: dict[str, tuple[str, str, tuple[int, ...]]] = {}
        stack, seen = list(args), set()
        while stack and len(seen) < limit:
            nid = stack.pop()
            if nid in seen:
                continue
            seen.add(nid)
            node = g.node(nid)
            if node.op == Op.LOAD:
                model = node.attrs.get("model")
                if isinstance(model, str) and model not in out:
                    out[model] = (model, str(node.attrs.get("tensor")), tuple(node.type.shape))
                continue
            stack.extend(node.args)
        return sorted(out.values())

    def binop(self, op: str, a: Value, b: Value, span: Span) -> Value:
        if op in ("eq", "ne") and (_is_none(a) or _is_none(b)):
            same = _is_none(a) and _is_none(b)
            return Const(same if op == "eq" else not same)
        deferred = isinstance(getattr(a, "value", None), Deferred) or isinstance(getattr(b, "value", None), Deferred)
        if isinstance(a, Const) and isinstance(b, Const) and not (
                deferred and op not in ("add", "sub", "mul", "div", "pow")):
            return Const(self.py(op, a.value, b.value, span))
        if deferred and op in ("and", "or", "floordiv", "mod"):
            raise self.error("E201", f"`{ast.BINARY_SYMBOLS[op]}` needs numbers known at compile "
                             "time, not a run-time param (tune, learn)", span)
        if _scalarish(a) and _scalarish(b) and (isinstance(a, ListV) or isinstance(b, ListV)):
            la = a.items if isinstance(a, ListV) else None
            lb = b.items if isinstance(b, ListV) else None
            if la is not None and lb is not None and len(la) != len(lb):
                raise self.error("E202", f"lists of different lengths ({len(la)} and {len(lb)})", span)
            n = len(la if la is not None else lb)  # type: ignore[arg-type]
            return ListV(tuple(self.binop(op, la[i] if la else a, lb[i] if lb else b, span)
                               for i in range(n)))
        if op in ("floordiv", "mod"):
            raise self.error("E201", f"`{ast.BINARY_SYMBOLS[op]}` works on numbers known at compile "
                             "time only", span)
        return TensorV(self.make(BINOPS[op], [self.to_node(a, span), self.to_node(b, span)],
                                 Attrs(), span))

    def py(self, op: str, x: Any, y: Any, span: Span) -> Any:
        """Compile-time arithmetic on numbers, strings and bools (arith.py); the strings one
        compilation builds are bounded in all (MAX_TOTAL_CHARS: E329)."""
        out = compile_time_op(op, x, y, span, self.error)
        if isinstance(out, str):
            self.state.string_chars += len(out)
            if self.state.string_chars > MAX_TOTAL_CHARS:
                raise self.error("E329", f"the strings this recipe builds at compile time exceed "
                                 f"{MAX_TOTAL_CHARS} characters in all", span)
        return out

    def logical_not(self, v: Value, span: Span) -> Value:
        if isinstance(v, Const):
            if not isinstance(v.value, bool):
                raise self.error("E201", f"`not` needs a bool, got {v.describe()}", span)
            return Const(not v.value)
        return TensorV(self.make(Op.NOT, [self.to_node(v, span)], Attrs(), span))

    def unary(self, op: Op, v: Value, span: Span, py: Callable[[float], float] | None = None,
              **attrs: Any) -> Value:
        """Apply a unary elementwise op: in Python for compile-time numbers, else a node."""
        if py is not None and isinstance(v, Const) and isinstance(v.value, Deferred):
            return Const(v.value.call(py))
        if py is not None and is_number(v):
            try:
                out = py(float(v.value))  # type: ignore[union-attr]
            except (ValueError, OverflowError, ZeroDivisionError):
                raise self.error("E203", f"{op.value}({v.value}) is undefined", span) from None  # type: ignore[union-attr]
            if isinstance(out, float) and not math.isfinite(out):
                raise self.error("E203", f"{op.value}({v.value}) is not a finite number", span)  # type: ignore[union-attr]
            return Const(out)
        if isinstance(v, ListV) and v.scalars and py is not None:
            return ListV(tuple(self.unary(op, i, span, py, **attrs) for i in v.items))
        return TensorV(self.make(op, [self.to_node(v, span)], Attrs(attrs), span))


def _is_none(v: Value) -> bool:
    return isinstance(v, Const) and v.value is None


def _scalarish(v: Value) -> bool:
    return (isinstance(v, Const) and not isinstance(v.value, str) and v.value is not None) or \
        (isinstance(v, ListV) and v.scalars)


_SIG_CACHE: dict[int, Signature] = {}


def signature_of(fn: ast.FnDef) -> Signature:
    sig = _SIG_CACHE.get(id(fn))
    if sig is None:
        sig = Signature(fn.name, tuple(Param(p.name, p.default if p.default is not None else REQUIRED)
                                       for p in fn.params), fn.doc)
        _SIG_CACHE[id(fn)] = sig
    return sig

