"""The Python API: `compile` a recipe once, then `run` it (to disk) or `evaluate` it (in memory);
`merge` is the one-liner for state dicts."""

from __future__ import annotations

import os

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from mergelang.lang.ast import dump
from mergelang.errors import CheckpointError, CodedError, to_diagnostic
from mergelang.compiler import EMIT_STAGES, Compilation, compile_recipe
from mergelang.io.checked import CheckedSink as _CheckedSink, all_finite  # noqa: F401  (all_finite: public here too)
from mergelang.io.inputcheck import InputCheck, checked_inputs
from mergelang.diagnostics import CompileError, Diagnostic, MergelangError, SourceFile, error, warning
from mergelang.ir.graph import format_graph
from mergelang.io.journal import inputs_fingerprint, plan_fingerprint
from mergelang.lang.parser import parse_program
from mergelang.passes.plan import format_plan
from mergelang.ir.types import parse_bytes

if TYPE_CHECKING:  # torch, the executor and the writers are imported when a merge runs
    import torch

    from mergelang.io.multiwriter import MultiWriter
    from mergelang.io.writer import CheckpointWriter, OutputTensor

from mergelang.interop.recipe_input import recipe_input
from mergelang.io.inputs import RECIPE_FILENAME
from mergelang.io.inputwatch import input_stats, inputs_unchanged, install_sigbus
from mergelang.lang.provenance import recipe_copy, used_params


def _source(recipe: str | Path) -> tuple[SourceFile, Path]:
    """A path (Path, or a str naming an existing file / ending in .mrg) or recipe text; a
    mergekit config (.yml / .yaml) is imported on the fly (interop/recipe_input.py)."""
    return recipe_input(recipe)[:2]  # type: ignore[return-value]


