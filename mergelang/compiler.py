"""The compiler driver: recipe text -> checked graph -> optimized graph -> execution plan.

`compile_recipe` runs every stage up to the requested one, collecting diagnostics; it raises one
`MergelangError` carrying all errors found (warnings are kept on the result).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from pydantic import ValidationError

from mergelang.lang import ast, declarations
from mergelang.lang.declarations import evaluate_declaration, open_models  # noqa: F401  (tools/inspect.py)
from mergelang.io.checkpoint import CheckpointError, DictSource, ModelSource
from mergelang.diagnostics import (CompileError, Diagnostic, Diagnostics, MergelangError, SourceFile,
                                   did_you_mean, error)
import mergelang.sources  # noqa: F401  (registers lora, stack_layers, layer_range, align)
from mergelang.lang.elaborate import ElabContext, Elaborator
from mergelang.ir.graph import MergeGraph
from mergelang.io.inputs import RECIPE_FILENAME, reference_files
from mergelang.lang.loader import Unit, load
from mergelang.lang.plugins import plugins_for
from mergelang.options import RecipeOptions, option_names, validation_message
from mergelang.lang.parser import parse_expr
from mergelang.passes.optimize import optimize
from mergelang.passes.plan import ExecutionPlan, lower
from mergelang.lang.resolve import check_unit
from mergelang.passes.stats import split_stats
from mergelang.lang.values import Const, Value
from mergelang.lang.ranges import ParamRange, runtime_params
from mergelang.io.architectures import different_architectures
from mergelang.sources.fp8 import mixed_formats
from mergelang.sources.vocab import improve_diagnostics
from mergelang.sources.wrappers import WrapContext, apply_wrappers

#: what `--emit` (Recipe.emit) can show: the stages' results
EMIT_STAGES = ("ast", "graph", "optimized", "plan")


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
        return _compile_recipe(CompileState(source, base_dir, dict(overrides or {}), options or {},
                                            allow_pickle, follow_symlinks, tuple(runtime), allow_plugins))
    except RecursionError:  # the parser bounds expression nesting; this is the last safety net
        raise MergelangError(error(
            "E110", "the recipe nests too deeply to compile (functions calling functions with "
            "deeply nested expressions)", None, "flatten it: fewer nested calls, `let` for "
            "intermediate values")) from None
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True)
class CompileState:
    """What the compile stages (STAGES) know so far: the request, then each stage's results
    (`dataclasses.replace` gives the next state)."""

    source: SourceFile
    base_dir: Path
    overrides: Mapping[str, Any]
    option_overrides: Mapping[str, Any]
    allow_pickle: bool = False
    follow: bool = False
    runtime: tuple[str, ...] = ()
    allow_plugins: bool = False
    unit: Unit | None = None
    el: Elaborator | None = None  # over the declarations' context, then the blocks'
    params: dict[str, Value] = field(default_factory=dict)
    ranges: dict[str, ParamRange | None] = field(default_factory=dict)
    params_ok: bool = True
    models: dict[str, ModelSource | None] = field(default_factory=dict)
    options: RecipeOptions | None = None
    copies: dict[str, dict[str, Path]] = field(default_factory=dict)
    graph: MergeGraph | None = None
    optimized: MergeGraph | None = None
    prepasses: tuple[MergeGraph, ...] = ()  # the statistics passes' graphs (passes/stats.py)
    stats: Any = None
    plan: ExecutionPlan | None = None

    def wrap_context(self, diags: Diagnostics) -> WrapContext:
        assert self.unit is not None
        return WrapContext(self.unit, diags, self.follow, self.options)


def load_recipe(s: CompileState, diags: Diagnostics) -> CompileState:
    """Parse the recipe and its imports, load plugins, check names and calls; E401 for an
    override of nothing the recipe declares."""
    unit = load(s.source, s.base_dir, diags)
    if unit is None:
        diags.raise_if_errors()
        raise AssertionError("unreachable")  # pragma: no cover
    unit.plugins = plugins_for(unit, s.allow_plugins, diags)
    check_unit(unit, diags)
    declared = {d.name for d in [*unit.models, *unit.params]}
    for name in s.overrides:
        if name not in declared:
            diags.add(error("E401", f"cannot set `{name}` (--set or keyword argument): the recipe "
                            f"declares no param or model `{name}`", None,
                            did_you_mean(name, declared) or
                            f"declared: {', '.join(sorted(declared)) or 'nothing'}"))
    return replace(s, unit=unit)


def evaluate_params(s: CompileState, diags: Diagnostics) -> CompileState:
    """The params' values (models are names only while declarations are evaluated)."""
    unit = s.unit
    assert unit is not None
    params: dict[str, Value] = {}
    el = Elaborator(ElabContext(unit.fns, {m.name: None for m in unit.models}, params, diags,
                                plugins=unit.plugins))
    ranges, ok = declarations.evaluate_params(unit, el, s.overrides, params, diags)
    return replace(s, el=el, params=params, ranges=ranges, params_ok=ok)


def derive_runtime_params(s: CompileState, diags: Diagnostics) -> CompileState:
    """Run-time params (tune, learn) and the params computed from them (`param b = 1 - a`)."""
    assert s.unit is not None and s.el is not None
    derived: dict[str, Value] = {}
    el = s.el.with_context(runtime=runtime_params(s.unit, s.params, s.runtime, diags), derived=derived)
    declarations.derive_params(s.unit, el, s.overrides, derived)
    return replace(s, el=el)


