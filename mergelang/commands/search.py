"""`mergelang tune` and `mergelang learn`: the CLI of search/ (studies, learned coefficients)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from mergelang.commands.common import (_compile, _guard, allow_pickle_opt, follow_opt, recipe_arg,
                                       search_device_opt, search_force_opt, set_opt)
from mergelang.diagnostics import MergelangError, error

from mergelang.search.study import SAMPLERS  # noqa: E402  (optuna is imported only when a study opens)


def _fmt_params(p: dict[str, Any]) -> str:
    def num(v: Any) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(num(x) for x in v) + "]"
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{k}={num(v)}" for k, v in p.items())


def summary(res: Any, top: int = 10) -> str:
    """The trials table: the best few (one objective) or the Pareto set (several)."""
    lines = []
    done, failed = res.complete, [t for t in res.trials if t.state == "fail"]
    dirs = ", ".join(res.directions)
    lines.append(f"study: {len(res.trials)} trials ({len(done)} complete, {len(failed)} failed), "
                 f"direction {dirs}")
    how = f"run-time inputs: {', '.join(res.runtime) or 'none'}"
    if res.static:
        how += f"; read at compile time (recompiled per value): {', '.join(res.static)}"
    lines.append(f"params: {how}; {res.compiles} compilation{'s' if res.compiles != 1 else ''}")
    if failed:
        lines.append(f"first failure: trial {failed[0].number}: {failed[0].error or 'interrupted'}")
    if len(res.directions) == 1:
        sign = 1 if res.directions[0] == "maximize" else -1
        ranked = sorted(done, key=lambda t: (-sign * t.value, t.number))[:top]
        if ranked:
            lines.append(f"{'trial':>6}  {'value':>12}  {'secs':>6}  params")
            for t in ranked:
                secs = f"{t.seconds:.2f}" if t.seconds is not None else "-"
                lines.append(f"{t.number:>6}  {t.value:>12.6g}  {secs:>6}  {_fmt_params(t.params)}")
            best = res.best_trial
            lines.append(f"best: trial {best.number}, value {best.value:.6g}: {_fmt_params(best.params)}")
    else:
        front = res.pareto
        lines.append(f"Pareto set: {len(front)} members (--pick K writes member K)")
        lines.append(f"{'K':>3}  {'trial':>6}  values  params")
        for k, t in enumerate(front):
            vals = ", ".join(f"{v:.6g}" for v in t.values)
            lines.append(f"{k:>3}  {t.number:>6}  ({vals})  {_fmt_params(t.params)}")
    return "\n".join(lines)


def write_pareto(res: Any, out: Path) -> Path:
    """OUT/pareto.csv and pareto.json: the Pareto set's table (a new or empty folder only)."""
    import csv

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergelangError(error("E403", f"{out} exists and is not an empty folder; the Pareto table "
                                   "is written only into a new or empty folder", None,
                                   "choose another -o, or --pick K to write member K's merge"))
    out.mkdir(parents=True, exist_ok=True)
    front = res.pareto
    keys = list(front[0].params) if front else []
    with open(out / "pareto.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["member", "trial", *[f"value_{i}" for i in range(len(res.directions))], *keys])
        for k, t in enumerate(front):
            w.writerow([k, t.number, *t.values, *[json.dumps(t.params[p]) for p in keys]])
    (out / "pareto.json").write_text(json.dumps(
        {"directions": list(res.directions),
         "members": [{"member": k, "trial": t.number, "values": list(t.values), "params": t.params}
                     for k, t in enumerate(front)]}, indent=2) + "\n")
    return out / "pareto.csv"


def plot(res: Any, path: str) -> None:
    """The optimisation history (one objective) or the Pareto front (two or three), drawn by
    optuna's matplotlib visualisations."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        if len(res.directions) == 1:
            ax = ovm.plot_optimization_history(res.study)
        elif len(res.directions) in (2, 3):
            ax = ovm.plot_pareto_front(res.study)
        else:
            raise MergelangError(error("E902", "--plot draws one objective's history or a Pareto "
                                       "front of 2 or 3 objectives"))
    fig = ax.figure if hasattr(ax, "figure") else ax.get_figure()
    fig.set_size_inches(8, 5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


@click.command(name="tune")
@recipe_arg
@click.option("--objective", required=True, metavar="FILE.py:FUNC",
              help="FUNC(state: dict[str, Tensor]) -> float (or one number per --direction)")
@click.option("--trials", type=click.IntRange(min=0), required=True, help="trials to run now")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=None,
              help="optuna sampler [default: tpe, nsga2 for several directions]")
@click.option("--direction", "directions", multiple=True, type=click.Choice(["maximize", "minimize"]),
              help="per objective, repeatable [default: maximize]")
@click.option("--storage", default=None, metavar="URL",
              help="an optuna storage, e.g. sqlite:///study.db: a second call continues the study")
@click.option("--study-name", default=None, help="[default: mergelang-RECIPE]")
@click.option("--seed", type=int, default=None, help="the sampler's seed")
@click.option("--param", "params", multiple=True, metavar="NAME",
              help="tune only these params (default: every param with a range); repeatable")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: trials run in parallel on a Ray cluster (pip install 'mergelang[ray]')")
@click.option("--ray-address", default=None, metavar="ADDR")
@search_device_opt
@click.option("-o", "--output", "out", type=click.Path(), default=None,
              help="write the best merge (one objective), or the Pareto table (several)")
@click.option("--pick", type=click.IntRange(min=0), default=None,
              help="several objectives: write Pareto member K's merge to --output")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="draw the optimisation history (or the Pareto front)")
@search_force_opt
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
@set_opt
@allow_pickle_opt
@follow_opt
@_guard
def tune_cmd(recipe: str, objective: str, trials: int, sampler: str | None,
             directions: tuple[str, ...], storage: str | None, study_name: str | None,
             seed: int | None, params: tuple[str, ...], executor: str, ray_address: str | None,
             device: str, out: str | None, pick: int | None, plot_path: str | None, force: bool,
             quiet: bool, sets: tuple[str, ...], allow_pickle: bool, follow_symlinks: bool) -> None:
    """Search RECIPE's ranged params (`param x = v in [lo, hi]`) against an objective."""
    from mergelang.search.objectives import load_function

    if pick is not None and out is None:
        raise click.UsageError("--pick needs -o OUTDIR")
    if ray_address and executor != "ray":
        raise click.UsageError("--ray-address needs --executor ray")
    fn = load_function(objective, "objective")
    r = _compile(recipe, sets, allow_pickle=allow_pickle, follow_symlinks=follow_symlinks)
    if out is not None and (len(directions) <= 1 or pick is not None):
        _check_output(r, out, force)  # before the study, not after it
    try:
        res = r.tune(fn, trials, sampler=sampler, seed=seed, storage=storage,
                     directions=directions or ("maximize",), study_name=study_name,
                     params=params or None, device=device, executor=executor,
                     ray_address=ray_address, progress=not quiet and trials > 0,
                     objective_spec=objective, interruptible=True)
    finally:
        r.close()
    click.echo(summary(res))
    if res.interrupted:
        click.echo("mergelang: interrupted; the finished trials are above"
                   + (" and kept in the study storage" if storage else ""), err=True)
        sys.exit(130)
    if plot_path:
        plot(res, plot_path)
        click.echo(f"wrote {plot_path}", err=True)
    if out is not None:
        if len(res.directions) > 1 and pick is None:
            click.echo(f"wrote {write_pareto(res, Path(out))}", err=True)
        else:
            if len(res.directions) == 1 and pick is not None:
                raise click.UsageError("--pick is for several objectives (a Pareto set)")
            path = res.run(out, member=pick, force=force, device=device)
            click.echo(f"wrote the {'best' if pick is None else f'Pareto member {pick}'} merge to {path}",
                       err=True)


@click.command(name="learn")
@recipe_arg
@click.option("--loss", required=True, metavar="FILE.py:FUNC",
              help="FUNC(state: dict[str, Tensor], batch) -> scalar tensor, differentiable")
@click.option("--data", required=True, metavar="FILE.py:BATCHES",
              help="an iterable of batches, or a function returning one")
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="write the merge with the learned values")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="optimizer steps [default: one pass over the batches]")
@click.option("--lr", type=float, default=1e-2, show_default=True)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@click.option("--clamp", type=click.Choice(["project", "use"]), default="project", show_default=True,
              help="keep ranged params in range: clamp the param after each step (project) or only "
                   "where the merge uses it (use: the AdaMerging paper's code, FusionBench's clamp_weights)")
