"""`mergelang tune` and `mergelang learn`: the CLI of search/ (studies, learned coefficients)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from mergelang.commands.data import (builtin_objective, is_builtin, lm_eval_include_opt, limit_opt,
                                     num_fewshot_opt)
from mergelang.commands.common import (compile_from_cli, cli_guard, allow_pickle_opt, follow_opt, recipe_arg,
                                       search_device_opt, search_force_opt, set_opt)
from mergelang.diagnostics import MergelangError, error
from mergelang.io import interrupt

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


def write_pareto(res: Any, out: Path, inputs: Any = (), force: bool = False) -> Path:
    """OUT/pareto.csv and pareto.json (and the output manifest): the Pareto set's table, in a
    folder the output guard allows (io/outguard.py: not an input; absent, empty, or with
    `force` an earlier mergelang output), written beside it and renamed into place."""
    import csv
    import io
    import os
    import secrets
    import shutil

    from mergelang.errors import CodedError, to_diagnostic
    from mergelang.io.outguard import MANIFEST_NAME, check_output, manifest_text

    out = Path(os.path.abspath(out))
    front = res.pareto
    keys = list(front[0].params) if front else []
    table = io.StringIO(newline="")
    w = csv.writer(table)
    w.writerow(["member", "trial", *[f"value_{i}" for i in range(len(res.directions))], *keys])
    for k, t in enumerate(front):
        w.writerow([k, t.number, *t.values, *[json.dumps(t.params[p]) for p in keys]])
    files = {"pareto.csv": table.getvalue(),
             "pareto.json": json.dumps(
                 {"directions": list(res.directions),
                  "members": [{"member": k, "trial": t.number, "values": list(t.values),
                               "params": t.params} for k, t in enumerate(front)]}, indent=2) + "\n"}
    files[MANIFEST_NAME] = manifest_text(files)
    tmp = out.with_name(f".{out.name}.mergelang-tmp-{secrets.token_hex(4)}")
    made = False
    try:
        check_output(out, inputs, force)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        made = True
        for name, text in files.items():
            (tmp / name).write_text(text, newline="")
        interrupt.check()  # io/interrupt: a Ctrl-C whose exception was lost
        if out.exists():  # an empty folder, or (--force) the earlier table: moved aside first
            aside = out.with_name(f".{out.name}.mergelang-old-{secrets.token_hex(4)}")
            os.rename(out, aside)
            os.replace(tmp, out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except CodedError as exc:
        raise MergelangError(to_diagnostic(exc)) from None
    except OSError as exc:
        raise MergelangError(error("E502", f"cannot write {out}: {exc.strerror or exc}")) from None
    finally:
        if made:
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "pareto.csv"


#: the image formats --plot writes (matplotlib's, by the file's extension)
PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def check_plot(path: str, inputs: Any, force: bool, objectives: int = 1) -> None:
    """--plot's file, checked before the study (not after it): a known image extension (E902)
    and the output guard's rules for a single file (E404 / E403 / E502)."""
    from mergelang.commands.common import check_output_file

    check_output_file(path, inputs, force, "--plot")
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in PLOT_FORMATS:
        raise MergelangError(error("E902", f"--plot {path}: {'.' + ext if ext else 'no extension'} "
                                   "is not an image format mergelang draws", None,
                                   f"use one of: {', '.join('.' + e for e in PLOT_FORMATS)}"))
    if objectives > 3:
        raise MergelangError(error("E902", "--plot draws one objective's history or a Pareto "
                                   "front of 2 or 3 objectives"))


def check_storage(storage: str, inputs: Any) -> None:
    from mergelang.errors import CodedError, to_diagnostic
    from mergelang.io.outguard import check_storage as guard

    try:
        guard(storage, inputs)
    except CodedError as exc:
        raise MergelangError(to_diagnostic(exc)) from None


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
    from mergelang.io.outguard import replace_file

    replace_file(Path(path).absolute(), lambda tmp: fig.savefig(tmp, dpi=100), "--plot")


