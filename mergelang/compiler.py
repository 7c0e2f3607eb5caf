"""The compiler driver: recipe text -> checked graph -> optimized graph -> execution plan.

`compile_recipe` runs every stage up to the requested one, collecting diagnostics; it raises one
`MergelangError` carrying all errors found (warnings are kept on the result).
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from pydantic import ValidationError

from mergelang.lang import ast
from mergelang.io.checkpoint import CheckpointError, DictSource, ModelSource
from mergelang.io.locate import model_error, open_model
from mergelang.diagnostics import (CompileError, Diagnostic, Diagnostics, MergelangError, SourceFile,
                          did_you_mean, error, warning)
import mergelang.sources  # noqa: F401  (registers lora, stack_layers, layer_range, align)
from mergelang.lang.elaborate import Elaborator
from mergelang.lang.values import Poisoned
from mergelang.ir.graph import MergeGraph
from mergelang.io.inputs import RECIPE_FILENAME, is_hf_id, reference_files
from mergelang.lang.loader import Unit, load
from mergelang.lang.plugins import plugins_for
from mergelang.options import RecipeOptions, option_names, validation_message
from mergelang.lang.parser import parse_expr
from mergelang.passes.optimize import optimize
from mergelang.passes.plan import ExecutionPlan, lower
from mergelang.lang.resolve import check_unit
from mergelang.passes.stats import split_stats
from mergelang.lang.values import Const, ListV, Value, add_size, too_big
from mergelang.lang.ranges import ParamRange, param_range, runtime_params
from mergelang.io.architectures import different_architectures
from mergelang.sources.fp8 import dequantize_models, mixed_formats
from mergelang.sources.outputs import link_outputs
from mergelang.sources.tokenizer import retokenize_models
from mergelang.sources.vocab import improve_diagnostics, resize_models

STAGES = ("ast", "graph", "optimized", "plan")


@dataclass
class Compilation:
    source: SourceFile
    base_dir: Path
    unit: Unit
    models: dict[str, ModelSource | None]
    params: dict[str, Value]
    options: RecipeOptions
    reference: str
    graph: MergeGraph
    optimized: MergeGraph
    plan: ExecutionPlan
    warnings: list[Diagnostic] = field(default_factory=list)
    #: model name -> the small files (config.json, tokenizer, ...) an output merged from it
    #: copies, checked at compile time (inside the model folder, JSON that parses)
    copies: dict[str, dict[str, Path]] = field(default_factory=dict)
    #: declarations overridden by --set / keyword arguments: name -> the value used (model
    #: paths made absolute), for the recipe copy in the output (provenance.py)
    overridden: dict[str, Any] = field(default_factory=dict)
    #: params declared with a range (`param x = v in [lo, hi]`): name -> its range
    ranges: dict[str, ParamRange] = field(default_factory=dict)
    #: params compiled as run-time inputs (PARAM nodes, passes/params.py): given per run
    runtime: tuple[str, ...] = ()

    @property
    def learnable(self) -> tuple[str, ...]:
        """The params declared `learn`."""
        return tuple(d.name for d in self.unit.params if d.learn)

    @property
    def inputs(self) -> tuple[Path, ...]:
        """Every input path (model folders and files, the recipe, imported recipes): an output
        path must not be, contain or lie inside any of them. Computed when a run needs it (it
        walks every tensor's file), not on the `check` path."""
        return input_paths(self.source, self.unit, self.models)

    @property
    def output_names(self) -> tuple[str, ...]:
        """The named outputs (`merge "NAME" from ...`), each a folder OUTDIR/NAME; () for one
        unnamed block. Their tensors are named `NAME/TENSOR` in the graph and plan."""
        return self.unit.output_names

    def close(self) -> None:
        for m in self.models.values():
            if m is not None:
                m.close()


def parse_override(text: str) -> Any:
    """`--set NAME=VALUE`: VALUE is a recipe literal (number, bool, string, list) or a bare path."""
    src = SourceFile("<--set>", text)
    try:
        node = parse_expr(src)
    except CompileError:
        return text
    try:
        return _literal(node)
    except ValueError:
        return text


def _literal(node: ast.Expr) -> Any:
    if isinstance(node, (ast.Number, ast.String, ast.Bool)):
        return node.value
    if isinstance(node, ast.NoneLit):
        return None
    if isinstance(node, ast.Unary) and node.op == "neg" and isinstance(node.operand, ast.Number):
        return -node.operand.value
    if isinstance(node, ast.ListExpr):
        return [_literal(i) for i in node.items]
    raise ValueError("not a literal")


def _not_a_value(kind: str, decl: Any) -> Diagnostic:
    return error("E201", f"{kind} `{decl.name}` uses a model's tensors; a {kind} is a value known "
                 "at compile time", decl.value.span,
                 "compute with tensors inside a rule or a function; a param may hold numbers, "
                 "strings and lists")


def _bad_param_value(v: Any, depth: int = 0) -> str | None:
    """None when `v` can be a param's value, else what it is (for the diagnostic)."""
    if v is None or isinstance(v, (bool, int, str)):
        return None
    if isinstance(v, float):
        return None if math.isfinite(v) else f"the non-finite number {v}"
    if isinstance(v, (list, tuple)) and depth < 16:
        for item in v:
            bad = _bad_param_value(item, depth + 1)
            if bad is not None:
                return f"a list holding {bad}"
        return None
    kind = type(v).__name__
    return f"{'an' if kind[0] in 'aeiouAEIOU' else 'a'} {kind}" + (
        " (a state dict is a model, not a param)" if isinstance(v, Mapping) else "")


def _to_value(v: Any) -> Value:
    if isinstance(v, (list, tuple)):
        return ListV(tuple(_to_value(i) for i in v))
    return Const(v)


def compile_recipe(source: SourceFile, base_dir: Path, overrides: Mapping[str, Any] | None = None,
                   options: Mapping[str, Any] | None = None, *, allow_pickle: bool = False,
                   follow_symlinks: bool = False, runtime: tuple[str, ...] = (),
                   allow_plugins: bool = False) -> Compilation:
    """Compile `source`; `overrides` replace params (values) or models (paths or state dicts);
    `options` override the recipe's `option` lines (e.g. dtype, shard_size). The params named
    in `runtime` become run-time inputs (their values are given per run: passes/params.py);
    their current values only type the graph. `allow_plugins` lets `import "file.py"` run the
    Python methods it declares (lang/plugins.py)."""
    # Compilation allocates ~10^5 small acyclic objects per 10^3 tensors; with torch imported,
    # the cyclic GC's full collections were half of the compile time of a 70B-shaped model.
    # Everything here is freed by reference counting, so the cycle collector pauses meanwhile.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _compile_recipe(source, base_dir, overrides, options, allow_pickle, follow_symlinks,
                               tuple(runtime), allow_plugins)
    except RecursionError:  # the parser bounds expression nesting; this is the last safety net
        raise MergelangError(error(
            "E110", "the recipe nests too deeply to compile (functions calling functions with "
            "deeply nested expressions)", None, "flatten it: fewer nested calls, `let` for "
            "intermediate values")) from None
    finally:
        if enabled:
            gc.enable()


