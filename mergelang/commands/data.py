"""`mergelang stats`: statistics from data (data/stats.py) written as a sidecar folder."""

from __future__ import annotations

from typing import Any

import click

from mergelang.commands.common import echo_diags, cli_guard
from mergelang.diagnostics import MergelangError, error


@click.command(name="stats")
@click.argument("model")
@click.option("--data", required=True, metavar="DATA",
              help="FILE.txt (one example per line), FILE.jsonl, a datasets folder, or FILE.py:BATCHES")
@click.option("--kind", type=click.Choice(["gram", "fisher"]), required=True,
              help="gram: input Gram matrices of linear layers (regmean); fisher: diagonal Fisher")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="the sidecar folder")
@click.option("--max-examples", type=click.IntRange(min=1), default=None, help="use the first N examples")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="examples per forward pass [default: 8 for gram, 1 for fisher]")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True,
              help="truncate examples to this many tokens")
@click.option("--field", default="text", show_default=True, help="the text field of .jsonl / datasets data")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--memory-budget", default=None, metavar="SIZE",
              help="cap on the Gram matrices held at once, e.g. 2GB (more passes over the data)")
@click.option("--force", is_flag=True, help="replace an earlier mergelang output at OUTPUT")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
@cli_guard
def stats_cmd(model: str, data: str, kind: str, out: str, max_examples: int | None,
              batch_size: int | None, seq_len: int, field: str, device: str,
              memory_budget: str | None, force: bool, quiet: bool) -> None:
    """Compute Gram or Fisher statistics of MODEL (a folder or hf:ORG/NAME) on data, for
    `regmean(models, grams)` and `fisher(models, fishers)`."""
    from mergelang.data.stats import stats
    from mergelang.ir.types import parse_bytes

    try:
        budget = parse_bytes(memory_budget) if memory_budget is not None else None
    except ValueError:
        raise click.BadParameter(f"{memory_budget!r} is not a size like 8GB or 512MiB",
                                 param_hint="--memory-budget") from None

    res = stats(model, data, kind, out, max_examples=max_examples, batch_size=batch_size,
                seq_len=seq_len, device=device, memory_budget=budget, field=field,
                force=force, progress=not quiet, log=lambda d: echo_diags([d]))
    info = res.info
    click.echo(f"wrote {len(res.tensors)} {kind} tensors from {info['examples']} examples "
               f"({info['tokens']} tokens) to {res.path}", err=True)


#: tune's options for the objectives on data (`--objective perplexity:DATA`, `lm-eval:TASKS`)
lm_eval_include_opt = click.option(
    "--lm-eval-include", default=None, metavar="PATH", type=click.Path(),
    help="lm-eval: a folder of task YAMLs (lm_eval --include_path)")
limit_opt = click.option(
    "--limit", type=click.IntRange(min=1), default=None, metavar="N",
    help="perplexity: the first N examples; lm-eval: N documents per task")


def is_builtin(objective: str) -> bool:
    return objective.partition(":")[0] in ("perplexity", "lm-eval")


def builtin_objective(objective: str, recipe: Any, directions: tuple[str, ...], executor: str,
                      include: str | None, limit: int | None) -> tuple[Any, tuple[str, ...]]:
    """(objective, directions) for `--objective perplexity:DATA` / `lm-eval:TASKS`, run in a
    model built from the recipe's `merge from` model (its folder's config and tokenizer); the
    direction is implied (minimize perplexity, maximize scores)."""
    from mergelang.data.objectives import builtin

    if executor != "local":
        raise click.UsageError(f"--objective {objective.partition(':')[0]}: runs with --executor local")
    c = recipe.compilation
    src = c.models.get(c.reference)
    if src is None or src.folder is None:
        raise MergelangError(error("E966", f"--objective {objective}: the `merge from` model "
                                   f"`{c.reference}` is not a model folder with a config.json",
                                   None, "merge from a Hugging Face model folder"))
    made = builtin(objective, src.folder, include_path=include, limit=limit)
    assert made is not None
    fn, implied = made
    if directions and set(directions) != {implied}:
        raise click.UsageError(f"--objective {objective} is {implied}d; drop --direction")
    return fn, (implied,)