@click.command(name="tune")
@recipe_arg
@click.option("--objective", required=True, metavar="FILE.py:FUNC",
              help="FUNC(state: dict[str, Tensor]) -> float (or one number per --direction); "
                   "or perplexity:DATA (minimized), lm-eval:TASK[,TASK...] (maximized)")
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
@lm_eval_include_opt
@limit_opt
@num_fewshot_opt
@set_opt
@allow_pickle_opt
@follow_opt
@cli_guard
def tune_cmd(recipe: str, objective: str, trials: int, sampler: str | None,
             directions: tuple[str, ...], storage: str | None, study_name: str | None,
             seed: int | None, params: tuple[str, ...], executor: str, ray_address: str | None,
             device: str, out: str | None, pick: int | None, plot_path: str | None, force: bool,
             quiet: bool, lm_eval_include: str | None, limit: int | None,
             num_fewshot: int | None, sets: tuple[str, ...], allow_pickle: bool,
             follow_symlinks: bool) -> None:
    """Search RECIPE's ranged params (`param x = v in [lo, hi]`) against an objective."""
    from mergelang.search.objectives import load_function

    if pick is not None and out is None:
        raise click.UsageError("--pick needs -o OUTDIR")
    if ray_address and executor != "ray":
        raise click.UsageError("--ray-address needs --executor ray")
    builtin = is_builtin(objective)
    if not builtin and (lm_eval_include or limit or num_fewshot is not None):
        raise click.UsageError("--lm-eval-include, --limit and --num-fewshot are for --objective "
                               "perplexity:DATA / lm-eval:TASKS")
    fn = None if builtin else load_function(objective, "objective")
    r = compile_from_cli(recipe, sets, allow_pickle=allow_pickle, follow_symlinks=follow_symlinks)
    if builtin:
        try:
            fn, directions = builtin_objective(objective, r, directions, executor, lm_eval_include, limit,
                                               num_fewshot)
        except BaseException:
            r.close()
            raise
    # the objective's own file (FILE.py:NAME) or data (perplexity:DATA) is an input too
    objective_inputs = ([Path(objective.partition(":")[2])] if objective.startswith("perplexity:")
                        else [] if builtin else _objective_file(objective))
    try:  # every path tune writes, checked before the study (not after it)
        inputs = [*r.compilation.inputs, *objective_inputs]
        if storage is not None:
            check_storage(storage, inputs)
        if plot_path is not None:
            check_plot(plot_path, inputs, force, len(directions))
        if out is not None:
            _not_inside_output(out, {"--plot": plot_path, "--storage": storage})
    except MergelangError:
        r.close()
        raise
    if out is not None:
        _check_output(r, out, force, objective_inputs)
    try:
        res = r.tune(fn, trials, sampler=sampler, seed=seed, storage=storage,
                     directions=directions or ("maximize",), study_name=study_name,
                     params=params or None, device=device, executor=executor,
                     ray_address=ray_address, progress=not quiet and trials > 0,
                     objective_spec=None if builtin else objective, interruptible=True)
    finally:
        r.close()
    click.echo(summary(res))
    _warn_exits(res)
    if res.interrupted:
        click.echo("mergelang: interrupted; the finished trials are above"
                   + (" and kept in the study storage" if storage else ""), err=True)
        sys.exit(130)
    if plot_path:
        plot(res, plot_path)
        click.echo(f"wrote {plot_path}", err=True)
    if out is not None:
        if len(res.directions) > 1 and pick is None:
            click.echo(f"wrote {write_pareto(res, Path(out), inputs, force)}", err=True)
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
@cli_guard
def learn_cmd(recipe: str, loss: str, data: str, out: str, steps: int | None, lr: float,
              optimizer: str, clamp: str, device: str, force: bool, quiet: bool, sets: tuple[str, ...],
              allow_pickle: bool, follow_symlinks: bool) -> None:
    """Learn RECIPE's `learn` params by gradient descent on a loss, then write the merge."""
    from mergelang.search.objectives import load_function, load_value

    loss_fn = load_function(loss, "loss")
    batches = load_value(data, "data")
    r = compile_from_cli(recipe, sets, allow_pickle=allow_pickle, follow_symlinks=follow_symlinks)
    _check_output(r, out, force, [*_objective_file(loss), *_objective_file(data)])  # before learning
    say = None if quiet else (lambda msg: click.echo(msg, err=True))
    try:
        res = r.learn(loss_fn, batches, steps=steps, lr=lr, optimizer=optimizer, device=device, log=say,
                      clamp=clamp)
    finally:
        r.close()
    from mergelang.commands.common import echo_diags

    echo_diags(res.warnings)
    for name, v in res.values.items():
        click.echo(f"{name} = {json.dumps(_rounded(v))}")
    path = res.run(out, force=force, device=device)
    click.echo(f"wrote the learned merge to {path} (loss {res.losses[0]:.6g} -> {res.losses[-1]:.6g} "
               f"in {len(res.losses)} steps)", err=True)


def _warn_exits(res: Any) -> None:
    """W110 when objectives tried to end the process (sys.exit): those trials failed."""
    from mergelang.commands.common import echo_diags
    from mergelang.diagnostics import warning
    from mergelang.search.study import EXITED

    exited = [t.number for t in res.trials if t.state == "fail" and (t.error or "").startswith(EXITED)]
    if exited:
        echo_diags([warning("W110", f"the objective called sys.exit in {len(exited)} trial"
                             f"{'s' if len(exited) != 1 else ''} (first: trial {exited[0]}): "
                             "they are marked failed and the study went on", None,
                             "return a value (or raise an exception) instead of exiting")])


def _not_inside_output(out: str, paths: dict[str, str | None]) -> None:
    """E403 for a --plot / --storage file that is, or lies inside, the -o folder: that folder
    is replaced as a whole, so the file would be lost (or make the folder foreign)."""
    import os

    from mergelang.io.outguard import storage_path

    o = Path(os.path.abspath(out))
    for opt, value in paths.items():
        if value is None:
            continue
        p = storage_path(value) if opt == "--storage" else Path(os.path.abspath(value))
        if p is not None and (p == o or o in p.parents):
            raise MergelangError(error("E403", f"{opt} {value} lies inside the -o folder {out}, "
                                       "which the merge replaces as a whole", None,
                                       f"put the {opt[2:]} file elsewhere"))


def _objective_file(spec: str) -> list[Path]:
    """The Python file of a `FILE.py:NAME` spec (an input: never written over)."""
    path = spec.rpartition(":")[0]
    return [Path(path)] if path else []


def _check_output(r: Any, out: str, force: bool, more: Any = ()) -> None:
    """E403 / E404 for an output folder the merge could not be written to (as `run` checks)."""
    from mergelang.errors import CodedError, to_diagnostic
    from mergelang.io.outguard import check_output

    try:
        check_output(Path(out), [*r.compilation.inputs, *more], force)
    except CodedError as exc:
        r.close()
        raise MergelangError(to_diagnostic(exc)) from None


def _rounded(v: Any) -> Any:
    return [_rounded(x) for x in v] if isinstance(v, list) else round(v, 6)
