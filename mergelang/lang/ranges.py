"""Ranges on params: `param lam = 0.3 in [0.0, 1.0]`, `param w = [1, 1] in [0, 2]` (each
element), `param lr = 1e-3 in [1e-5, 1e-1] log` (log-uniform), integer ranges for integer params.
The bounds are numbers known at compile time (E406 otherwise, or when lo > hi, or `log` with
lo <= 0); the param's value — the recipe's default or a `--set` / keyword override — must lie
in the range, every element of a list (E405). `tune` samples within these ranges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mergelang.diagnostics import Diagnostics, error
from mergelang.lang import ast
from mergelang.lang.values import ListV, Value, is_number


@dataclass(frozen=True)
class ParamRange:
    lo: float
    hi: float
    log: bool = False
    integer: bool = False  # integer bounds and an integer value: sampled as integers

    def render(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if self.integer else f"{x:g}"

        return f"[{num(self.lo)}, {num(self.hi)}]" + (" log" if self.log else "")


def _numbers(v: Value) -> list[Any] | None:
    """The numbers of a value (nested lists flattened); None when anything else is in it."""
    if is_number(v):
        return [v.value]  # type: ignore[union-attr]
    if isinstance(v, ListV):
        out: list[Any] = []
        for item in v.items:
            got = _numbers(item)
            if got is None:
                return None
            out += got
        return out
    return None


def check_range(decl: ast.ParamDecl, value: Value, bounds: tuple[Value, Value] | None,
                diags: Diagnostics, overridden: bool) -> ParamRange | None:
    """The param's range (None without one), after checking it and the value against it."""
    if decl.lo is None or decl.hi is None or bounds is None:
        return None
    lo, hi = bounds
    span = decl.lo.span
    if not (is_number(lo) and is_number(hi)):
        diags.add(error("E406", f"param `{decl.name}`: a range needs two numbers known at compile "
                        "time", span, "e.g. param lam = 0.3 in [0.0, 1.0]"))
        return None
    a, b = lo.value, hi.value  # type: ignore[union-attr]
    if a > b:
        diags.add(error("E406", f"param `{decl.name}`: the range [{a:g}, {b:g}] is empty (lo > hi)",
                        span))
        return None
    if decl.log and a <= 0:
        diags.add(error("E406", f"param `{decl.name}`: a log range needs lo > 0, got {a:g}", span,
                        "log-uniform sampling works on positive numbers"))
        return None
    nums = _numbers(value)
    where = decl.value.span
    if nums is None or not nums:
        diags.add(error("E406", f"param `{decl.name}` has a range, so its value must be a number or "
                        f"a list of numbers, not {value.describe()}", where))
        return None
    integer = all(isinstance(x, int) and not isinstance(x, bool) for x in (a, b, *nums))
    rng = ParamRange(float(a), float(b), decl.log, integer)
    bad = [x for x in nums if not a <= x <= b]
    if bad:
        how = "is set to" if overridden else "defaults to"
        diags.add(error("E405", f"param `{decl.name}` {how} {bad[0]:g}, outside its range "
                        f"{rng.render()}", where,
                        "widen the range or change the value" + (" given with --set" if overridden else "")))
    return rng


def param_range(decl: ast.ParamDecl, value: Value, evaluate: Any, diags: Diagnostics,
                overridden: bool) -> ParamRange | None:
    """`check_range` with the bounds evaluated by `evaluate(expr)` (compile-time values)."""
    from mergelang.diagnostics import CompileError
    from mergelang.lang.values import Poisoned

    if decl.lo is None or decl.hi is None:
        return None
    try:
        bounds = (evaluate(decl.lo), evaluate(decl.hi))
    except CompileError as exc:
        diags.add(exc.diag)
        return None
    except Poisoned:
        bounds = None
        diags.add(error("E406", f"param `{decl.name}`: a range needs two numbers known at compile "
                        "time", decl.lo.span))
    return check_range(decl, value, bounds, diags, overridden)




def runtime_params(unit: Any, params: dict[str, Value], names: tuple[str, ...],
                   diags: Diagnostics) -> dict[str, Value]:
    """The params `names` (to be compiled as run-time inputs) with their values, which type the
    graph. Each must be a declared param holding numbers (E901); a `learn` declaration must too."""
    decls = {d.name: d for d in unit.params}
    for d in unit.params:
        if d.learn and d.name in params and _numbers(params[d.name]) is None:
            diags.add(error("E901", f"param `{d.name}` is declared `learn` but holds "
                            f"{params[d.name].describe()}, not numbers", d.value.span,
                            "only numbers (or lists of numbers) can be learned"))
    out: dict[str, Value] = {}
    for name in names:
        if name not in decls:
            diags.add(error("E901", f"cannot tune or learn `{name}`: the recipe declares no param "
                            f"`{name}`", None, f"params: {', '.join(decls) or 'none'}"))
        elif name in params:
            if _numbers(params[name]) is None:
                diags.add(error("E901", f"param `{name}` holds {params[name].describe()}: only "
                                "numbers (or lists of numbers) can be tuned or learned",
                                decls[name].value.span))
            else:
                out[name] = params[name]
    return out