def _compile_recipe(source: SourceFile, base_dir: Path, overrides: Mapping[str, Any] | None,
                    options: Mapping[str, Any] | None, allow_pickle: bool,
                    follow_symlinks: bool = False, runtime: tuple[str, ...] = (),
                    allow_plugins: bool = False) -> Compilation:
    diags = Diagnostics()
    overrides = dict(overrides or {})
    unit = load(source, base_dir, diags)
    if unit is None:
        diags.raise_if_errors()
        raise AssertionError("unreachable")  # pragma: no cover
    unit.plugins = plugins_for(unit, allow_plugins, diags)
    check_unit(unit, diags)
    declared = {d.name for d in [*unit.models, *unit.params]}
    for name in overrides:
        if name not in declared:
            diags.add(error("E401", f"cannot set `{name}` (--set or keyword argument): the recipe "
                            f"declares no param or model `{name}`", None,
                            did_you_mean(name, declared) or
                            f"declared: {', '.join(sorted(declared)) or 'nothing'}"))
    el = Elaborator(unit.fns, {}, {}, {}, diags, plugins=unit.plugins)
    el.models = {m.name: None for m in unit.models}  # names resolve while params are evaluated
    params: dict[str, Value] = {}
    ranges: dict[str, ParamRange | None] = {}  # `param x = v in [lo, hi]` (lang/ranges.py)
    el.params = params
    params_ok = True
    held = (0, 0)  # elements and characters of the params' values so far
    for decl in unit.params:
        if decl.name in overrides:
            bad = _bad_param_value(overrides[decl.name])
            if bad is not None:
                params_ok = False
                diags.add(error("E401", f"param `{decl.name}` cannot be set to {bad}", decl.value.span,
                                "a param is a number, bool, string, none or a list of them"))
                continue
            params[decl.name] = _to_value(overrides[decl.name])
            big = too_big(params[decl.name])
            if big is not None:
                params_ok = False
                diags.add(error("E329", f"param `{decl.name}`'s value is too large: {big}",
                                decl.value.span))
                continue
            ranges[decl.name] = param_range(decl, params[decl.name], lambda e: el.eval(e, {}), diags, True)
            continue
        try:
            value = el.eval(decl.value, {})
        except CompileError as exc:
            diags.add(exc.diag)
            params_ok = False
            continue
        except Poisoned:  # a tensor of a model: params are values known at compile time
            diags.add(_not_a_value("param", decl))
            params_ok = False
            continue
        if not isinstance(value, (Const, ListV)):
            params_ok = False
            diags.add(error("E201", f"param `{decl.name}` must be a number, bool, string or list, not "
                            f"{value.describe()}", decl.value.span))
            continue
        held, over = add_size(held, value)
        if over:
            params_ok = False
            diags.add(error("E329", f"{over} (at `{decl.name}`)", decl.value.span))
            continue
        params[decl.name] = value
        ranges[decl.name] = param_range(decl, value, lambda e: el.eval(e, {}), diags, False)
    el.runtime = runtime_params(unit, params, runtime, diags)
    _derive_params(unit, el, overrides)
    models = open_models(unit, el, overrides, diags, allow_pickle, follow_symlinks)
    models = dequantize_models(models, {d.name: d.value.span for d in unit.models}, diags)
    check_architectures(models, {d.name: d.value.span for d in unit.models}, diags)
    link_outputs(unit, models, diags)
    opts = _options(unit, el, options or {}, diags)
    if not opts.allow_crimes:  # E709: checkpoints whose config.json name different architectures
        different_architectures({d.name: (models.get(d.name), d.value.span) for d in unit.models
                                 if isinstance(d.value, ast.String) or d.name in overrides}, diags)
    copies = reference_copies(unit, models, opts.copy_files, follow_symlinks, diags)
    block = unit.block
    if block is None:
        diags.add(error("E305", "the recipe has no `merge from MODEL { ... }` block", None,
                        'add one, e.g. merge from base { "*" => linear([a, b]) }'))
    for b in unit.blocks:
        if b.source not in models:
            diags.add(error("E101", f"unknown model `{b.source}`", b.source_span,
                            did_you_mean(b.source, models) or "declare it with model NAME = \"PATH\""))
    # Elaborate even after other errors (to report shape errors too), as long as the blocks, their
    # reference models and every param are usable; broken models are skipped silently.
    if block is None or any(models.get(b.source) is None for b in unit.blocks) or not params_ok:
        _fail(diags, models)
    if opts.tokenizer_source is not None:
        models = retokenize_models(models, block.source, opts.tokenizer_source,  # type: ignore[union-attr]
                                   opts.pad_to_multiple_of, opts.chat_template, diags,
                                   _option_span(unit, "tokenizer_source"), follow_symlinks)
        if diags.has_errors:
            _fail(diags, models)
    elif opts.resize_vocab:
        models = resize_models(models, block.source, diags)  # type: ignore[union-attr]
    mixed_formats(models, block.source, opts.dtype, block.source_span, diags)  # type: ignore[union-attr]
    el.models = models
    el.out_dtype = opts.dtype
    graph = el.build(*unit.blocks)
    if opts.compute_dtype != "float32":  # default graphs carry no mark (their plans are unchanged)
        graph.graph["compute_dtype"] = opts.compute_dtype
    if diags.has_errors:
        improve_diagnostics(diags, models, block.source)  # type: ignore[union-attr]
        _fail(diags, models)
    prepasses, apply_graph, stats = split_stats(graph)
    optimized = optimize(apply_graph)
    plan = lower(optimized)
    if prepasses:
        plan = replace(plan, prepasses=tuple(lower(optimize(p), eager=True) for p in prepasses), stats=stats)
    return Compilation(source, base_dir, unit, models, params, opts, block.source, graph,  # type: ignore[union-attr]
                       optimized, plan, [d for d in diags.items if not d.is_error], copies,
                       _overridden(overrides, unit), {k: v for k, v in ranges.items() if v},
                       runtime)


