"""What an output records about how it was made: the recipe copy with the values actually used
(``--set`` and keyword overrides written into their declarations), and the params for the
manifest. Rerunning the copied recipe reproduces the output."""

from __future__ import annotations

import math
import os
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


def recipe_copy(c: Any, origins: dict[str, str] | None = None) -> str:
    """The recipe's text, rewritten to rerun from anywhere and to show the values used:

    * each overridden param or model declaration shows the value used, with where it came from
      (`origins`: param -> e.g. "tune: trial 3 of study 's'"; else "--set") and the recipe's own
      value in a comment after the line;
    * every relative path (model strings, e.g. ``"./a"`` or ``lora(base, "./ad")``, and
      ``import`` paths) is made absolute, and a ``"hf:ORG/NAME"`` model without a revision is
      pinned to the cached snapshot's commit (``hf:ORG/NAME@COMMIT``).

    Every value written is a JSON string literal (which the recipe grammar reads back), so a path
    holding quotes, backslashes or newlines cannot break out of its string."""
    from mergelang.lang import ast

    text = c.source.text
    origins = origins or {}
    edits: list[tuple[int, int, str, str]] = []
    done: set[str] = set()
    for decl in [*c.unit.params, *c.unit.models]:
        if decl.name not in c.overridden or decl.span.source is not c.source:
            continue
        done.add(decl.name)
        used = c.overridden[decl.name]
        if decl in c.unit.params:
            used = c.params.get(decl.name, used)
        elif isinstance(used, str):  # an hf: id given with --set: pinned to its revision
            used = _rebased(used, c.base_dir, c.models.get(decl.name)) or used
        lit = literal(used)
        span = decl.value.span
        old = text[span.start:span.end]
        said = " ".join(old.split())
        if lit is None:
            lit, note = old, f"overridden with a value that has no recipe literal ({type(used).__name__})"
        elif origins.get(decl.name, "--set") in ("--set", "keyword argument", "default"):
            how = "keyword argument" if origins.get(decl.name) == "keyword argument" else "--set"
            note = f"overridden ({how} {decl.name}=...); the recipe said: {said}"
        else:
            note = f"chosen by {_one_line(origins[decl.name])}; the recipe said: {said}"
        edits.append((span.start, span.end, lit, note))
    base = c.base_dir
    for decl in c.unit.models:
        if decl.name in done or decl.span.source is not c.source:
            continue
        for node in _strings(decl.value):
            new = _rebased(node.value, base, c.models.get(decl.name) if node is decl.value else None)
            if new is not None and new != node.value:
                edits.append((node.span.start, node.span.end, literal(new) or "",
                              f"the recipe said: {literal(node.value)}"))
    for item in c.unit.program.of(ast.Import):
        if item.span.source is c.source and not os.path.isabs(item.path) and "\0" not in item.path:
            new = os.path.abspath(base / item.path)
            edits.append((item.span.start, item.span.end, f"import {literal(new)}",
                          f"the recipe said: import {literal(item.path)}"))
    for start, end, lit, note in sorted(edits, reverse=True):
        eol = text.find("\n", end)
        eol = len(text) if eol < 0 else eol
        text = text[:start] + lit + text[end:eol] + f"  # {_one_line(note)}" + text[eol:]
    return text


def _one_line(s: str) -> str:
    """`s` safe inside a `#` comment: one line."""
    return " ".join(s.replace("\r", " ").replace("\n", " ").split())


def _strings(e: Any) -> list[Any]:
    """The string literals of a model declaration's value, outermost first."""
    import dataclasses

    from mergelang.lang import ast

    out, stack = [], [e]
    while stack:
        x = stack.pop()
        if isinstance(x, ast.String):
            out.append(x)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            stack.extend(getattr(x, f.name) for f in reversed(dataclasses.fields(x)))
        elif isinstance(x, (tuple, list)):
            stack.extend(reversed(x))
    return out


def _rebased(value: str, base: Any, source: Any) -> str | None:
    """A model string made to resolve from anywhere: a relative path that exists (against the
    recipe's folder) made absolute; ``hf:ORG/NAME`` pinned to its snapshot's revision (when
    `source`, the model opened from it, is a cache snapshot folder); else None (unchanged)."""
    from pathlib import Path

    from mergelang.io.inputs import hf_revision, is_hf_id

    if "\0" in value:
        return None
    if is_hf_id(value):
        if "@" in value or source is None or getattr(source, "folder", None) is None:
            return None
        rev = hf_revision(Path(source.folder))
        return f"{value}@{rev}" if rev else None
    path = Path(value).expanduser()
    if path.is_absolute() or not (base / path).exists():
        return None
    return os.path.abspath(base / path)
