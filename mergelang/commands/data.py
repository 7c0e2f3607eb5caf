"""`mergelang stats`: statistics from data (data/stats.py) written as a sidecar folder."""

from __future__ import annotations

from typing import Any

import click

from mergelang.commands.common import echo_diags, cli_guard
from mergelang.diagnostics import MergelangError, error


@click.command(name="stats")
@click.argument("model", nargs=-1, required=True)
@click.option("--data", required=True, metavar="DATA",
              help="FILE.txt (one example per line), FILE.jsonl, a datasets folder, or FILE.py:BATCHES")
@click.option("--kind", type=click.Choice(["gram", "fisher", "correlation", "gram-plusplus"]),
              required=True,
              help="gram: input Gram matrices of linear layers (regmean); fisher: diagonal Fisher; "
                   "correlation: two models' activation correlations (align by activations); "
                   "gram-plusplus: RegMean++ Grams of each MODEL, inputs from the model merged so far")
@click.option("-o", "--output", "out", required=True, multiple=True, type=click.Path(),
              help="the sidecar folder (gram-plusplus: one per MODEL, in order)")
@click.option("--alpha", type=click.FloatRange(0, 1), default=None,
              help="gram-plusplus: the alpha of the regmean merge that will read the Grams [default: 0.95]")
@click.option("--max-examples", type=click.IntRange(min=1), default=None, help="use the first N examples")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="examples per forward pass [default: 8 for gram, 1 for fisher]")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True,
              help="truncate examples to this many tokens")
@click.option("--field", default="text", show_default=True, help="the text field of .jsonl / datasets data")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--memory-budget", default=None, metavar="SIZE",
              help="cap on the Gram matrices held at once, e.g. 2GB (more passes over the data)")
@click.option("--group", "groups", multiple=True, metavar="GROUP",
              help="correlation: a permutation group as align's `groups` strings (repeatable; "
                   "default: the built-in spec)")
@click.option("--module", default=None, metavar="FILE.py:NAME",
              help="correlation: run the models as this torch module (a class or function) "
                   "instead of through transformers")
@click.option("--force", is_flag=True, help="replace an earlier mergelang output at OUTPUT")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
@cli_guard
def stats_cmd(model: tuple[str, ...], data: str, kind: str, out: tuple[str, ...],
              alpha: float | None, max_examples: int | None, batch_size: int | None, seq_len: int,
              field: str, device: str, memory_budget: str | None, groups: tuple[str, ...],
              module: str | None, force: bool, quiet: bool) -> None:
    """Compute statistics of MODEL (a folder or hf:ORG/NAME) on data: Gram matrices for
    `regmean(models, grams)`, the Fisher for `fisher(models, fishers)`; with `--kind
    correlation`, two models A B: their activation correlations, for `align(b, to = a, by =
    "activations", stats = c)`; with `--kind gram-plusplus`, the models merged together: each
    one's RegMean++ Grams (one -o per model)."""
    from mergelang.data.stats import stats
    from mergelang.ir.types import parse_bytes

    if (groups or module) and kind != "correlation":
        raise click.UsageError("--group and --module are options of --kind correlation")
    if kind == "gram-plusplus":
        return _plusplus(model, data, out, alpha, max_examples, batch_size, seq_len,
                         field, device, memory_budget, force, quiet)
    if alpha is not None or len(out) != 1:
        raise click.UsageError("--alpha and several -o are for --kind gram-plusplus")

    try:
        budget = parse_bytes(memory_budget) if memory_budget is not None else None
    except ValueError:
        raise click.BadParameter(f"{memory_budget!r} is not a size like 8GB or 512MiB",
                                 param_hint="--memory-budget") from None

    want = 2 if kind == "correlation" else 1
    if len(model) != want:
        raise click.UsageError(f"--kind {kind} takes {want} model{'s' if want > 1 else ''}, got {len(model)}")
    res = stats(list(model) if want == 2 else model[0], data, kind, out[0], max_examples=max_examples,
                batch_size=batch_size, seq_len=seq_len, device=device, memory_budget=budget,
                field=field, force=force, progress=not quiet, log=lambda d: echo_diags([d]),
                groups=groups, module=module)
    info = res.info
    click.echo(f"wrote {len(res.tensors)} {kind} tensors from {info['examples']} examples "
               f"({info.get('tokens', info.get('rows'))} {'tokens' if 'tokens' in info else 'rows'}) "
               f"to {res.path}", err=True)


def _plusplus(models: tuple[str, ...], data: str, out: tuple[str, ...], alpha: float | None,
              max_examples: int | None, batch_size: int | None, seq_len: int, field: str, device: str,
              memory_budget: str | None, force: bool, quiet: bool) -> None:
    """`stats --kind gram-plusplus`: data/regmeanpp.py."""
    from mergelang.data.regmeanpp import regmeanpp

    if len(models) < 2:
        raise click.UsageError("--kind gram-plusplus takes the models merged together: MODEL MODEL...")
    if len(out) != len(models):
        raise click.UsageError(f"--kind gram-plusplus writes one sidecar per model: give {len(models)} "
                               "-o folders, in the order of the models")
    if memory_budget is not None:
        raise click.UsageError("--memory-budget is not available for --kind gram-plusplus")
    res = regmeanpp(list(models), data, 0.95 if alpha is None else alpha, list(out),
                    max_examples=max_examples, batch_size=batch_size or 8, seq_len=seq_len,
                    device=device, field=field, force=force, progress=not quiet)
    for st in res:
        click.echo(f"wrote {len(st.tensors)} gram-plusplus tensors of {st.info['model']} from "
                   f"{st.info['examples']} examples ({st.info['tokens']} tokens) to {st.path}", err=True)


#: tune's options for the objectives on data (`--objective perplexity:DATA`, `lm-eval:TASKS`)
lm_eval_include_opt = click.option(
    "--lm-eval-include", default=None, metavar="PATH", type=click.Path(),
    help="lm-eval: a folder of task YAMLs (lm_eval --include_path)")
limit_opt = click.option(
    "--limit", type=click.IntRange(min=1), default=None, metavar="N",
    help="perplexity: the first N examples; lm-eval: N documents per task")
num_fewshot_opt = click.option(
    "--num-fewshot", type=click.IntRange(min=0), default=None, metavar="K",
    help="lm-eval: K few-shot examples per task (lm_eval --num_fewshot)")


def is_builtin(objective: str) -> bool:
    return objective.partition(":")[0] in ("perplexity", "lm-eval")


def builtin_objective(objective: str, recipe: Any, directions: tuple[str, ...], executor: str,
                      include: str | None, limit: int | None,
                      num_fewshot: int | None = None) -> tuple[Any, tuple[str, ...]]:
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
    made = builtin(objective, src.folder, include_path=include, limit=limit, num_fewshot=num_fewshot)
    assert made is not None
    fn, implied = made
    if directions and set(directions) != {implied}:
        raise click.UsageError(f"--objective {objective} is {implied}d; drop --direction")
    return fn, (implied,)
