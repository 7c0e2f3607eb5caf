"""What an output records about how it was made: the recipe copy with the values actually used
(``--set`` and keyword overrides written into their declarations), and the params for the
manifest. Rerunning the copied recipe reproduces the output."""

from __future__ import annotations

import math
from typing import Any

from mergelang.lang.values import Const, ListV, Value


def literal(v: Any) -> str | None:
    """`v` as recipe literal text, or None when it has none (e.g. an in-memory state dict)."""
    import json

    if isinstance(v, Value):
        v = plain(v)
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return None
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        items = [literal(i) for i in v]
        return None if any(i is None for i in items) else "[" + ", ".join(items) + "]"  # type: ignore[arg-type]
    if hasattr(v, "__fspath__"):
        return json.dumps(str(v))
    return None


def plain(v: Value) -> Any:
    """A param's value as plain Python (numbers, strings, nested lists)."""
    if isinstance(v, ListV):
        return [plain(i) for i in v.items]
    if isinstance(v, Const):
        return v.value
    return None


def used_params(c: Any) -> dict[str, Any]:
    """Every param's value in this compilation (JSON-able; non-finite floats as strings)."""
    out: dict[str, Any] = {}
    for name, value in c.params.items():
        out[name] = _jsonable(plain(value))
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, list):
        return [_jsonable(i) for i in v]
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


def recipe_copy(c: Any) -> str:
    """The recipe's text with each overridden param or model declaration showing the value used
    (and the recipe's own value in a comment after the line)."""
    text = c.source.text
    edits: list[tuple[int, int, str, str]] = []
    for decl in [*c.unit.params, *c.unit.models]:
        if decl.name not in c.overridden or decl.span.source is not c.source:
            continue
        used = c.overridden[decl.name]
        if decl in c.unit.params:
            used = c.params.get(decl.name, used)
        lit = literal(used)
        span = decl.value.span
        old = text[span.start:span.end]
        if lit is None:
            lit, note = old, f"overridden with a value that has no recipe literal ({type(used).__name__})"
        else:
            note = f"overridden (--set {decl.name}=...); the recipe said: {' '.join(old.split())}"
        edits.append((span.start, span.end, lit, note))
    for start, end, lit, note in sorted(edits, reverse=True):
        eol = text.find("\n", end)
        eol = len(text) if eol < 0 else eol
        text = text[:start] + lit + text[end:eol] + f"  # {note}" + text[eol:]
    return text
