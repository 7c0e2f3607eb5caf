"""The `mergelang` command line (click). Exit codes: 0 ok, 1 diagnostics, 2 usage, 3 internal error.

No user error ever shows a Python traceback; an internal error prints one line and asks for a
bug report (set MERGELANG_DEBUG=1 or pass --debug for the traceback).
"""

from __future__ import annotations

import functools
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import click

from .diagnostics import Diagnostic, MergelangError, error
from .types import parse_bytes


def _echo_diags(diags: list[Diagnostic]) -> None:
    color = sys.stderr.isatty() and not os.environ.get("NO_COLOR")
    for d in diags:
        click.echo(d.render(color=color) + "\n", err=True)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn MergelangError into rendered diagnostics + exit 1; anything unexpected into exit 3."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.pop("debug", False) or bool(os.environ.get("MERGELANG_DEBUG"))
        try:
            return fn(*args, **kwargs)
        except MergelangError as exc:
            _echo_diags(exc.diagnostics)
            n = sum(1 for d in exc.diagnostics if d.is_error)
            click.echo(f"mergelang: {n} error{'s' if n != 1 else ''}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("mergelang: interrupted; nothing was written to the output folder", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if debug:
                traceback.print_exc()
            click.echo(f"mergelang: internal error: {type(exc).__name__}: {exc}\n"
                       "  this is a bug in mergelang; rerun with --debug for the traceback "
                       "and report it", err=True)
            sys.exit(3)
    wrapper = click.option("--debug", is_flag=True, hidden=True, help="show tracebacks")(wrapper)
    return wrapper


def _overrides(sets: tuple[str, ...]) -> dict[str, Any]:
    from .compiler import parse_override

    out: dict[str, Any] = {}
    for item in sets:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise MergelangError(error("E401", f"--set {item!r}: expected NAME=VALUE", None,
                                       "e.g. --set density=0.3 or --set base=./other-model"))
        out[name.strip()] = parse_override(value.strip())
    return out


def _compile(recipe: str, sets: tuple[str, ...], dtype: str | None = None,
             shard_size: str | None = None):
    from .api import compile as ml_compile

    recipe_obj = ml_compile(Path(recipe), dtype=dtype, shard_size=shard_size, **_overrides(sets))
    if recipe_obj.warnings:
        _echo_diags(recipe_obj.warnings)
    return recipe_obj


recipe_arg = click.argument("recipe", type=click.Path(dir_okay=False))
set_opt = click.option("--set", "sets", multiple=True, metavar="NAME=VALUE",
                       help="override a param (a value) or a model (a path); repeatable")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergelang")
def main() -> None:
    """mergelang: merge neural-network checkpoints with .mrg recipes."""


@main.command()
@recipe_arg
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False),
              help="output folder (written atomically)")
@set_opt
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--memory-budget", default=None, metavar="SIZE", help="cap on live + prefetched tensor bytes, e.g. 8GB")
@click.option("--dtype", default=None, help="output dtype (overrides the recipe's `option dtype`)")
@click.option("--shard-size", default=None, metavar="SIZE", help="max shard size, e.g. 2GB (default 5GB)")
@click.option("--force", is_flag=True, help="replace an existing output folder")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar or summary")
@_guard
def run(recipe: str, out: str, sets: tuple[str, ...], device: str, memory_budget: str | None,
        dtype: str | None, shard_size: str | None, force: bool, quiet: bool) -> None:
    """Run RECIPE and write the merged model to OUTPUT."""
    budget = _budget(memory_budget)
    r = _compile(recipe, sets, dtype, shard_size)
    plan = r.compilation.plan
    if budget is not None and plan.peak_bytes > budget:
        click.echo(f"warning: the plan's estimated peak of live tensors ({plan.peak_bytes / 1e9:.2f} GB) "
                   f"is above --memory-budget ({budget / 1e9:.2f} GB); tensors are not split into "
                   f"row chunks, so the merge runs without prefetching and may exceed the budget",
                   err=True)
    from .execute import resolve_device

    try:
        resolve_device(device)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    start = time.perf_counter()
    from tqdm import tqdm

    with tqdm(total=plan.write_bytes, unit="B", unit_scale=True, unit_divisor=1024,
              desc="merging", disable=quiet or None, file=sys.stderr, leave=False) as bar:
        path = r.run(out, device=device, force=force, progress=bar.update, memory_budget=budget)
    r.close()
    if not quiet:
        secs = time.perf_counter() - start
        click.echo(f"merged {len(r.outputs)} tensors ({plan.write_bytes / 1e6:.1f} MB) into {path} "
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
@_guard
def check(recipe: str, sets: tuple[str, ...]) -> None:
    """Check RECIPE from checkpoint headers only (no tensor data is read)."""
    r = _compile(recipe, sets)
    plan = r.compilation.plan
    click.echo(f"ok: {len(r.outputs)} output tensors, reads {plan.read_bytes / 1e6:.1f} MB, "
               f"writes {plan.write_bytes / 1e6:.1f} MB, {len(r.warnings)} warnings")
    r.close()


@main.command(name="compile")
@recipe_arg
@set_opt
@click.option("--emit", type=click.Choice(["ast", "graph", "optimized", "plan"]), default="optimized",
              show_default=True, help="the stage to print")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), default=None,
              help="write to FILE instead of stdout")
@_guard
def compile_cmd(recipe: str, sets: tuple[str, ...], emit: str, out: str | None) -> None:
    """Compile RECIPE and print a stage (stable text)."""
    if emit == "ast":
        from .api import parse
        from .ast import dump

        text = dump(parse(Path(recipe))) + "\n"
    else:
        r = _compile(recipe, sets)
        text = r.emit(emit)
        r.close()
    if out:
        Path(out).write_text(text)
    else:
        click.echo(text, nl=False)


@main.command()
@click.option("--all", "show_all", is_flag=True, help="also list the built-in primitives")
def methods(show_all: bool) -> None:
    """List the standard library's merge methods (from stdlib/*.mrg)."""
    from .elaborate import signature_of
    from .intrinsics import INTRINSICS
    from .loader import stdlib_functions

    for name, fn in sorted(stdlib_functions().items()):
        if name.startswith("_"):
            continue
        sig = signature_of(fn)
        click.echo(sig.render())
        if fn.doc:
            click.echo("    " + fn.doc.replace("\n", "\n    "))
    if show_all:
        click.echo("\nprimitives:")
        for name, intr in sorted(INTRINSICS.items()):
            click.echo(f"{intr.sig.render()}\n    {intr.sig.doc}")
