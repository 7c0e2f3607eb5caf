"""The entry points behind `Recipe.tune` and `Recipe.learn` (and the CLI's tune / learn)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from mergelang.diagnostics import MergelangError, error
from mergelang.search.study import TuneResult, check_search_range, open_study, records, tune, value_shape
from mergelang.search.trials import Compile, TrialRunner

if TYPE_CHECKING:
    from mergelang.compiler import Compilation


def tuned_names(c: "Compilation", params: Sequence[str] | None) -> tuple[str, ...]:
    """The params a study searches: `params`, else every param declared with a range."""
    if params is None:
        names = tuple(c.ranges)
        if not names:
            raise MergelangError(error("E901", "nothing to tune: no param declares a range", None,
                                       "declare one, e.g. param lam = 0.3 in [0.0, 1.0]"))
        return names
    names = tuple(params)
    for n in names:
        if n not in c.params:
            raise MergelangError(error("E901", f"cannot tune `{n}`: the recipe declares no param "
                                       f"`{n}`", None, f"params: {', '.join(c.params) or 'none'}"))
        if n not in c.ranges:
            raise MergelangError(error("E901", f"cannot tune `{n}`: it has no range", None,
                                       f"declare one: param {n} = ... in [lo, hi]"))
    return names


def tune_recipe(c: "Compilation", compile_: Compile, write: Callable[..., Any],
                objective: Callable[..., Any], trials: int, *, sampler: str | None = None,
                seed: int | None = None, storage: str | None = None,
                directions: str | Sequence[str] = "maximize", study_name: str | None = None,
                params: Sequence[str] | None = None, device: str = "cpu",
                executor: str = "local", ray_address: str | None = None,
                progress: bool = False, timeout: float | None = None,
                objective_spec: str | None = None, interruptible: bool = False,
                spec: Any = None) -> TuneResult:
    """`Recipe.tune`. With `interruptible`, Ctrl-C ends the search and returns what was found
    (result.interrupted is True); otherwise KeyboardInterrupt propagates. Either way the
    interrupted trial is marked failed and a stored study stays usable."""
    dirs = (directions,) if isinstance(directions, str) else tuple(directions)
    names = tuned_names(c, params)
    shapes = {n: value_shape(c.params[n]) for n in names}
    ranges = {n: c.ranges[n] for n in names}
    for n, rng in ranges.items():
        check_search_range(n, rng)
    if executor not in ("local", "ray"):
        raise MergelangError(error("E902", f"executor must be local or ray, not {executor!r}"))
    if storage is not None:  # the Python API's calls too: never a foreign database or an input
        from mergelang.errors import CodedError, to_diagnostic
        from mergelang.io.outguard import check_storage

        try:
            check_storage(storage, c.inputs)
        except CodedError as exc:
            raise MergelangError(to_diagnostic(exc)) from None
    study = open_study(dirs, sampler, seed, storage, study_name or _default_name(c))
    interrupted = False
    runtime: tuple[str, ...] = ()
    static: tuple[str, ...] = ()
    compiles = 0
    try:
        if executor == "ray":
            from mergelang.search.ray_trials import tune_on_ray

            runtime, static, compiles = tune_on_ray(spec, compile_, names, shapes, ranges,
                                                    objective, objective_spec, trials, study,
                                                    device, ray_address, progress)
        else:
            runner = TrialRunner(compile_, names, device)
            runtime, static = runner.runtime, runner.static
            try:
                tune(runner, objective, shapes, ranges, trials, study, progress, timeout)
            finally:
                runner.close()
                compiles = runner.compiles
    except KeyboardInterrupt:
        if not interruptible:
            raise
        interrupted = True
    return TuneResult(study, dirs, names, records(study, shapes), runtime, static, compiles,
                      interrupted, write)


def _default_name(c: "Compilation") -> str:
    path = str(c.source.path)
    stem = path.rsplit("/", 1)[-1].removesuffix(".mrg") or "recipe"
    return f"mergelang-{stem}"
