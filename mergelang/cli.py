"""The `mergelang` command line (click). Exit codes: 0 ok, 1 diagnostics, 2 usage, 3 internal error.

No user error ever shows a Python traceback; an internal error prints one line and asks for a
bug report (set MERGELANG_DEBUG=1 or pass --debug for the traceback).
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import time
from pathlib import Path

import click

from mergelang.diagnostics import MergelangError
from mergelang.ir.types import format_bytes, parse_bytes, plural


from mergelang.commands.common import (  # noqa: F401  (shared with commands/)
    compile_from_cli, echo_diags, cli_guard, parse_sets, allow_pickle_opt, check_output_file, follow_opt,
    force_file_opt, plugins_opt, recipe_arg, recipe_inputs, set_opt, write_output_file)


class _Main(click.Group):
    """The command group; it records the command line for the outputs' card and manifest."""

    def main(self, args=None, *a, **kw):  # type: ignore[no-untyped-def, override]
        from mergelang.record import set_command

        set_command(sys.argv[1:] if args is None else args)
        try:
            return super().main(args, *a, **kw)
        finally:  # a later use from Python (tests, notebooks) is not this command
            set_command(None)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergelang")
def main() -> None:
    """mergelang: merge neural-network checkpoints with .mrg recipes."""
    _tune_gc()


def entry() -> None:
    """The `mergelang` command (and `python -m mergelang`): :func:`main`, then, after a command
    that succeeded, a process exit that skips the interpreter's teardown. Tearing down torch,
    numba and one graph's objects measured ~0.55 s of every run (a tenth of a 1B merge), work
    whose only effect is freeing memory the OS reclaims anyway. Everything a command writes is
    complete and closed when it returns (outputs are renamed into place, the journal is written
    through its own file descriptor); stdio is flushed and the atexit handlers still run
    (logging, thread pools, temporary files). A failing command exits the ordinary way."""
    from mergelang.io import interrupt

    interrupt.arm()  # io/interrupt: Ctrl-C recorded, never lost before an output is in place
    try:
        main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    _exit_now()


def _exit_now() -> None:
    _flush_stdio()
    atexit._run_exitfuncs()  # noqa: SLF001 - what interpreter shutdown would run first
    _flush_stdio()  # what the handlers printed
    os._exit(0)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said on it
            pass


def _tune_gc() -> None:
    """Collect cycles 100x less often than CPython's default: a mergelang process builds one
    graph and then streams tensors, and almost all its objects (torch's import alone leaves
    hundreds of thousands) live until it exits, so frequent passes over them are wasted work
    (measured: ~0.7 s of a 10 s 1B ties merge on 2 cores). Cyclic garbage is still collected."""
    gc.set_threshold(70_000, 50, 100)


@main.command()
@recipe_arg
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="output folder (written atomically), or FILE.safetensors: one file with the "
                   "recipe and the manifest in its metadata")
@set_opt
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--memory-budget", default=None, metavar="SIZE", help="cap on live + prefetched tensor bytes, e.g. 8GB")
@click.option("--dtype", default=None, help="output dtype (overrides the recipe's `option dtype`)")
@click.option("--shard-size", default=None, metavar="SIZE", help="max shard size, e.g. 2GB (default 5GB)")
@click.option("--compute-dtype", type=click.Choice(["float32", "float64"]), default=None,
              help="the dtype the merge computes in (overrides `option compute_dtype`; default float32)")
@click.option("--force", is_flag=True, help="replace an existing output folder")
@click.option("--resume", is_flag=True,
              help="continue an interrupted run from its work folder (same recipe and inputs)")
@click.option("--nan-check", type=click.Choice(["error", "warn", "off"]), default=None,
              help="NaN/Inf in an output tensor: fail (default), warn, or skip the check")
@click.option("--fsync/--no-fsync", default=True, show_default=True,
              help="wait until the output is on disk before moving it into place; --no-fsync is "
                   "faster on slow disks but a power loss soon after may lose data (resume still "
                   "checks every kept tensor)")
@allow_pickle_opt
@follow_opt
@plugins_opt
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="run here, or on a Ray cluster whose workers share the filesystem (mergelang[ray])")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="the Ray cluster to use with --executor ray (default: start a local Ray instance)")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar or summary")
@click.option("--log-json", is_flag=True,
              help="progress as JSON lines on stderr (one per tensor, then a summary)")
@click.option("--no-model-card", "no_card", is_flag=True,
              help="do not write the model card README.md into the output")
@click.option("--report", is_flag=True,
              help="also write OUT/mergelang_report.json (+ .html): per rule and layer, what the "
                   "output kept of each input's task vector, its cosine and distance to each input")
