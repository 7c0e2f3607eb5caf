"""Compile-time arithmetic: what `param p = 2 * x + 1`, guards and list math evaluate to."""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

from mergelang.diagnostics import Span
from mergelang.lang import ast
from mergelang.lang.values import MAX_STRING_CHARS, Const

#: compile-time integers stay below 2**MAX_INT_BITS (a bound on work: `10 ** 10 ** 10` would
#: take hours to compute and gigabytes to hold)
MAX_INT_BITS = 256

PYOPS: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
    "floordiv": operator.floordiv, "mod": operator.mod, "pow": operator.pow, "eq": operator.eq,
    "ne": operator.ne, "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
}


def compile_time_op(op: str, x: Any, y: Any, span: Span, err: Callable[..., Exception]) -> Any:
    """`x op y` for numbers, strings and bools known at compile time; `err(code, message, span,
    help=None)` makes the diagnostic to raise. Results stay bounded (MAX_INT_BITS, finite
    floats): `10 ** 10 ** 10` is an error, not hours of work."""
    if isinstance(x, str) or isinstance(y, str) or x is None or y is None:
        if op in ("eq", "ne"):
            return PYOPS[op](x, y)
        if op == "add" and isinstance(x, str) and isinstance(y, str):
            if len(x) + len(y) > MAX_STRING_CHARS:
                raise err("E329", f"this string would have {len(x) + len(y)} characters, more than "
                          f"the {MAX_STRING_CHARS} a compile-time string may have", span)
            return x + y
        raise err("E201", f"cannot apply `{ast.BINARY_SYMBOLS[op]}` to "
                  f"{Const(x).describe()} and {Const(y).describe()}", span)
    if op in ("and", "or"):
        if not (isinstance(x, bool) and isinstance(y, bool)):
            raise err("E201", f"`{op}` needs bools", span)
        return (x and y) if op == "and" else (x or y)
    if op == "pow" and isinstance(x, int) and isinstance(y, int) and y > 0 and abs(x) > 1 \
            and y * (abs(x).bit_length() - 1) > MAX_INT_BITS:  # decided before computing it
        raise err("E203", f"{x} ** {y} is out of range (compile-time integers stay "
                  f"below 2**{MAX_INT_BITS})", span)
    try:
        out = PYOPS[op](x, y)
    except ZeroDivisionError:
        raise err("E205", "division by zero", span) from None
    except (OverflowError, ValueError) as exc:
        raise err("E203", f"invalid arithmetic: {exc}", span) from None
    if isinstance(out, complex):
        raise err("E203", "this power has no real value", span)
    if isinstance(out, int) and not isinstance(out, bool) and out.bit_length() > MAX_INT_BITS:
        raise err("E203", f"the result is out of range (compile-time integers stay "
                  f"below 2**{MAX_INT_BITS})", span)
    if isinstance(out, float) and not math.isfinite(out):
        raise err("E203", f"the result {out} is not a finite number", span,
                         "compile-time arithmetic stays within 64-bit floats")
    return out
