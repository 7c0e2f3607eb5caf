"""A recipe's declarations, evaluated before its merge blocks: params (with `--set` / keyword
overrides and ranges), params derived from run-time params, and model declarations (opened as
checkpoints or derived sources). The compiler's stages call these (compiler.STAGES); every
declaration is evaluated through `evaluate_declaration`, the one place that turns an
evaluation error into a diagnostic.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

from mergelang.diagnostics import CompileError, Diagnostic, Diagnostics, MergelangError, error
from mergelang.io.checkpoint import CheckpointError, DictSource, ModelSource
from mergelang.io.inputs import is_hf_id
from mergelang.io.locate import model_error, open_model
from mergelang.lang.loader import Unit
from mergelang.lang.ranges import ParamRange, param_range
from mergelang.lang.values import Const, ListV, Poisoned, Value, add_size, too_big


def not_a_value(kind: str, decl: Any) -> Diagnostic:
    return error("E201", f"{kind} `{decl.name}` uses a model's tensors; a {kind} is a value known "
                 "at compile time", decl.value.span,
                 "compute with tensors inside a rule or a function; a param may hold numbers, "
                 "strings and lists")


def evaluate_declaration(el: Any, decl: Any, kind: str, diags: Diagnostics) -> Value | None:
    """The value of a `param`, `model` or `option` declaration, or None after adding why it has
    none (its evaluation error, or E201 when it reads a model's tensors)."""
    try:
        return el.eval(decl.value, {})
    except CompileError as exc:
        diags.add(exc.diag)
    except Poisoned:  # a tensor of a model: declarations are values known at compile time
        diags.add(not_a_value(kind, decl))
    return None


def bad_param_value(v: Any, depth: int = 0) -> str | None:
    """None when `v` can be a param's value, else what it is (for the diagnostic)."""
    if v is None or isinstance(v, (bool, int, str)):
        return None
    if isinstance(v, float):
        return None if math.isfinite(v) else f"the non-finite number {v}"
    if isinstance(v, (list, tuple)) and depth < 16:
        for item in v:
            bad = bad_param_value(item, depth + 1)
            if bad is not None:
                return f"a list holding {bad}"
        return None
    kind = type(v).__name__
    return f"{'an' if kind[0] in 'aeiouAEIOU' else 'a'} {kind}" + (
        " (a state dict is a model, not a param)" if isinstance(v, Mapping) else "")


def to_value(v: Any) -> Value:
    if isinstance(v, (list, tuple)):
        return ListV(tuple(to_value(i) for i in v))
    return Const(v)


def evaluate_params(unit: Unit, el: Any, overrides: Mapping[str, Any], params: dict[str, Value],
                    diags: Diagnostics) -> tuple[dict[str, ParamRange | None], bool]:
    """Fill `params` (the dict `el`'s context reads, so a param sees those declared before it);
    returns the params' ranges (`param x = v in [lo, hi]`, lang/ranges.py) and whether every
    param has a value."""
    ranges: dict[str, ParamRange | None] = {}
    ok = True
    held = (0, 0)  # elements and characters of the params' values so far
    for decl in unit.params:
        if decl.name in overrides:
            if not _override(decl, overrides[decl.name], params, diags):
                ok = False
                continue
            ranges[decl.name] = param_range(decl, params[decl.name], lambda e: el.eval(e, {}), diags, True)
            continue
        value = evaluate_declaration(el, decl, "param", diags)
        if value is None:
            ok = False
            continue
        if not isinstance(value, (Const, ListV)):
            ok = False
            diags.add(error("E201", f"param `{decl.name}` must be a number, bool, string or list, not "
                            f"{value.describe()}", decl.value.span))
            continue
        held, over = add_size(held, value)
        if over:
            ok = False
            diags.add(error("E329", f"{over} (at `{decl.name}`)", decl.value.span))
            continue
        params[decl.name] = value
        ranges[decl.name] = param_range(decl, value, lambda e: el.eval(e, {}), diags, False)
    return ranges, ok


def _override(decl: Any, given: Any, params: dict[str, Value], diags: Diagnostics) -> bool:
    """Set a param to the value given by --set or a keyword argument (False: E401, E329)."""
    bad = bad_param_value(given)
    if bad is not None:
        diags.add(error("E401", f"param `{decl.name}` cannot be set to {bad}", decl.value.span,
                        "a param is a number, bool, string, none or a list of them"))
        return False
    params[decl.name] = to_value(given)
    big = too_big(params[decl.name])
    if big is not None:
        diags.add(error("E329", f"param `{decl.name}`'s value is too large: {big}", decl.value.span))
        return False
    return True


def derive_params(unit: Unit, el: Any, overrides: Mapping[str, Any], derived: dict[str, Value]) -> None:
    """Params declared from run-time params (`param b = 1 - a` with `a` tuned) are evaluated
    again with them, so they follow each run's values (as a compilation with those values
    would); one the compiler cannot evaluate that way keeps its compile-time value and makes
    the run-time param static (its evaluation error surfaces when the rules read it). Fills
    `derived` (the dict `el`'s context reads)."""
    from mergelang.lang.ast import names_in
    from mergelang.lang.values import Deferred

    if not el.runtime:
        return

    def deferred(v: Value) -> bool:
        if isinstance(v, Const):
            return isinstance(v.value, Deferred)
        return isinstance(v, ListV) and any(deferred(i) for i in v.items)

    live = set(el.runtime)
    for decl in unit.params:
        if decl.name in live or decl.name in overrides or not (names_in(decl.value) & live):
            continue
        try:
            value = el.eval(decl.value, {})
        except CompileError as exc:  # needs the number while compiling: static
            raise MergelangError(exc.diag.with_note(f"while evaluating param `{decl.name}` from "
                                                    "run-time params")) from None
        if deferred(value):
            derived[decl.name] = value
            live.add(decl.name)


def open_models(unit: Unit, el: Any, overrides: Mapping[str, Any], diags: Diagnostics,
                allow_pickle: bool = False, follow: bool = False) -> dict[str, ModelSource | None]:
    """Every declared model, opened (None where it cannot be: reported); derived models
    (`lora(...)`, `stack_layers(...)`, ...) once the checkpoints they use are open."""
    models: dict[str, ModelSource | None] = {}
    adapters = []
    for decl in unit.models:
        models[decl.name] = None
        if decl.name in overrides:
            value: Any = overrides[decl.name]
        else:
            v = evaluate_declaration(el, decl, "model", diags)
            if v is None:
                continue
            if isinstance(v, Const) and hasattr(v.value, "open_model"):  # lora(), stack_layers()
                adapters.append((decl, v.value))
                continue
            if not (isinstance(v, Const) and isinstance(v.value, str)):
                diags.add(error("E201", f"model `{decl.name}` needs a path string, not {v.describe()}",
                                decl.value.span, 'e.g. model base = "./llama-base"'))
                continue
            value = v.value
        models[decl.name] = _open(unit, decl, value, decl.name in overrides, diags, allow_pickle, follow)
    for decl, spec in adapters:  # derived models, once the checkpoints they use are open
        spec.open_model(decl, models, unit.base_dir, diags, {d.name for d, _ in adapters})
    return models


def _open(unit: Unit, decl: Any, value: Any, from_cli: bool, diags: Diagnostics, allow_pickle: bool,
          follow: bool) -> ModelSource | None:
    """One model: a source given in Python, a state dict, or a checkpoint path or hub id."""
    if isinstance(value, ModelSource):
        return value
    if isinstance(value, Mapping):
        try:
            return DictSource(decl.name, value)
        except CheckpointError as exc:
            diags.add(error(exc.code, f"model `{decl.name}`: {exc}", decl.span, exc.help))
        return None
    if not isinstance(value, (str, os.PathLike)):
        diags.add(error("E201", f"model `{decl.name}` needs a path or a state dict, not "
                        f"{type(value).__name__}", decl.value.span))
        return None
    where: str | Path = str(value)
    try:
        if not is_hf_id(str(value)):
            where = model_path(value, unit.base_dir, from_cli)
        return open_model(decl.name, where, allow_pickle=allow_pickle, follow_symlinks=follow)
    except (OSError, ValueError, CheckpointError) as exc:
        diags.add(model_error(decl.name, str(where), exc, decl.value.span).diag)
    return None


def overridden(overrides: Mapping[str, Any], unit: Unit) -> dict[str, Any]:
    """The declarations set by --set / keyword arguments: name -> the value used (model paths
    made absolute), for the recipe copy in the output."""
    models = {d.name for d in unit.models}
    out: dict[str, Any] = {}
    for name, value in overrides.items():
        if name in models and isinstance(value, (str, os.PathLike)) and not is_hf_id(str(value)):
            try:
                value = str(model_path(value, unit.base_dir, True).resolve())
            except (OSError, ValueError):
                pass
        out[name] = value
    return out


def model_path(value: str | os.PathLike, base_dir: Path, from_cli: bool) -> Path:
    """A model path: relative paths written in the recipe resolve against the recipe's folder,
    those given on the command line or in Python (`--set`, keyword overrides) against the
    current directory."""
    if "\0" in str(value):
        raise ValueError("the path contains a NUL character")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (Path.cwd() if from_cli else base_dir) / path
    return path