@cli_guard
def run(recipe: str, out: str, sets: tuple[str, ...], device: str, memory_budget: str | None,
        dtype: str | None, shard_size: str | None, compute_dtype: str | None, force: bool, resume: bool,
        nan_check: str | None, fsync: bool, allow_pickle: bool, follow_symlinks: bool, quiet: bool,
        log_json: bool = False, executor: str = "local", ray_address: str | None = None,
        allow_plugins: bool = False, no_card: bool = False, report: bool = False) -> None:
    """Run RECIPE and write the merged model to OUTPUT."""
    budget = _budget(memory_budget)
    r = compile_from_cli(recipe, sets, dtype, shard_size, log_json, allow_pickle, follow_symlinks,
                 allow_plugins=allow_plugins, compute_dtype=compute_dtype)
    plan = r.compilation.plan
    from mergelang.runtime.executor import target_for

    try:  # the run's device and budget, resolved once: `r.run` and the executor take the Target
        target = target_for(device, budget)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    start = time.perf_counter()
    from mergelang.progress import reporter

    with reporter(plan, quiet, log_json) as (update, finish):
        def log(msg: str) -> None:  # warnings (tensors above the budget, W004, E503) as they are
            click.echo(msg if msg.startswith("warning") else f"mergelang: {msg}", err=True)

        try:
            if ray_address and executor != "ray":
                raise click.UsageError("--ray-address needs --executor ray")
            path = r.run(out, device=target, force=force, progress=update, resume=resume,
                         nan_check=nan_check, log=log, fsync=fsync,
                         executor=executor, ray_address=ray_address, model_card=not no_card,
                         report=report)
        except KeyboardInterrupt:
            from mergelang.io.journal import work_dir_for

            kept = work_dir_for(out)
            more = (f"; finished tensors are kept in {kept}: rerun with --resume to continue"
                    if kept.is_dir() else "")
            click.echo(f"mergelang: interrupted; nothing was written to the output folder{more}",
                       err=True)
            sys.exit(130)
        finish(str(path))
    r.close()
    if not quiet and not log_json:
        secs = time.perf_counter() - start
        click.echo(f"merged {len(r.outputs)} tensors ({format_bytes(plan.write_bytes)}) into {path} "
                   f"in {secs:.1f}s", err=True)


