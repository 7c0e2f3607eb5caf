"""Static checks that need no checkpoint: names, functions, call arity and keywords, duplicate
definitions and recursion. They run over every function and rule, so an error in a rule that
matches no tensor is still reported (elaboration only visits what tensors reach)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import networkx as nx

from mergelang.lang import ast
from mergelang.diagnostics import Diagnostics, did_you_mean, error
from mergelang.lang.elaborate import signature_of
from mergelang.lang.intrinsics import INTRINSICS
from mergelang.lang.loader import Unit
from mergelang.lang.values import Signature


def check_unit(unit: Unit, diags: Diagnostics, user_only: bool = True) -> None:
    globals_ = _globals(unit, diags)
    calls = nx.DiGraph()
    for fn in unit.fns.values():
        if user_only and fn.span.source.library:
            continue
        scope = set(globals_)
        seen: dict[str, ast.Node] = {}
        for p in fn.params:
            if p.name in seen:
                diags.add(error("E106", f"parameter `{p.name}` appears twice in `{fn.name}`", p.span))
            seen[p.name] = p
            if p.default is not None:
                _expr(p.default, scope, unit, diags, calls, fn.name)
            scope.add(p.name)
        for let in fn.lets:
            _expr(let.value, scope, unit, diags, calls, fn.name)
            if let.name in seen:
                diags.add(error("E106", f"`{let.name}` is already defined in `{fn.name}`", let.span,
                                "pick another name for this `let`"))
            seen[let.name] = let
            scope.add(let.name)
        _expr(fn.ret, scope, unit, diags, calls, fn.name)
    top = set(globals_)  # shared, never changed: one copy per declaration made this quadratic
    for decl in [*unit.params, *unit.options, *unit.models]:
        _expr(decl.value, top, unit, diags, calls, None)
    for block in unit.blocks:
        for rule in block.rules:
            scope = top | set(rule.pattern.captures) if rule.pattern.captures else top
            if rule.guard is not None:
                _expr(rule.guard, scope, unit, diags, calls, None)
            _expr(rule.expr, scope, unit, diags, calls, None)
    for cycle in nx.simple_cycles(calls):
        fn = unit.fns[cycle[0]]
        path = " -> ".join([*cycle, cycle[0]])
        diags.add(error("E108", f"recursive function: {path}", fn.name_span,
                        "functions are inlined at compile time and cannot call themselves"))


def _globals(unit: Unit, diags: Diagnostics) -> dict[str, ast.Node]:
    out: dict[str, ast.Node] = {}
    for decl in [*unit.models, *unit.params]:
        if decl.name in out:
            diags.add(error("E106", f"`{decl.name}` is declared twice", decl.span,
                            notes=(("first declared here", out[decl.name].span),)))
            continue
        out[decl.name] = decl
    return out


def signature(name: str, fns: Mapping[str, ast.FnDef], plugins: Mapping[str, Any] | None = None) -> Signature | None:
    if name in fns:
        return signature_of(fns[name])
    if name in INTRINSICS:
        return INTRINSICS[name].sig
    if plugins and name in plugins:
        from mergelang.lang.plugins import as_intrinsic

        return as_intrinsic(plugins[name]).sig
    return None


def _expr(e: ast.Expr, scope: set[str], unit: Unit, diags: Diagnostics, calls: nx.DiGraph,
          caller: str | None) -> None:
    for node in _walk(e):
        if isinstance(node, ast.ListComp):
            _comprehension(node, scope, unit, diags, calls, caller)
        elif isinstance(node, ast.Name) and node.id not in scope:
            diags.add(error("E101", f"unknown name `{node.id}`", node.span,
                            did_you_mean(node.id, scope)))
        elif isinstance(node, ast.Call):
            sig = signature(node.func, unit.fns, unit.plugins)
            if sig is None:
                diags.add(error("E102", f"unknown function `{node.func}`", node.func_span,
                                did_you_mean(node.func, list(unit.fns) + list(INTRINSICS) + list(unit.plugins))))
                continue
            if caller is not None and node.func in unit.fns:
                calls.add_edge(caller, node.func)
            _check_call(node, sig, diags)


def _comprehension(node: ast.ListComp, scope: set[str], unit: Unit, diags: Diagnostics,
                   calls: nx.DiGraph, caller: str | None) -> None:
    """A comprehension's names: each clause's iterable sees the targets of the clauses before it,
    its filter and the element see its own too (E111: a target named twice)."""
    inner = set(scope)
    bound: set[str] = set()
    for c in node.clauses:
        _expr(c.iter, inner, unit, diags, calls, caller)
        for name in c.targets:
            if name in bound:
                diags.add(error("E111", f"`{name}` is bound twice in this comprehension", c.span,
                                "give each `for` target its own name"))
            bound.add(name)
        inner = inner | set(c.targets)
        if c.cond is not None:
            _expr(c.cond, inner, unit, diags, calls, caller)
    _expr(node.elt, inner, unit, diags, calls, caller)


def _check_call(node: ast.Call, sig: Signature, diags: Diagnostics) -> None:
    names = sig.names
    if len(node.args) > len(names):
        diags.add(error("E105", f"`{sig.name}` takes {len(names)} arguments, got {len(node.args)}",
                        node.args[len(names)].span, f"signature: {sig.render()}"))
    given = set(names[: len(node.args)])
    for kw in node.kwargs:
        if kw.name not in names:
            diags.add(error("E103", f"unknown keyword argument `{kw.name}` for `{sig.name}`", kw.span,
                            did_you_mean(kw.name, names) or f"signature: {sig.render()}"))
        elif kw.name in given:
            diags.add(error("E107", f"argument `{kw.name}` given twice", kw.span))
        given.add(kw.name)
    for p in sig.params:
        if p.required and p.name not in given and len(node.args) <= len(names):
            diags.add(error("E104", f"`{sig.name}` needs argument `{p.name}`", node.span,
                            f"signature: {sig.render()}"))


def _walk(e: ast.Expr) -> Iterable[ast.Node]:
    stack: list[ast.Node] = [e]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.ListExpr):
            stack.extend(node.items)
        elif isinstance(node, ast.ListComp):
            continue  # its names are scoped: _comprehension walks it
        elif isinstance(node, ast.Unary):
            stack.append(node.operand)
        elif isinstance(node, ast.Binary):
            stack.extend((node.left, node.right))
        elif isinstance(node, ast.IfExpr):
            stack.extend((node.cond, node.then, node.else_))
        elif isinstance(node, ast.Call):
            stack.extend(node.args)
            stack.extend(kw.value for kw in node.kwargs)
        elif isinstance(node, ast.Index):
            stack.extend((node.target, node.index))
