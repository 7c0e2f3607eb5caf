"""Expressions over run-time params (tune, learn): trees of ("p", name, path) leaves, ("c", n)
numbers, ("op", name, a, b) arithmetic and compile-time functions ("f", fn, a), ("f2", fn, a,
b) and ("fl", fn, (a, ...)) (of a list, e.g. a reduction), built by the
elaborator's `Deferred` values (lang/values.py) and evaluated when the params' values are given
(passes/params.py: with Python numbers, exactly as the compiler would have folded them; learn:
with torch tensors, differentiably)."""

from __future__ import annotations

import operator
from typing import Any, Callable

OPS: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
    "pow": operator.pow}
_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**"}


def evaluate(tree: tuple, leaf: Callable[[str, tuple[int, ...]], Any]) -> Any:
    kind = tree[0]
    if kind == "p":
        return leaf(tree[1], tree[2])
    if kind == "c":
        return tree[1]
    if kind == "f":
        return tree[1](evaluate(tree[2], leaf))
    if kind == "fl":  # a function of a list (a compile-time reduction)
        return tree[1]([evaluate(t, leaf) for t in tree[2]])
    if kind == "f2":
        return tree[1](evaluate(tree[2], leaf), evaluate(tree[3], leaf))
    return OPS[tree[1]](evaluate(tree[2], leaf), evaluate(tree[3], leaf))


def names(tree: tuple) -> set[str]:
    if tree[0] == "p":
        return {tree[1]}
    if tree[0] == "c":
        return set()
    if tree[0] == "f":
        return names(tree[2])
    if tree[0] == "fl":
        return set().union(*(names(t) for t in tree[2]))
    return names(tree[2]) | names(tree[3])


def render(tree: tuple) -> str:
    if tree[0] == "p":
        return tree[1] + "".join(f"[{i}]" for i in tree[2])
    if tree[0] == "c":
        return repr(tree[1])
    if tree[0] == "f":
        return f"{getattr(tree[1], '__name__', 'f')}({render(tree[2])})"
    if tree[0] == "fl":
        return f"{getattr(tree[1], '__name__', 'f')}([{', '.join(render(t) for t in tree[2])}])"
    if tree[0] == "f2":
        return f"{getattr(tree[1], '__name__', 'f')}({render(tree[2])}, {render(tree[3])})"
    return f"({render(tree[2])} {_SYMBOLS[tree[1]]} {render(tree[3])})"