def _derive_params(unit: Unit, el: Elaborator, overrides: Mapping[str, Any]) -> None:
    """Params declared from run-time params (`param b = 1 - a` with `a` tuned) are evaluated
    again with them, so they follow each run's values (as a compilation with those values
    would); one the compiler cannot evaluate that way keeps its compile-time value and makes
    the run-time param static (its evaluation error surfaces when the rules read it)."""
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
            el.derived[decl.name] = value
            live.add(decl.name)


def check_architectures(models: Mapping[str, ModelSource | None], spans: Mapping[str, Any],
                        diags: Diagnostics) -> None:
    """W109 for a model whose config.json disagrees with its tensors on layer or expert counts
    (io/architectures.py; header names only)."""
    from mergelang.io.architectures import mismatch

    for label, m in models.items():
        if m is None or m.block_output is not None or m.folder is None:
            continue
        why = mismatch(m.config(), {n: i.shape for n, i in m.tensors().items()})
        if why:
            diags.add(warning("W109", f"model `{label}`: {why}", spans.get(label),
                              "a checkpoint cut or stacked by hand? transformers builds the model "
                              "from config.json"))


def _option_span(unit: Unit, name: str) -> Any:
    return next((d.value.span for d in unit.options if d.name == name), None)


def _fail(diags: Diagnostics, models: Mapping[str, ModelSource | None]) -> None:
    for m in models.values():
        if m is not None:
            m.close()
    raise MergelangError(diags.items)


