"""The Python API: `compile` a recipe once, then `run` it (to disk) or `evaluate` it (in memory);
`merge` is the one-liner for state dicts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from mergelang.errors import CodedError, to_diagnostic
from mergelang.compiler import Compilation, compile_recipe
from mergelang.io.checked import all_finite  # noqa: F401  (public here too)
from mergelang.diagnostics import CompileError, Diagnostic, MergelangError
from mergelang.lang.parser import parse_program
from mergelang.interop.recipe_input import merge_source, recipe_input
from mergelang.runtime.runargs import check_run_args

if TYPE_CHECKING:  # torch, the executor and the writers are imported when a merge runs
    import torch

    from mergelang.io.writer import OutputTensor


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

    @property
    def compilation(self) -> Compilation:
        return self._c

    def emit(self, stage: str = "optimized", memory_budget: int | str | None = None) -> str:
        """The stable text of a compiler stage: ast, graph, optimized or plan (with a
        `memory_budget`: the plan split into row chunks for it, as `run` executes it)."""
        from mergelang.explain import emit_text

        return emit_text(self._c, stage, memory_budget)

    def evaluate(self, device: str = "cpu", *, pipelined: bool = True) -> dict[str, Any]:
        """Run the merge in memory and return the output tensors (for small models and tests):
        a state dict, or with named outputs a dict {output name: state dict}."""
        from mergelang.runtime.folderrun import evaluate

        return evaluate(self._c, device, pipelined)

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

    def run(self, out_dir: str | Path, device: Any = "auto", force: bool = False,
            progress: Callable[[int], None] | None = None, resume: bool = False,
            nan_check: str | None = None, log: Callable[[str], None] | None = None, *,
            memory_budget: int | str | None = None, pipelined: bool = True, fsync: bool = True,
            executor: str = "local", ray_address: str | None = None, model_card: bool = True,
            origins: Mapping[str, str] | None = None, report: bool = False) -> Path:
        """Merge to an HF folder at `out_dir` (named outputs: one per name, `out_dir/NAME`, moved
        into place together), through the work folder ``.NAME.mergelang-work`` beside it (with
        a journal), renamed into place once complete and verified; after a failure or a kill
        it is kept, and `resume=True` continues from it (bit-identical result). `device`:
        "auto", "cpu", "cuda" or a resolved Target (runtime/executor.target_for); `memory_budget`
        (bytes, or e.g. "8GB") caps live + prefetched + pending bytes. `nan_check` ("error" |
        "warn" | "off") overrides the recipe's option; `log` receives one-line messages.
        `fsync=False` does not wait for the disk (a resume still checks every kept tensor).
        `executor="ray"`: a Ray cluster (`ray_address`, else a local instance) whose workers
        share the filesystem (distributed/ray_driver.py). `model_card=False`: no README.md
        (record/card.py); `origins`: where params' values came from (param -> e.g. "tune: trial
        3 of study 's'"); `report`: mergelang_report.json / .html (tools/merge_report.py). What
        the folder holds: io/package.py."""
        target = check_run_args(out_dir, device, nan_check, executor, memory_budget)
        if str(out_dir).lower().endswith(".safetensors"):  # one file (io/singlefile.py)
            from mergelang.io.singlefile import run_single_file

            return run_single_file(self, out_dir, force, resume, dict(
                device=target, progress=progress, nan_check=nan_check, log=log,
                pipelined=pipelined, fsync=fsync, executor=executor, ray_address=ray_address,
                origins=origins, report=report))
        from mergelang.distributed.executors import executor_for
        from mergelang.io.checked import WriterSink
        from mergelang.io.package import open_output
        from mergelang.record.manifest import inputs_record
        from mergelang.runtime.folderrun import fingerprint_of, kept_error, output_spans, run_into
        from mergelang.tools.merge_report import reporter_for  # run --report's measurements

        c = self._c
        fingerprint = fingerprint_of(c)
        pkg = self._package(out_dir, target, model_card, origins)
        reporter = reporter_for(c, executor, target.memory_budget) if report else None
        runner = executor_for(executor, target, pipelined=pipelined, spec=self._spec,
                              digest=fingerprint["plan"], address=ray_address,
                               observer=reporter)
        self.run_warnings = []
        writer = None
        try:
            writer, files, sizes = open_output(pkg, out_dir, force, fingerprint, resume, fsync,
                                               c.inputs)
            with writer:
                sink = WriterSink(writer, nan_check or c.options.nan_check, log or (lambda m: None),
                                  output_spans(c), self.run_warnings, fsync)
                run_into(c, runner, sink, target, pkg, progress, sizes)
                pkg.provenance["inputs"] = inputs_record(c)  # type: ignore[index]  (what was read)
                return writer.complete(files if reporter is None else reporter.add_files(files))
        except CodedError as exc:  # writer, journal, checkpoint: each carries code and help
            raise kept_error(writer, to_diagnostic(exc)) from None
        except MergelangError as exc:
            raise kept_error(writer, exc.diagnostics[0], exc.diagnostics[1:]) from None
        finally:
            runner.close()
            if reporter is not None:
                reporter.close(quiet=True)  # its thread ends (add_files raised its errors)

    def _package(self, out_dir: str | Path, target: Any, card: bool,
                 origins: Mapping[str, str] | None) -> Any:
        """What the output folders hold (io/package.py), with the provenance and the card."""
        from mergelang.record.card import card_maker
        from mergelang.record.manifest import provenance
        from mergelang.runtime.folderrun import package_for

        prov = provenance(self._c, target.device, origins)
        return package_for(self._c, self.outputs, out_dir, prov,
                           card_maker(self._c, prov) if card else None)

    def adapter_outputs(self) -> set[str]:
        """The outputs that are LoRA adapters (`merge adapter`); "" for an unnamed one."""
        return {n for b in self._c.unit.blocks if b.adapter for n in (b.outputs or ("",))}

    def config_dtype(self) -> str:
        """config.json's dtype: the recipe's `dtype`, else the most common floating output dtype."""
        from mergelang.io.package import config_dtype

        return config_dtype(self.outputs, self._c.options.dtype)

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

    from mergelang.distributed.ray_worker import spec_for

    return Recipe(compiled, spec_for(source, base, overrides, compiled.overridden, options,
                                     allow_pickle, follow_symlinks, allow_plugins), recompile)


def parse(recipe: str | Path):
    """Parse only (no checks): the AST of a recipe."""
    source = recipe_input(recipe)[0]
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
    source = merge_source(expr, outputs, state_dicts)
    return Recipe(compile_recipe(source, Path.cwd(), state_dicts, {"dtype": dtype})).evaluate()