def _budget(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_bytes(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size like 8GB or 512MiB",
                                 param_hint="--memory-budget") from None


@main.command()
@recipe_arg
@set_opt
@allow_pickle_opt
@follow_opt
@plugins_opt
@cli_guard
def check(recipe: str, sets: tuple[str, ...], allow_pickle: bool, follow_symlinks: bool,
          allow_plugins: bool = False) -> None:
    """Check RECIPE from checkpoint headers only (no tensor data is read)."""
    r = compile_from_cli(recipe, sets, allow_pickle=allow_pickle, follow_symlinks=follow_symlinks,
                 allow_plugins=allow_plugins)
    plan = r.compilation.plan
    outs = f" in {len(r.output_names)} outputs ({', '.join(r.output_names)})" if r.output_names else ""
    click.echo(f"ok: {len(r.outputs)} output tensors{outs}, reads {format_bytes(plan.read_bytes)}, "
               f"writes {format_bytes(plan.write_bytes)}, {plural(len(r.warnings), 'warning')}")
    r.close()


@main.command(name="compile")
@recipe_arg
@set_opt
@click.option("--emit", type=click.Choice(["ast", "graph", "optimized", "plan"]), default="optimized",
              show_default=True, help="the stage to print")
@click.option("-o", "--output", "out", type=click.Path(), default=None,
              help="write to FILE instead of stdout")
@click.option("--memory-budget", default=None, metavar="SIZE",
              help="with --emit plan: the plan split into row chunks for this budget")
@allow_pickle_opt
@plugins_opt
@force_file_opt
@cli_guard
def compile_cmd(recipe: str, sets: tuple[str, ...], emit: str, out: str | None,
                allow_pickle: bool, memory_budget: str | None = None, allow_plugins: bool = False,
                force: bool = False) -> None:
    """Compile RECIPE and print a stage (stable text)."""
    inputs = recipe_inputs(recipe)
    if out:
        check_output_file(out, inputs, force)  # before the work, not after it
    if emit == "ast":
        from mergelang.api import parse
        from mergelang.lang.ast import dump

        text = dump(parse(Path(recipe))) + "\n"
    else:
        budget = _budget(memory_budget)
        r = compile_from_cli(recipe, sets, allow_pickle=allow_pickle, allow_plugins=allow_plugins)
        text = r.emit(emit, budget) if emit == "plan" else r.emit(emit)
        if out:
            inputs += r.compilation.inputs
        r.close()
    if out:
        write_output_file(out, text, inputs, force)
    else:
        click.echo(text, nl=False)


@main.command()
@click.option("--all", "show_all", is_flag=True, help="also list the built-in primitives")
@cli_guard
def methods(show_all: bool) -> None:
    """List the standard library's merge methods (from stdlib/*.mrg)."""
    from mergelang.lang.elaborate import signature_of
    import mergelang.sources  # noqa: F401  (their intrinsics are listed too)
    from mergelang.lang.intrinsics import INTRINSICS
    from mergelang.lang.loader import stdlib_functions

    public = {n: f for n, f in sorted(stdlib_functions().items()) if not n.startswith("_")}
    blocks = {n: f for n, f in public.items() if Path(f.span.source.path).name in BLOCK_FILES}
    for title, group in (("merge methods", {n: f for n, f in public.items() if n not in blocks}),
                         ("building blocks", blocks)):
        click.echo(f"# {title}")
        for name, fn in group.items():
            click.echo(signature_of(fn).render())
            click.echo(f"    {_first_sentence(fn.doc)}")
        click.echo()
    if show_all:
        click.echo("# primitives")
        for name, intr in sorted(INTRINSICS.items()):
            click.echo(f"{intr.sig.render()}\n    {intr.sig.doc}")


#: stdlib files holding building blocks (listed after the merge methods)
BLOCK_FILES = ("core.mrg", "sparsify.mrg")


#: abbreviations after which a period does not end a sentence
_ABBREVIATIONS = ("et al.", "e.g.", "i.e.", "vs.", "cf.", "approx.", "Fig.", "Eq.", "resp.")


def _first_sentence(doc: str) -> str:
    text = " ".join(doc.split())
    start = 0
    while True:
        end = text.find(". ", start)
        if end < 0:
            return text
        if any(text[: end + 1].endswith(a) for a in _ABBREVIATIONS):
            start = end + 2
            continue
        return text[: end + 1]


@main.command(name="extract-lora")
@click.argument("base", type=click.Path())
@click.argument("finetuned", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="the adapter folder (adapter_config.json, adapter_model.safetensors)")
@click.option("--rank", type=click.IntRange(min=1), required=True, help="the LoRA rank (max per module)")
@click.option("--include", multiple=True, metavar="RE", help="decompose only modules matching RE")
@click.option("--exclude", multiple=True, metavar="RE", help="do not decompose modules matching RE")
@click.option("--embed-lora", is_flag=True, help="decompose embeddings too (else modules_to_save)")
@click.option("--save-module", "save_modules", multiple=True, metavar="NAME",
              help="save module NAME (or every module whose last name part is NAME) at full rank")
@click.option("--skip-undecomposable", is_flag=True, help="leave out weights that are not 2-D")
@click.option("--distribute-scale/--no-distribute-scale", default=True, show_default=True,
              help="split sqrt(S) between A and B (else A = S Vh, B = U)")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--force", is_flag=True, help="replace an earlier mergelang output at OUTPUT")
@cli_guard
def extract_lora_cmd(base: str, finetuned: str, out: str, rank: int, include: tuple[str, ...],
                     exclude: tuple[str, ...], embed_lora: bool, save_modules: tuple[str, ...],
                     skip_undecomposable: bool, distribute_scale: bool, device: str, force: bool) -> None:
    """A PEFT LoRA adapter approximating FINETUNED - BASE (as mergekit-extract-lora)."""
    from mergelang.tools.extract_lora import extract_lora

    path = extract_lora(base, finetuned, out, rank, include=include, exclude=exclude,
                        embed_lora=embed_lora, save_modules=save_modules,
                        skip_undecomposable=skip_undecomposable, distribute_scale=distribute_scale,
                        device=device, force=force, log=lambda m: click.echo(f"mergelang: {m}", err=True))
    click.echo(f"wrote the adapter {path}", err=True)


@main.command(name="import-mergekit")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", type=click.Path(), default=None,
              help="write the recipe to FILE (default: stdout)")
@click.option("--layer-prefix", default="model.layers", show_default=True,
              help="tensor-name prefix of the numbered transformer blocks")
@click.option("--allow-crimes", is_flag=True,
              help="import models whose config.json name different architectures (refused by "
                   "default, E709, as mergekit); the recipe gets `option allow_crimes = true`")