def open_models(unit: Unit, el: Elaborator, overrides: Mapping[str, Any], diags: Diagnostics,
                 allow_pickle: bool = False, follow: bool = False) -> dict[str, ModelSource | None]:
    models: dict[str, ModelSource | None] = {}
    adapters = []
    for decl in unit.models:
        models[decl.name] = None
        if decl.name in overrides:
            value: Any = overrides[decl.name]
        else:
            try:
                v = el.eval(decl.value, {})
            except CompileError as exc:
                diags.add(exc.diag)
                continue
            except Poisoned:
                diags.add(_not_a_value("model", decl))
                continue
            if isinstance(v, Const) and hasattr(v.value, "open_model"):  # lora(), stack_layers()
                adapters.append((decl, v.value))
                continue
            if not (isinstance(v, Const) and isinstance(v.value, str)):
                diags.add(error("E201", f"model `{decl.name}` needs a path string, not {v.describe()}",
                                decl.value.span, 'e.g. model base = "./llama-base"'))
                continue
            value = v.value
        if isinstance(value, ModelSource):
            models[decl.name] = value
            continue
        if isinstance(value, Mapping):
            try:
                models[decl.name] = DictSource(decl.name, value)
            except CheckpointError as exc:
                diags.add(error(exc.code, f"model `{decl.name}`: {exc}", decl.span, exc.help))
            continue
        if not isinstance(value, (str, os.PathLike)):
            diags.add(error("E201", f"model `{decl.name}` needs a path or a state dict, not "
                            f"{type(value).__name__}", decl.value.span))
            continue
        where: str | Path = str(value)
        try:
            if not is_hf_id(str(value)):
                where = _model_path(value, unit.base_dir, decl.name in overrides)
            models[decl.name] = open_model(decl.name, where, allow_pickle=allow_pickle,
                                           follow_symlinks=follow)
        except (OSError, ValueError, CheckpointError) as exc:
            diags.add(model_error(decl.name, str(where), exc, decl.value.span).diag)
    for decl, spec in adapters:  # derived models, once the checkpoints they use are open
        spec.open_model(decl, models, unit.base_dir, diags, {d.name for d, _ in adapters})
    return models


