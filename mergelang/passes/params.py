"""Run-time params: compile once, run with many values (`tune`, `learn`).

A param compiled as run-time (`compile_recipe(..., runtime=...)`) is, in the elaborator, a
`Deferred` number (lang/values.py): compile-time arithmetic on it (`1 - w`, `sum(w)`,
`lam * 2`) builds an expression (ir/paramexpr.py) instead of a folded constant, and where it
meets a tensor it becomes a `PARAM` node holding that expression, which the optimizer cannot fold
and fusion treats as an input of its loops, like a statistic. Ops that need the number itself in
their attrs (a top-k density) hold a `ParamRef` there.

`ParamFiller` is made once per final plan; `fill(values)` returns the plan with every `PARAM`
replaced by a `CONST` of its expression evaluated in Python — the very arithmetic the compiler
would have folded, so a filled plan computes the same bits as a compilation with those values —
(same node ids, so the lowered schedule stays valid) and every `ParamRef` by its number: a few
dictionary updates per trial, no re-elaboration, no re-planning.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Mapping

from mergelang.ir.graph import MergeGraph, Node
from mergelang.ir.ops import Attrs, Op, ParamRef

if TYPE_CHECKING:
    import torch


def unset(node: Node, args: list["torch.Tensor"]) -> "torch.Tensor":
    """The kernel of a PARAM left in a plan (registered by the executor)."""
    raise RuntimeError(f"internal: run-time param {node.attrs['expr']} was not given a value")


def element(values: Mapping[str, Any], name: str, path: tuple[int, ...]) -> Any:
    """The number at `path` inside param `name`'s value."""
    v = values[name]
    for i in path:
        v = v[i]
    return v


def value_of(expr: tuple, values: Mapping[str, Any]) -> Any:
    """An expression over params, evaluated with Python numbers as compile-time folding does
    (errors: E205 for a division by zero, E203 for a result that is not a finite number)."""
    import math

    from mergelang.diagnostics import MergelangError, error
    from mergelang.ir.paramexpr import evaluate, render

    try:
        out = evaluate(expr, lambda name, path: element(values, name, path))
    except ZeroDivisionError:
        raise MergelangError(error("E205", f"division by zero in {render(expr)} with the values "
                                   "given")) from None
    except (OverflowError, ValueError) as exc:
        raise MergelangError(error("E203", f"invalid arithmetic in {render(expr)}: {exc}")) from None
    if isinstance(out, complex) or (isinstance(out, float) and not math.isfinite(out)):
        raise MergelangError(error("E203", f"{render(expr)} is not a finite number with the values given"))
    return out


def _has_ref(v: Any) -> bool:
    if isinstance(v, ParamRef):
        return True
    if isinstance(v, tuple):
        return any(_has_ref(x) for x in v)
    if isinstance(v, Node):
        return any(_has_ref(x) for x in v.attrs.values())
    return False


def _sub(v: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(v, ParamRef):
        return float(value_of(v.expr, values))
    if isinstance(v, tuple):
        return tuple(_sub(x, values) for x in v)
    if isinstance(v, Node) and _has_ref(v):
        return Node(v.op, v.args, sub_attrs(v.attrs, values), v.type, v.span)
    return v


def sub_attrs(attrs: Attrs, values: Mapping[str, Any]) -> Attrs:
    return Attrs({k: _sub(x, values) for k, x in attrs.items()})


def _check_density(n: Node) -> None:
    d = n.attrs.get("density")
    if d is None and n.op is Op.FUSED and n.attrs.get("select") is not None:
        d = n.attrs["select"][0]
    for v in (d if isinstance(d, tuple) else (d,)):
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"density must be between 0 and 1, got {v}")


def param_nodes(g: MergeGraph) -> tuple[list[int], list[int]]:
    """(PARAM node ids, ids of nodes whose attrs hold a ParamRef)."""
    params, refs = [], []
    for nid, n in g.items():
        if n.op is Op.PARAM:
            params.append(nid)
        elif any(_has_ref(v) for v in n.attrs.values()):
            refs.append(nid)
    return params, refs


def runtime_names(g: MergeGraph) -> set[str]:
    """The run-time params a graph reads."""
    from mergelang.ir.paramexpr import names

    out: set[str] = set()
    for _, n in g.items():
        if n.op is Op.PARAM:
            out |= names(n.attrs["expr"])
        for v in n.attrs.values():
            _collect(v, out)
    return out


def _collect(v: Any, out: set[str]) -> None:
    from mergelang.ir.paramexpr import names

    if isinstance(v, ParamRef):
        out |= names(v.expr)
    elif isinstance(v, tuple):
        for x in v:
            _collect(x, out)
    elif isinstance(v, Node):
        for x in v.attrs.values():
            _collect(x, out)


class ParamFiller:
    """Fills the run-time params of one final plan (and its statistics passes) per trial."""

    def __init__(self, plan: Any):
        self.plan = plan
        self._where = [param_nodes(p.graph) for p in (plan, *plan.prepasses)]

    def fill(self, values: Mapping[str, Any]) -> Any:
        """The plan with `values` ({name: number or nested list}) in place of its params."""
        graphs = [self._fill_graph(p.graph, where, values)
                  for p, where in zip((self.plan, *self.plan.prepasses), self._where)]
        pre = tuple(replace(p, graph=g) for p, g in zip(self.plan.prepasses, graphs[1:]))
        return replace(self.plan, graph=graphs[0], prepasses=pre)

    @staticmethod
    def _fill_graph(g: MergeGraph, where: tuple[list[int], list[int]], values: Mapping[str, Any]
                    ) -> MergeGraph:
        params, refs = where
        if not params and not refs:
            return g
        g = g.clone()
        for nid in params:
            n = g.node(nid)
            value = float(value_of(n.attrs["expr"], values))  # as the elaborator's to_node
            g.set_node(nid, Node(Op.CONST, (), Attrs(value=value, type=n.type), n.type, n.span))
        for nid in refs:
            n = g.node(nid)
            new = Node(n.op, n.args, sub_attrs(n.attrs, values), n.type, n.span)
            _check_density(new)
            g.set_node(nid, new)
        return g
