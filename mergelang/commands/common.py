"""What the CLI's command modules share: diagnostics rendering, the error guard (exit codes), and
compiling a recipe with `--set` overrides and its warnings shown."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import click

from mergelang.diagnostics import Diagnostic, MergelangError


def echo_diags(diags: list[Diagnostic]) -> None:
    color = sys.stderr.isatty() and not os.environ.get("NO_COLOR")
    for d in diags:
        click.echo(d.render(color=color) + "\n", err=True)


def cli_guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn MergelangError into rendered diagnostics + exit 1; anything unexpected into exit 3."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.pop("debug", False) or bool(os.environ.get("MERGELANG_DEBUG"))
        try:
            return fn(*args, **kwargs)
        except MergelangError as exc:
            echo_diags(exc.diagnostics)
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
    wrapper = click.option("--debug", is_flag=True,
                           help="on an internal error (exit 3), print the Python traceback")(wrapper)
    return wrapper


def parse_sets(sets: tuple[str, ...]) -> dict[str, Any]:
    from mergelang.compiler import parse_override

    out: dict[str, Any] = {}
    for item in sets:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():  # a usage error (exit 2), like any malformed option
            raise click.BadParameter(f"{item!r}: expected NAME=VALUE, e.g. --set density=0.3 or "
                                     "--set base=./other-model", param_hint="--set")
        out[name.strip()] = parse_override(value.strip())
    return out


def compile_from_cli(recipe: str, sets: tuple[str, ...], dtype: str | None = None,
             shard_size: str | None = None, log_json: bool = False, allow_pickle: bool = False,
             follow_symlinks: bool = False, allow_plugins: bool = False,
             compute_dtype: str | None = None):
    from mergelang.api import compile as ml_compile

    recipe_obj = ml_compile(Path(recipe), dtype=dtype, shard_size=shard_size,
                            allow_pickle=allow_pickle, follow_symlinks=follow_symlinks,
                            allow_plugins=allow_plugins, compute_dtype=compute_dtype,
                            **parse_sets(sets))
    if recipe_obj.warnings and log_json:
        from mergelang.progress import diagnostic_event

        for d in recipe_obj.warnings:
            click.echo(diagnostic_event(d), err=True)
    elif recipe_obj.warnings:
        echo_diags(recipe_obj.warnings)
    return recipe_obj


allow_pickle_opt = click.option(
    "--allow-pickle", is_flag=True,
    help="read pickle checkpoints (.bin/.pt) with torch.load(weights_only=True); off by default")
plugins_opt = click.option(
    "--allow-plugins", is_flag=True,
    help='let the recipe\'s `import "file.py"` run the Python merge methods it declares (runs '
         "that code with your permissions: off by default)")
follow_opt = click.option(
    "--follow-symlinks", is_flag=True,
    help="read and copy model files whose symbolic links leave the model folder (refused by default)")
recipe_arg = click.argument("recipe", type=click.Path(dir_okay=False))
#: tune / learn: trials and steps run on the CPU unless asked
search_device_opt = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu",
                                 show_default=True)
search_force_opt = click.option("--force", is_flag=True,
                                help="replace an earlier mergelang output at --output")
set_opt = click.option("--set", "sets", multiple=True, metavar="NAME=VALUE",
                       help="override a param (a value) or a model (a path); repeatable")


def write_output_file(out: str, data: str | bytes, inputs: Any, force: bool, option: str = "-o",
                      parents: bool = False) -> None:
    """Write a single-file output through the output guard (io/outguard.py): E404 over an input,
    E403 over an existing file without --force, E502 when it cannot be written."""
    from mergelang.errors import CodedError, to_diagnostic
    from mergelang.io.outguard import write_file_output

    try:
        write_file_output(out, data, inputs, force, option, parents)
    except CodedError as exc:
        raise MergelangError(to_diagnostic(exc)) from None


def check_output_file(out: str, inputs: Any, force: bool, option: str = "-o",
                      parents: bool = False) -> None:
    """:func:`write_output_file`'s checks alone (before the work that makes the data)."""
    from mergelang.errors import CodedError, to_diagnostic
    from mergelang.io.outguard import check_file_output

    try:
        check_file_output(out, inputs, force, option, parents)
    except CodedError as exc:
        raise MergelangError(to_diagnostic(exc)) from None


def recipe_inputs(recipe: str) -> list[Path]:
    """The recipe, its imports and its models' local paths as written (resolved against the
    recipe's folder), from its syntax alone: what an output must not overwrite when the recipe
    is not compiled (`compile --emit ast`, or a recipe that does not compile)."""
    from mergelang.lang import ast

    path = Path(os.path.abspath(recipe))
    out = [path]
    try:
        from mergelang.api import parse

        prog = parse(path)
    except (MergelangError, OSError, ValueError, RecursionError):
        return out
    for decl in prog.of(ast.ModelDecl):
        if isinstance(decl.value, ast.String) and "://" not in decl.value.value:
            out.append(path.parent / decl.value.value)
    out += [path.parent / i.path for i in prog.of(ast.Import)]
    return out


force_file_opt = click.option("--force", is_flag=True, help="replace an existing file at -o "
                              "(never an input)")