def _overridden(overrides: Mapping[str, Any], unit: Unit) -> dict[str, Any]:
    models = {d.name for d in unit.models}
    out: dict[str, Any] = {}
    for name, value in overrides.items():
        if name in models and isinstance(value, (str, os.PathLike)) and not is_hf_id(str(value)):
            try:
                value = str(_model_path(value, unit.base_dir, True).resolve())
            except (OSError, ValueError):
                pass
        out[name] = value
    return out


def _model_path(value: str | os.PathLike, base_dir: Path, from_cli: bool) -> Path:
    """A model path: relative paths written in the recipe resolve against the recipe's folder,
    those given on the command line or in Python (`--set`, keyword overrides) against the
    current directory."""
    if "\0" in str(value):
        raise ValueError("the path contains a NUL character")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (Path.cwd() if from_cli else base_dir) / path
    return path


def reference_copies(unit: Unit, models: Mapping[str, ModelSource | None], copy: bool, follow: bool,
                     diags: Diagnostics) -> dict[str, dict[str, Path]]:
    """For each block's reference model: the small files its output copies (checked now, at
    compile time: E314 a link leaving the folder, E315 a JSON file that does not parse)."""
    out: dict[str, dict[str, Path]] = {}
    spans = {d.name: d.value.span for d in unit.models}
    for name in dict.fromkeys(b.source for b in unit.blocks):
        src = models.get(name)
        if src is None or isinstance(src, DictSource):
            continue
        folder = src.folder
        if not copy or folder is None:
            continue
        try:
            out[name] = reference_files(Path(folder), RECIPE_FILENAME, follow)
        except CheckpointError as exc:
            diags.add(error(exc.code, f"model `{name}`: {exc}", spans.get(name), exc.help))
        except OSError as exc:
            diags.add(error("E303", f"model `{name}`: cannot read {folder}: {exc.strerror or exc}",
                            spans.get(name)))
    return out


def input_paths(source: SourceFile, unit: Unit, models: Mapping[str, ModelSource | None]) -> tuple[Path, ...]:
    """Every path the compilation reads from (see Compilation.inputs)."""
    paths: dict[str, None] = {}
    if source.path and not source.path.startswith("<"):
        paths[source.path] = None
    for p in unit.imports:
        paths[str(p)] = None
    for m in models.values():
        for p in ([] if m is None else m.input_paths()):
            paths[str(p)] = None
    return tuple(Path(os.path.abspath(p)) for p in paths)


def _options(unit: Unit, el: Elaborator, overrides: Mapping[str, Any], diags: Diagnostics) -> RecipeOptions:
    values: dict[str, Any] = {}
    spans = {}
    for decl in unit.options:
        if decl.name not in option_names():
            diags.add(error("E402", f"unknown option `{decl.name}`", decl.span,
                            did_you_mean(decl.name, option_names()) or
                            f"options: {', '.join(option_names())}"))
            continue
        try:
            v = el.eval(decl.value, {})
        except CompileError as exc:
            diags.add(exc.diag)
            continue
        except Poisoned:
            diags.add(_not_a_value("option", decl))
            continue
        values[decl.name] = v.value if isinstance(v, Const) else v
        spans[decl.name] = decl.value.span
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RecipeOptions(**values)
    except ValidationError as exc:
        first = exc.errors()[0]["loc"][0] if exc.errors() and exc.errors()[0]["loc"] else None
        diags.add(error("E402", f"invalid option: {validation_message(exc)}", spans.get(first)))
        return RecipeOptions()
