"""List comprehensions, evaluated at compile time: `[f(m) for m in models if cond]`.

A comprehension unrolls while the recipe is elaborated, like a function call: its iterable must be
a list known at compile time (a list of numbers, strings, models or tensors) or a stack of
models (iterated by position). Clauses nest left to right as in Python; a filter must be a bool
known at compile time. The result is an ordinary list value, so everything that takes a list
(`sum`, `mean(over = "models")`, method calls taking `models`) takes it. Bounded: at most
MAX_COMP_ITEMS iterations per comprehension (E113), like every other compile-time value.
"""

from __future__ import annotations

from typing import Any

from mergelang.diagnostics import Span
from mergelang.ir.ops import Attrs, Op
from mergelang.lang import ast
from mergelang.lang.values import Const, ListV, TensorV, Value

#: the elaborator (lang/elaborate.Elaborator; typed loosely: it imports this module)
Elaborator = Any

#: iterations one comprehension may take (all clauses together): recipes list models and layers,
#: never more than a few thousand of them
MAX_COMP_ITEMS = 10_000


def items_of(el: Elaborator, v: Value, span: Span) -> tuple[Value, ...]:
    """The items a comprehension (or a list intrinsic) iterates over: a list's items, or the
    models of a stack by position. E112 for anything else."""
    if isinstance(v, ListV):
        return v.items
    if isinstance(v, TensorV):
        ty = el.graph.node(v.nid).type
        if ty.stacked:
            return tuple(TensorV(el.make(Op.INDEX, [v.nid], Attrs(i=i), span)) for i in range(ty.models))
    raise el.error("E112", f"cannot iterate over {v.describe()}", span,
                   "a comprehension iterates over a list (`[... for x in [a, b]]`), a stack of "
                   "models, or range(n)")


def comprehend(el: Elaborator, e: ast.ListComp, env: dict[str, Value]) -> ListV:
    out: list[Value] = []
    steps = [0]

    def clause(k: int, scope: dict[str, Value]) -> None:
        if k == len(e.clauses):
            out.append(el.eval(e.elt, scope))
            return
        c = e.clauses[k]
        for item in items_of(el, el.eval(c.iter, scope), c.iter.span):
            steps[0] += 1
            if steps[0] > MAX_COMP_ITEMS:
                raise el.error("E113", f"comprehension takes more than {MAX_COMP_ITEMS} iterations",
                               e.span, "comprehensions unroll at compile time; iterate over "
                               "fewer items")
            inner = dict(scope)
            _bind(el, c, item, inner)
            if c.cond is not None:
                cond = el.eval(c.cond, inner)
                if not (isinstance(cond, Const) and isinstance(cond.value, bool)):
                    raise el.error("E201", f"a comprehension's `if` needs a bool known at compile "
                                   f"time, got {cond.describe()}", c.cond.span,
                                   "for an elementwise choice use where(cond, a, b)")
                if not cond.value:
                    continue
            clause(k + 1, inner)

    clause(0, dict(env))
    return ListV(tuple(out))


def _bind(el: Elaborator, c: ast.CompFor, item: Value, scope: dict[str, Value]) -> None:
    if len(c.targets) == 1:
        scope[c.targets[0]] = item
        return
    if not isinstance(item, ListV) or len(item.items) != len(c.targets):
        got = f"a list of {len(item.items)}" if isinstance(item, ListV) else item.describe()
        raise el.error("E112", f"cannot unpack {got} into {len(c.targets)} names "
                       f"({', '.join(c.targets)})", c.span,
                       "each item must be a list of that many values, e.g. from zip(...) or "
                       "enumerate(...)")
    for name, v in zip(c.targets, item.items):
        scope[name] = v