def open_recipe_models(s: CompileState, diags: Diagnostics) -> CompileState:
    assert s.unit is not None
    return replace(s, models=open_models(s.unit, s.el, s.overrides, diags, s.allow_pickle, s.follow))


def wrap_opened(s: CompileState, diags: Diagnostics) -> CompileState:
    """The wrappers that need the checkpoints only (sources/wrappers.WRAPPERS)."""
    return replace(s, models=apply_wrappers(s.models, s.wrap_context(diags), after_checks=False))


def evaluate_options(s: CompileState, diags: Diagnostics) -> CompileState:
    """The recipe's `option` lines with the caller's options over them; E709 for checkpoints
    whose config.json name different architectures (unless allow_crimes)."""
    unit = s.unit
    assert unit is not None
    opts = _options(unit, s.el, s.option_overrides, diags)
    if not opts.allow_crimes:
        different_architectures({d.name: (s.models.get(d.name), d.value.span) for d in unit.models
                                 if isinstance(d.value, ast.String) or d.name in s.overrides}, diags)
    return replace(s, options=opts)


def check_blocks(s: CompileState, diags: Diagnostics) -> CompileState:
    """The files the outputs copy from their reference models; every block merges from a
    declared model. Elaboration goes on after other errors (to report shape errors too), as
    long as the blocks, their reference models and every param are usable."""
    unit, models = s.unit, s.models
    assert unit is not None and s.options is not None
    copies = reference_copies(unit, models, s.options.copy_files, s.follow, diags)
    if unit.block is None:
        diags.add(error("E305", "the recipe has no `merge from MODEL { ... }` block", None,
                        'add one, e.g. merge from base { "*" => linear([a, b]) }'))
    for b in unit.blocks:
        if b.source not in models:
            diags.add(error("E101", f"unknown model `{b.source}`", b.source_span,
                            did_you_mean(b.source, models) or "declare it with model NAME = \"PATH\""))
    if unit.block is None or any(models.get(b.source) is None for b in unit.blocks) or not s.params_ok:
        _fail(diags, models)  # broken models the blocks do not merge from are skipped silently
    return replace(s, copies=copies)


def wrap_checked(s: CompileState, diags: Diagnostics) -> CompileState:
    """The wrappers that need the options (sources/wrappers.WRAPPERS); W107 for block-scaled
    FP8 models merged with others."""
    assert s.unit is not None and s.unit.block is not None and s.options is not None
    models = apply_wrappers(s.models, s.wrap_context(diags), after_checks=True)
    if s.options.tokenizer_source is not None and diags.has_errors:
        _fail(diags, models)
    mixed_formats(models, s.unit.block.source, s.options.dtype, s.unit.block.source_span, diags)
    return replace(s, models=models)


def elaborate(s: CompileState, diags: Diagnostics) -> CompileState:
    """The merge graph: every block's rules applied to every tensor (lang/elaborate.py)."""
    assert s.unit is not None and s.el is not None and s.options is not None
    el = s.el.with_context(models=s.models, out_dtype=s.options.dtype)
    graph = el.build(*s.unit.blocks)
    if s.options.compute_dtype != "float32":  # default graphs carry no mark (their plans are unchanged)
        graph.graph["compute_dtype"] = s.options.compute_dtype
    if diags.has_errors:
        improve_diagnostics(diags, s.models, s.unit.block.source)  # type: ignore[union-attr]
        _fail(diags, s.models)
    return replace(s, el=el, graph=graph)


def optimize_graph(s: CompileState, diags: Diagnostics) -> CompileState:
    """The statistics passes split off (passes/stats.py), the graph optimized (passes/optimize.py)."""
    assert s.graph is not None
    prepasses, apply_graph, stats = split_stats(s.graph)
    return replace(s, optimized=optimize(apply_graph), prepasses=tuple(prepasses), stats=stats)


def lower_plan(s: CompileState, diags: Diagnostics) -> CompileState:
    """The execution plan (passes/plan.py), with the statistics passes' own plans."""
    assert s.optimized is not None
    plan = lower(s.optimized)
    if s.prepasses:
        plan = replace(plan, prepasses=tuple(lower(optimize(p), eager=True) for p in s.prepasses),
                       stats=s.stats)
    return replace(s, plan=plan)


#: the compiler, stage by stage: each takes the state so far and the diagnostics, and returns
#: the next state (or raises MergelangError with every error found)
STAGES: tuple[Callable[[CompileState, Diagnostics], CompileState], ...] = (
    load_recipe, evaluate_params, derive_runtime_params, open_recipe_models, wrap_opened,
    evaluate_options, check_blocks, wrap_checked, elaborate, optimize_graph, lower_plan,
)


def _compile_recipe(state: CompileState) -> Compilation:
    diags = Diagnostics()
    for stage in STAGES:
        state = stage(state, diags)
    s, unit = state, state.unit
    assert unit is not None and unit.block is not None and s.options is not None
    return Compilation(s.source, s.base_dir, unit, s.models, s.params, s.options, unit.block.source,
                       s.graph, s.optimized, s.plan, [d for d in diags.items if not d.is_error],  # type: ignore[arg-type]
                       s.copies, declarations.overridden(s.overrides, unit),
                       {k: v for k, v in s.ranges.items() if v}, s.runtime)


def _fail(diags: Diagnostics, models: Mapping[str, ModelSource | None]) -> None:
    for m in models.values():
        if m is not None:
            m.close()
    raise MergelangError(diags.items)


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
        v = evaluate_declaration(el, decl, "option", diags)
        if v is None:
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
