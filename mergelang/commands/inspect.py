"""`mergelang inspect BASE MODEL... -o REPORT`: task-vector statistics of models against their
base, in one streaming pass (tools/inspect.py, docs/inspect.md)."""

from __future__ import annotations

import time

from typing import Any

import click

from mergelang.commands.common import cli_guard, allow_pickle_opt, follow_opt


@click.command(name="inspect")
@click.argument("base")
@click.argument("models", nargs=-1, required=True)
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="the report folder (report.json; report.html or PNG plots)")
@click.option("--format", "fmt", type=click.Choice(["html", "png", "json"]), default="html",
              show_default=True, help="report.json plus: one self-contained HTML page, PNG plots, "
                                      "or nothing else")
@click.option("--spectrum", is_flag=True,
              help="also the singular values of every 2-D task vector (top-k, effective rank; "
                   "an SVD per tensor and model: slower)")
@click.option("--top-k", "top_k", type=click.IntRange(min=1), default=16, show_default=True,
              help="with --spectrum: how many singular values to keep per tensor")
@click.option("--memory-budget", default=None, metavar="SIZE",
              help="cap on the bytes read ahead, e.g. 8GB (default 2GiB)")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--force", is_flag=True, help="replace an earlier mergelang output at OUTPUT")
@allow_pickle_opt
@follow_opt
@click.option("-q", "--quiet", is_flag=True, help="no summary")
@cli_guard
def inspect_cmd(base: str, models: tuple[str, ...], out: str, fmt: str, spectrum: bool, top_k: int,
                memory_budget: str | None, device: str, force: bool, allow_pickle: bool,
                follow_symlinks: bool, quiet: bool) -> None:
    """Compare MODELS with BASE: per tensor, layer and family the norms of the task vectors
    (model - base), their pairwise cosines and sign agreement, and how concentrated they are.
    A MODEL is a folder, a .safetensors file, an hf:ORG/NAME id (local cache) or a model
    expression over `base`, e.g. 'lora("./adapter", base = base)'."""
    from mergelang.ir.types import parse_bytes
    from mergelang.tools.inspect import inspect

    if memory_budget is not None:
        try:
            parse_bytes(memory_budget)
        except ValueError:
            raise click.BadParameter(f"{memory_budget!r} is not a size like 8GB or 512MiB",
                                     param_hint="--memory-budget") from None
    start = time.perf_counter()
    report = inspect(base, list(models), out, fmt=fmt, spectrum=spectrum, spectrum_k=top_k,
                     memory_budget=memory_budget, device=device, force=force,
                     allow_pickle=allow_pickle, follow_symlinks=follow_symlinks,
                     log=lambda m: click.echo(m + "\n", err=True))
    if quiet:
        return
    def num(x: Any, spec: str) -> str:  # "-" for an undefined statistic (no tensor, NaN/Inf)
        return "-" if not isinstance(x, (int, float)) or x != x or x in (float("inf"), float("-inf")) \
            else format(x, spec)

    for lab, m in report["total"]["models"].items():
        click.echo(f"{lab}: |tau| {num(m['norm'], '.4g')} ({num(m['rel_norm'], '.4g')} of |base|), "
                   f"zeros {num(m['zero_frac'], '.3g')}", err=True)
    for key, p in report["total"]["pairs"].items():
        click.echo(f"{key}: cosine {num(p['cosine'], '.4f')}, sign agreement "
                   f"{num(p['sign_agreement'], '.4f')}", err=True)
    click.echo(f"inspected {len(report['tensors'])} tensors in {time.perf_counter() - start:.1f}s; "
               f"wrote {out}", err=True)