@force_file_opt
@cli_guard
def import_mergekit(config: str, out: str | None, layer_prefix: str, allow_crimes: bool = False,
                    force: bool = False) -> None:
    """Translate a mergekit YAML CONFIG into an equivalent .mrg recipe (a mergekit-evolve
    config: a recipe with ranged params, and the `mergelang tune` command that searches them)."""
    from mergelang.interop.mergekit_import import import_file

    result = import_file(config, out, layer_prefix, allow_crimes)
    if result.errors:
        raise MergelangError(result.diagnostics)
    echo_diags(result.diagnostics)
    if out:
        inputs = [Path(config), *result.reads, *_imported_models(result.text, out)]  # reads: task YAMLs
        write_output_file(out, result.text, inputs, force, parents=True)
        click.echo(f"wrote {out} ({plural(len(result.diagnostics), 'warning')})", err=True)
    else:
        click.echo(result.text, nl=False)
    if result.tune_command:  # a mergekit-evolve config: the search to run
        click.echo(f"search it with: {result.tune_command}", err=True)


def _imported_models(text: str, out: str) -> list[Path]:
    """The local model paths an imported recipe (to be written at `out`) names."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # parse the text as if it were at `out`
        probe = Path(tmp) / "recipe.mrg"
        probe.write_text(text)
        found = recipe_inputs(str(probe))[1:]
    base = Path(os.path.abspath(out)).parent
    return [base / p.relative_to(tmp) if p.is_relative_to(tmp) else p for p in found]


@main.command()
@recipe_arg
@set_opt
@click.option("--format", "fmt", type=click.Choice(["text", "dot", "html", "svg", "png"]), default="text",
              show_default=True, help="a text summary, or the graph: DOT, a self-contained HTML page "
              "(inline SVG, drawn without Graphviz), or svg/png rendered by Graphviz")
@click.option("-o", "--output", "out", type=click.Path(), default=None,
              help="write to FILE (needed for png)")
@click.option("--ops", is_flag=True,
              help="draw the op-level graph (one cluster per group of same-shaped tensors) instead "
                   "of models -> rules -> outputs")
@force_file_opt
@cli_guard
def explain(recipe: str, sets: tuple[str, ...], fmt: str, out: str | None, ops: bool = False,
            force: bool = False) -> None:
    """Explain RECIPE: rules per tensor group, methods, bytes, peak memory; or draw it."""
    from mergelang.explain import explain_dot, explain_rules_dot, explain_text, render

    inputs = recipe_inputs(recipe)
    if out:
        check_output_file(out, inputs, force)  # before the work, not after it
    r = compile_from_cli(recipe, sets)
    try:
        c = r.compilation
        if out:
            inputs += c.inputs
        if fmt == "text":
            data: str | bytes = explain_text(c)
        else:
            dot = explain_dot(c) if ops else explain_rules_dot(c)
            if fmt == "html":
                from mergelang.commands.explain_html import to_html

                data = to_html(dot, f"mergelang explain {Path(recipe).name}" + (" --ops" if ops else ""))
            else:
                data = dot if fmt == "dot" else render(dot, fmt)
    finally:
        r.close()
    if out:
        write_output_file(out, data, inputs, force)
        click.echo(f"wrote {out}", err=True)
    elif isinstance(data, bytes) and fmt == "png":
        raise click.UsageError("--format png needs -o FILE")
    else:
        click.echo(data if isinstance(data, str) else data.decode(), nl=False)


from mergelang.commands.search import learn_cmd, tune_cmd  # noqa: E402  (commands/ imports no cli)

from mergelang.commands.rmm import rmm_cmd, rmm_rebuild_cmd  # noqa: E402
from mergelang.commands.data import stats_cmd  # noqa: E402
from mergelang.commands.inspect import inspect_cmd  # noqa: E402

main.add_command(tune_cmd)
main.add_command(learn_cmd)
main.add_command(rmm_cmd)
main.add_command(rmm_rebuild_cmd)
main.add_command(stats_cmd)

from mergelang.commands.verify import verify_cmd  # noqa: E402

main.add_command(verify_cmd)
main.add_command(inspect_cmd)


@main.command()
@click.option("-q", "--quiet", is_flag=True, help="no per-method timings")
@cli_guard
def warmup(quiet: bool) -> None:
    """Compile the fused CPU loops of the common methods into the cache (run once after
    installing: a first merge then costs what a later one does)."""
    from mergelang.tools.warmup import warmup as run_warmup

    secs = run_warmup(log=(lambda m: None) if quiet else (lambda m: click.echo(m, err=True)))
    click.echo(f"warm-up done in {secs:.1f}s", err=True)