@search_device_opt
@search_force_opt
@click.option("-q", "--quiet", is_flag=True, help="no per-step log")
@set_opt
@allow_pickle_opt
@follow_opt
@_guard
def learn_cmd(recipe: str, loss: str, data: str, out: str, steps: int | None, lr: float,
              optimizer: str, clamp: str, device: str, force: bool, quiet: bool, sets: tuple[str, ...],
              allow_pickle: bool, follow_symlinks: bool) -> None:
    """Learn RECIPE's `learn` params by gradient descent on a loss, then write the merge."""
    from mergelang.search.objectives import load_function, load_value

    loss_fn = load_function(loss, "loss")
    batches = load_value(data, "data")
    r = _compile(recipe, sets, allow_pickle=allow_pickle, follow_symlinks=follow_symlinks)
    _check_output(r, out, force)  # before learning, not after it
    say = None if quiet else (lambda msg: click.echo(msg, err=True))
    try:
        res = r.learn(loss_fn, batches, steps=steps, lr=lr, optimizer=optimizer, device=device, log=say,
                      clamp=clamp)
    finally:
        r.close()
    from mergelang.commands.common import _echo_diags

    _echo_diags(res.warnings)
    for name, v in res.values.items():
        click.echo(f"{name} = {json.dumps(_rounded(v))}")
    path = res.run(out, force=force, device=device)
    click.echo(f"wrote the learned merge to {path} (loss {res.losses[0]:.6g} -> {res.losses[-1]:.6g} "
               f"in {len(res.losses)} steps)", err=True)


def _check_output(r: Any, out: str, force: bool) -> None:
    """E403 / E404 for an output folder the merge could not be written to (as `run` checks)."""
    from mergelang.errors import CodedError, to_diagnostic
    from mergelang.io.outguard import check_output

    try:
        check_output(Path(out), r.compilation.inputs, force)
    except CodedError as exc:
        r.close()
        raise MergelangError(to_diagnostic(exc)) from None


def _rounded(v: Any) -> Any:
    return [_rounded(x) for x in v] if isinstance(v, list) else round(v, 6)