class Recipe:
    """A compiled recipe. Compile once (all checks run from headers), run many times."""

    def __init__(self, compilation: Compilation, spec: Any = None,
                 recompile: Callable[..., Compilation] | None = None):
        self._c = compilation
        self.run_warnings: list[Diagnostic] = []  # runtime warnings of the last run (E503 warn)
        #: how the recipe was compiled (text, overrides, options): a Ray worker compiles it again
        self._spec = spec
        #: recompile(runtime, overrides): the same recipe with run-time params / other values
        self._recompile = recompile
        self._outputs: list[OutputTensor] | None = None

    @property
    def warnings(self) -> list[Diagnostic]:
        return list(self._c.warnings)

    @property
    def outputs(self) -> list[OutputTensor]:
        from mergelang.io.writer import OutputTensor

        if self._outputs is None:  # the graph is fixed: listed once (0.3 s for 20k tensors)
            g = self._c.optimized
            self._outputs = [OutputTensor(g.node(n).attrs["name"], g.node(n).type.shape,
                                          g.node(n).attrs["dtype"]) for n in g.outputs()]
        return list(self._outputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        """The named outputs (`merge "NAME" from ...`), () for a recipe with one unnamed block.
        With names, :attr:`outputs` lists their tensors as ``NAME/TENSOR``."""
        return self._c.output_names

    def _references(self) -> dict[str, str]:
        """Output name -> the model its block merges from (its names, shapes, config.json)."""
        return {n: b.source for b in self._c.unit.blocks for n in b.outputs}

    def _split(self, items: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """`{"NAME/TENSOR": x}` -> `{NAME: {TENSOR: x}}` for every named output, in order."""
        out: dict[str, dict[str, Any]] = {n: {} for n in self.output_names}
        for key, value in items.items():
            name, _, tensor = key.partition("/")
            out[name][tensor] = value
        return out

    @property
    def compilation(self) -> Compilation:
        return self._c

    def emit(self, stage: str = "optimized", memory_budget: int | str | None = None) -> str:
        """The stable text of a compiler stage: ast, graph, optimized or plan (with a
        `memory_budget`: the plan split into row chunks for it, as `run` executes it)."""
        c = self._c
        if stage == "ast":
            return dump(c.unit.program) + "\n"
        if stage == "graph":
            return format_graph(c.graph)
        if stage == "optimized":
            return format_graph(c.optimized)
        if stage == "plan":
            head = (f"# outputs: {', '.join(self.output_names)} (each written to OUTDIR/NAME/; "
                    "tensors named NAME/TENSOR below)\n" if self.output_names else "")
            from mergelang.passes.pipeline import Target, plan_for

            budget = parse_bytes(memory_budget) if memory_budget is not None else None
            return head + format_plan(plan_for(c.plan, Target.cpu(budget)).plan)
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(EMIT_STAGES)}")

    def evaluate(self, device: str = "cpu", *, pipelined: bool = True) -> dict[str, Any]:
        """Run the merge in memory and return the output tensors (for small models and tests):
        a state dict, or with named outputs a dict {output name: state dict}."""
        from mergelang.passes.pipeline import plan_for
        from mergelang.runtime.executor import execute, target_for

        out: dict[str, torch.Tensor] = {}
        plan = plan_for(self._c.plan, target_for(device)).plan
        execute(plan, self._c.models, out.__setitem__, device, pipelined=pipelined)
        return self._split(out) if self.output_names else out

    def _compile_fn(self) -> Callable[..., Compilation]:
        if self._recompile is None:
            raise ValueError("this recipe was not made by mergelang.compile (tune and learn "
                             "compile it again with run-time params)")
        return self._recompile

    def with_params(self, **values: Any) -> "Recipe":
        """The same recipe compiled with other param values (the models are opened again)."""
        import dataclasses

        fn = self._compile_fn()
        spec = None if self._spec is None else \
            dataclasses.replace(self._spec, overrides={**self._spec.overrides, **values})
        return Recipe(fn((), values), spec, lambda rt=(), more=None: fn(rt, {**values, **(more or {})}))

    def tune(self, objective: Callable[..., Any], trials: int = 50, **kw: Any) -> Any:
        """Search the params declared with a range (`param x = v in [lo, hi]`) with an optuna
        study: each trial runs the merge in memory (compiled once) and calls
        `objective(state) -> float | tuple`. Keywords: sampler ("tpe" | "cmaes" | "random" |
        "nsga2"), seed, storage ("sqlite:///study.db": a second call continues the study),
        directions ("maximize" | "minimize", or one per objective), study_name, params (a
        subset), device, executor ("local" | "ray"), ray_address, progress, timeout. Returns a
        TuneResult (.best_params, .best_value, .trials, .pareto, .run(out_dir)):
        search/study.py."""
        from mergelang.search.session import tune_recipe

        fn = self._compile_fn()
        return tune_recipe(self._c, fn, lambda params, out, **rk: self.with_params(**params).run(out, **rk),
                           objective, trials, spec=self._spec, **kw)

    def learn(self, loss: Callable[..., Any], batches: Any, **kw: Any) -> Any:
        """Fit the params declared `learn` by gradient descent through the merge:
        `loss(state, batch) -> scalar tensor`, differentiable w.r.t. the merged tensors. Keywords:
        steps (default: one pass over `batches`), lr, optimizer ("adam" | "sgd"), device, log,
        clamp ("project": a ranged param is clamped after each step; "use": only its value in
        the merge is clamped, as the AdaMerging paper's code).
        Returns a Learned result (.values {name: nested list}, .losses, .run(out_dir)):
        search/learn.py."""
        from mergelang.search.learn import learn_recipe

        return learn_recipe(self._c, self._compile_fn(), self.with_params, loss, batches, **kw)

    def run(self, out_dir: str | Path, device: str = "auto", force: bool = False,
            progress: Callable[[int], None] | None = None, resume: bool = False,
            nan_check: str | None = None, log: Callable[[str], None] | None = None, *,
            memory_budget: int | str | None = None, pipelined: bool = True, fsync: bool = True,
            executor: str = "local", ray_address: str | None = None, model_card: bool = True,
            origins: Mapping[str, str] | None = None, report: bool = False) -> Path:
        """Merge to an HF folder at `out_dir` (with named outputs: one HF folder per name,
        `out_dir/NAME`, all moved into place together). The tensors go to the work folder
        ``.NAME.mergelang-work`` beside it (with a journal), which is renamed into place once
        complete and verified. After a failure or a kill the work folder is kept, and
        `resume=True` continues from it (bit-identical result); without `resume` an old work
        folder is replaced. `nan_check` ("error" | "warn" | "off") overrides the recipe's option;
        `log` receives one-line messages (resume state, NaN warnings). `memory_budget` (bytes, or
        a size like "8GB") caps live + prefetched + pending bytes. `fsync=False` does not wait
        for the disk (the output is complete when this returns, but a power loss soon after may
        lose some of it; a resume still checks every kept tensor against its checksum).
        `executor="ray"` runs the tensors on a Ray cluster (`ray_address`, else a local Ray
        instance) whose workers share the filesystem: distributed/ray_driver.py. The folder gets
        a model card ``README.md`` unless `model_card=False` (record/card.py); `origins` says
        where params' values came from (param -> e.g. "tune: trial 3 of study 's'"), for the
        card, the manifest and the recipe copy. `report` adds mergelang_report.json / .html,
        what the merge kept of each input: tools/merge_report.py."""
        from mergelang.passes.chunking import over_budget_summary
        from mergelang.passes.pipeline import plan_for
        from mergelang.runtime.executor import execute, target_for

        from mergelang.runtime.runargs import check_run_args

        check_run_args(out_dir, device, nan_check, executor)
        if str(out_dir).lower().endswith(".safetensors"):  # one file (io/singlefile.py)
            from mergelang.io.singlefile import run_single_file

            return run_single_file(self, out_dir, force, resume, dict(
                device=device, progress=progress, nan_check=nan_check, log=log,
                memory_budget=memory_budget, pipelined=pipelined, fsync=fsync, executor=executor,
                ray_address=ray_address, origins=origins, report=report))
        budget = parse_bytes(memory_budget) if memory_budget is not None else None
        c = self._c
        mode = nan_check or c.options.nan_check
        say = log or (lambda msg: None)
        fingerprint = {"plan": plan_fingerprint(format_plan(c.plan)),
                       "inputs": inputs_fingerprint(c.models)}
        writer: CheckpointWriter | MultiWriter | None = None
        from mergelang.record.manifest import inputs_record, provenance
        from mergelang.runtime.executor import resolve_device

        self._prov = provenance(c, str(resolve_device(device)), origins)
        self._card = (Path(os.path.abspath(out_dir)).name, model_card, dict(origins or {}))
        if executor not in ("local", "ray"):
            raise ValueError(f"executor must be 'local' or 'ray', not {executor!r}")
        from mergelang.tools.merge_report import reporter_for  # run --report's measurements

        reporter = reporter_for(c, executor, budget) if report else None
        session = self._ray_session(device, budget, fingerprint["plan"], ray_address) \
            if executor == "ray" else None
        try:
            writer, files, sizes = self._open_writer(out_dir, force, fingerprint, resume, fsync)
            with writer:
                for msg in writer.messages:
                    say(msg)
                if writer.resumed and progress is not None:
                    progress(sum(sizes[n] for n in writer.resumed))
                if session is not None:
                    for diag in self._config_warnings():
                        self.run_warnings.append(diag)
                        say(diag.render())
                    self.run_warnings += session.run(c.plan, writer, progress, mode, fsync, say)
                    self._prov["inputs"] = inputs_record(c)
                    return writer.complete(files)
                planned = plan_for(c.plan, target_for(device, budget), writer.resumed)
                for line in over_budget_summary(list(planned.unchunked), budget or 0):
                    say(f"warning: {line}")
                sink = self._checked_sink(writer.write, mode, say, writer.write_rows)
                for diag in self._config_warnings():
                    self.run_warnings.append(diag)
                    say(diag.render())
                install_sigbus()  # a mapped shard truncated meanwhile: E508 and exit 1
                stats = input_stats(c.models)
                check = None if mode == "off" else InputCheck(  # NaN/Inf in the inputs too
                    mode, say, {d.name: d.value.span for d in c.unit.models}, self.run_warnings)
                execute(planned.plan, checked_inputs(c.models, check), sink, device, progress,
                        memory_budget=budget, pipelined=pipelined, observer=reporter)
                inputs_unchanged(stats)
                self._prov["inputs"] = inputs_record(c)  # the digests of what was read
                if reporter is not None:
                    files = reporter.add_files(files)
                return writer.complete(files)
        except CodedError as exc:  # writer, journal, checkpoint: each carries code and help
            raise self._kept(writer, to_diagnostic(exc)) from None
        except MergelangError as exc:
            diags = exc.diagnostics
            raise self._kept(writer, diags[0], diags[1:]) from None
        finally:
            if session is not None:
                session.close()
            if reporter is not None:
                reporter.close(quiet=True)  # its thread ends (add_files raised its errors)

    def _ray_session(self, device: str, budget: int | None, digest: str,
                     address: str | None) -> Any:
        """Connected to Ray with every worker ready (distributed/ray_driver.py), before any
        output folder is made."""
        from mergelang.distributed.ray_driver import RaySession
        from mergelang.runtime.executor import resolve_device

        if self._spec is None:
            raise MergelangError(error("E802", "this recipe cannot run on Ray: its models are held "
                                       "in memory (state dicts), which workers cannot read", None,
                                       "give the models as paths on a filesystem the workers share"))
        return RaySession(self._spec, resolve_device(device).type, budget, digest, address)

    def _open_writer(self, out_dir: str | Path, force: bool, fingerprint: dict[str, str],
                     resume: bool, fsync: bool = True) -> tuple[Any, Any, dict[str, int]]:
        """The writer (one checkpoint, or one per named output), the arguments of its `finish`,
        and the byte size of every output tensor by its name in the plan."""
        from mergelang.io.multiwriter import MultiWriter
        from mergelang.io.writer import CheckpointWriter, plan_shards

        from mergelang.io.adapter import adapter_layout

        shard_size = int(self._c.options.shard_size)
        adapters = self.adapter_outputs()
        if not self.output_names:
            ref = self._c.reference
            layout = adapter_layout(self.outputs) if "" in adapters else plan_shards(self.outputs, shard_size)
            writer = CheckpointWriter(out_dir, layout, force=force, fingerprint=fingerprint,
                                      resume=resume, fsync=fsync, protected=self._c.inputs)
            files = self._adapter_files(self.outputs, ref) if "" in adapters else self._files(ref)
            self._record_files(files, ref, "" in adapters)
            return writer, files, {t: x.nbytes for t, x in layout.tensors.items()}
        per_output = self._split({t.name: t.renamed(t.name.partition("/")[2]) for t in self.outputs})
        layouts = {n: adapter_layout(ts.values()) if n in adapters else plan_shards(list(ts.values()), shard_size)
                   for n, ts in per_output.items()}
        files = {n: self._adapter_files(per_output[n].values(), ref) if n in adapters else self._files(ref)
                 for n, ref in self._references().items()}
        for n, ref in self._references().items():
            self._record_files(files[n], ref, n in adapters, n)
        multi = MultiWriter(out_dir, layouts, force=force, fingerprint=fingerprint, resume=resume,
                            fsync=fsync, protected=self._c.inputs)
        return multi, files, {f"{n}/{t}": x.nbytes for n, lay in layouts.items()
                              for t, x in lay.tensors.items()}

    def adapter_outputs(self) -> set[str]:
        """The outputs that are LoRA adapters (`merge adapter`); "" for an unnamed one."""
        return {n for b in self._c.unit.blocks if b.adapter for n in (b.outputs or ("",))}

    def _record_files(self, files: dict[str, Any], reference: str, adapter: bool, name: str = "") -> None:
        """Add the provenance to an output's manifest, the card, and the labelled recipe copy."""
        title, card, origins = getattr(self, "_card", ("", True, {}))
        prov = getattr(self, "_prov", None)
        if prov is None:
            return
        files["manifest"] = {**files.get("manifest", {}), "provenance": prov}
        files["recipe_text"] = recipe_copy(self._c, prov["param_origins"])
        if card:
            from mergelang.record.card import CARD_NAME, model_card

            files["extra_files"] = {**(files.get("extra_files") or {}), CARD_NAME: model_card(
                self._c, prov, adapter=adapter, title=name or title, reference=reference,
                recipe_text=files["recipe_text"])}

    def _adapter_files(self, outputs: Any, reference: str) -> dict[str, Any]:
        """CheckpointWriter.finish's arguments for an adapter: adapter_config.json (no config.json
        or tokenizer: the adapter applies to `reference`), the recipe, the manifest."""
        import json

        from mergelang.io.adapter import adapter_config

        ref = self._c.models[reference]
        base = str(ref.folder) if ref is not None and ref.folder is not None else reference
        cfg = adapter_config(outputs, base)
        return dict(copies={}, dtype=None, recipe_text=recipe_copy(self._c),
                    recipe_filename=RECIPE_FILENAME,
                    extra_files={"adapter_config.json": json.dumps(cfg, indent=4) + "\n"},
                    manifest={"params": used_params(self._c)})

    def _files(self, reference: str) -> dict[str, Any]:
        """CheckpointWriter.finish's arguments for an output merged from model `reference`: its
        config.json and other small files, the dtype, the recipe."""
        ref = self._c.models[reference]
        copies = self._c.copies.get(reference) if self._c.options.copy_files else None
        extra = self._config_override(ref, copies)
        tok = getattr(ref, "tokenizer_files", lambda: None)()
        if tok is not None and copies is not None:  # tokenizer_source: the chosen tokenizer's files
            from mergelang.sources.tokenizer import TOKENIZER_FILES

            copies = {k: v for k, v in copies.items() if k not in TOKENIZER_FILES}
            extra = {**(extra or {}), **tok}  # type: ignore[dict-item]
        return dict(copies=copies or {}, dtype=self.config_dtype(), recipe_text=recipe_copy(self._c),
                    recipe_filename=RECIPE_FILENAME, extra_files=extra,
                    manifest={"params": used_params(self._c)})

    @staticmethod
    def _kept(writer: "CheckpointWriter | MultiWriter | None", diag: Diagnostic,
              more: list[Diagnostic] | None = None) -> MergelangError:
        """The error, with a note when a work folder was kept for --resume."""
        if writer is not None and writer.resumable and writer.tmp_dir.is_dir():
            diag = diag.with_note(f"the finished tensors are kept in {writer.tmp_dir}; rerun with "
                                  "--resume (or run(..., resume=True)) to continue")
        return MergelangError([diag, *(more or [])])

    def _checked_sink(self, sink: Callable[[str, torch.Tensor], None], mode: str,
                      say: Callable[[str], None], rows_sink: Callable[..., None] | None = None
                      ) -> "_CheckedSink":
        """`sink`, after the NaN/Inf check of each floating output tensor (option nan_check)."""
        g = self._c.optimized
        spans = {g.node(n).attrs["name"]: g.node(n).span for n in g.outputs()}
        self.run_warnings = []
        return _CheckedSink(sink, mode, say, spans, self.run_warnings, rows_sink)

    def _config_warnings(self) -> list[Diagnostic]:
        """W004 for each output whose reference model has no config.json to copy (transformers
        cannot load such a folder)."""
        out = []
        spans = {d.name: d.value.span for d in self._c.unit.models}
        adapters = self.adapter_outputs()
        refs = [r for n, r in self._references().items() if n not in adapters] if self.output_names \
            else ([] if "" in adapters else [self._c.reference])
        for ref in dict.fromkeys(refs):
            copies = self._c.copies.get(ref)
            if copies is not None and "config.json" not in copies:
                out.append(warning("W004", f"the output's reference model `{ref}` has no config.json, "
                                   "so the output has none", spans.get(ref),
                                   "transformers cannot load a folder without config.json: merge "
                                   "from a model folder that has one, or add it to the output"))
        return out

    def _config_override(self, ref: Any, copies: dict[str, Path] | None) -> dict[str, str] | None:
        """config.json for a reference model that changes it (stacked layers: the layer count)."""
        patch = getattr(ref, "config_patch", None)
        # block-scaled FP8 written in another dtype (--dtype): not quantized any more
        from mergelang.sources.fp8 import wraps_fp8

        drop = self._c.options.dtype is not None and wraps_fp8(ref)
        if not copies or (patch is None and not drop) or "config.json" not in copies:
            return None
        import json

        from mergelang.io.inputs import check_json_object

        try:
            cfg = check_json_object(copies["config.json"])
        except CheckpointError as e:
            raise MergelangError(error(e.code, str(e), None, e.help)) from None
        if patch is not None:
            cfg.update(patch())
        if drop:
            cfg.pop("quantization_config", None)
        dtype = self.config_dtype()
        cfg["torch_dtype"] = dtype
        if "dtype" in cfg:
            cfg["dtype"] = dtype
        return {"config.json": json.dumps(cfg, indent=2) + "\n"}

    def config_dtype(self) -> str:
        """config.json's dtype: the recipe's `dtype`, else the most common floating output dtype."""
        if self._c.options.dtype:
            return self._c.options.dtype
        sizes: Counter[str] = Counter()
        for t in self.outputs:
            if t.dtype in ("float32", "float16", "bfloat16", "float64") and \
                    not t.name.endswith("_scale_inv"):  # FP8 scales: not the model's dtype
                sizes[t.dtype] += t.nbytes
        return sizes.most_common(1)[0][0] if sizes else "float32"

    def close(self) -> None:
        self._c.close()


def compile(recipe: str | Path, *, dtype: str | None = None, shard_size: str | int | None = None,
            allow_pickle: bool = False, follow_symlinks: bool = False, allow_plugins: bool = False,
            compute_dtype: str | None = None, **overrides: Any) -> Recipe:
    """Compile a recipe (a path or its text). Keyword arguments override `param`s (values) and
    `model`s (paths, relative to the current directory, or dicts of tensors); raises
    `MergelangError` carrying every diagnostic. `allow_pickle` lets models be pickle
    checkpoints, read with torch.load(weights_only=True); `follow_symlinks` reads files whose
    symbolic links leave their model folder (refused by default, E314); `allow_plugins` lets the
    recipe's `import "file.py"` run the Python methods it declares (docs/language.md).
    `compute_dtype` ("float32" | "float64") overrides the recipe's option of that name."""
    source, base, imported = recipe_input(recipe)
    options = {"dtype": dtype, "shard_size": shard_size, "compute_dtype": compute_dtype}
    compiled = compile_recipe(source, base, overrides, options, allow_pickle=allow_pickle,
                              follow_symlinks=follow_symlinks, allow_plugins=allow_plugins)
    compiled.warnings[:0] = imported  # a mergekit config's import warnings come first
    def recompile(runtime: tuple[str, ...] = (), values: Mapping[str, Any] | None = None) -> Compilation:
        return compile_recipe(source, base, {**overrides, **(values or {})}, options,
                              allow_pickle=allow_pickle, follow_symlinks=follow_symlinks,
                              runtime=runtime, allow_plugins=allow_plugins)

    spec = None
    if all(isinstance(v, (str, int, float, bool, list, tuple, type(None), os.PathLike))
           for v in overrides.values()):  # values a worker can be given (not state dicts)
        from mergelang.distributed.ray_worker import RecipeSpec

        used = compiled.overridden  # model paths made absolute: workers run in other folders
        spec = RecipeSpec(source, Path(os.path.abspath(base)),
                          {k: used.get(k, str(v) if isinstance(v, os.PathLike) else v)
                           for k, v in overrides.items()}, options, allow_pickle, follow_symlinks,
                          allow_plugins)
    return Recipe(compiled, spec, recompile)


def parse(recipe: str | Path):
    """Parse only (no checks): the AST of a recipe."""
    source, _ = _source(recipe)
    try:
        return parse_program(source)
    except CompileError as exc:
        raise MergelangError(exc.diag) from None


def merge(expr: str, *, dtype: str | None = None, outputs: list[str] | tuple[str, ...] | None = None,
          **state_dicts: Mapping[str, torch.Tensor] | Any) -> dict[str, Any]:
    """Merge in-memory state dicts with one recipe expression applied to every tensor, e.g.
    `merge("ties(base, [a, b], density = 0.5)", base=sd0, a=sd1, b=sd2)`. Non-tensor keyword
    values are params. The output follows the names and dtypes of `base` (else the first dict).
    With `outputs` (names), the expression gives one tensor per name (a stack, e.g.
    `emr(base, [a, b])`) and the result is {name: state dict}."""
    models = {k: v for k, v in state_dicts.items() if isinstance(v, Mapping)}
    params = {k: v for k, v in state_dicts.items() if not isinstance(v, Mapping)}
    if not models:
        raise TypeError("merge() needs at least one state dict keyword argument")
    ref = "base" if "base" in models else next(iter(models))
    lines = [f'model {name} = "<memory>"' for name in models]
    lines += [f"param {name} = 0" for name in params]
    names = ""
    if outputs is not None:
        import json

        names = "[" + ", ".join(json.dumps(str(n)) for n in outputs) + "] "
    lines.append(f"merge {names}from {ref} {{\n    \"*\" => {expr}\n}}")
    source = "\n".join(lines) + "\n"
    recipe = Recipe(compile_recipe(SourceFile("<merge>", source), Path.cwd(),
                                   {**models, **params}, {"dtype": dtype}))
    return recipe.evaluate()
