"""`tune`: search a recipe's ranged params against an objective with an optuna study.

The study is a real optuna study (TPE, CMA-ES, random or NSGA-II samplers; in memory or in an
SQLite file that a second call continues). Each trial samples every tuned param within its
declared range (`param x = v in [lo, hi] [log]`; a list param: one value per element, named
`x[0]`, `x[1]`, ...), runs the compiled merge in memory (search/trials.py: compile once, run
many) and calls `objective(state)`. An objective that raises is a failed trial (its error is kept
in the trial's user attributes), not a crash; one that returns something other than a number
(or one per direction) stops the study with E903.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from mergelang.diagnostics import MergelangError, error
from mergelang.lang.values import ListV, Value

if TYPE_CHECKING:
    import optuna

    from mergelang.lang.ranges import ParamRange
    from mergelang.search.trials import TrialRunner

SAMPLERS = ("tpe", "cmaes", "random", "nsga2")
DIRECTIONS = ("maximize", "minimize")


def need_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise MergelangError(error("E904", "tune needs optuna, which is not installed", None,
                                   "pip install 'mergelang[tune]'")) from None
    # trials: a progress bar and a summary table (failed trials: TrialRecord.error), not a log
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


class ObjectiveFailed(Exception):
    """The objective raised: the trial is recorded as failed and the study goes on."""


#: the start of a failed trial's error when its objective tried to end the process
EXITED = "SystemExit"


def objective_error(exc: BaseException) -> str:
    """A failed trial's error text (`TrialRecord.error`)."""
    if isinstance(exc, SystemExit):
        return f"{EXITED}: the objective called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


def check_search_range(name: str, rng: "ParamRange") -> None:
    """E406 for a range a sampler cannot draw from (its width is not a finite float)."""
    if not rng.log and not math.isfinite(float(rng.hi) - float(rng.lo)):
        raise MergelangError(error("E406", f"param `{name}`: the range {rng.render()} is too wide to "
                                   "search (hi - lo is not a finite number)", None,
                                   "narrow it, or declare it `log` over positive bounds"))


@dataclass(frozen=True)
class TrialRecord:
    number: int
    params: dict[str, Any]
    values: tuple[float, ...] | None   # None: the trial failed (or was interrupted)
    state: str                         # "complete" | "fail" | "running" | ...
    seconds: float | None
    error: str | None = None

    @property
    def value(self) -> float | None:
        return self.values[0] if self.values else None


@dataclass
class TuneResult:
    """What a tune call found. `trials` holds every trial of the study (a continued study:
    the earlier calls' too)."""

    study: "optuna.Study"
    directions: tuple[str, ...]
    names: tuple[str, ...]
    trials: list[TrialRecord]
    runtime: tuple[str, ...] = ()      # params fed at run time (one compilation)
    static: tuple[str, ...] = ()       # params the compiler needs (trials recompile)
    compiles: int = 0
    interrupted: bool = False          # Ctrl-C ended the search (interruptible calls only)
    _write: Callable[[dict[str, Any], Any], Any] | None = field(default=None, repr=False)

    @property
    def complete(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.state == "complete"]

    @property
    def best_trial(self) -> TrialRecord | None:
        """The best complete trial (one objective); None before any trial completed."""
        if len(self.directions) != 1:
            raise ValueError("best_trial is for one objective; with several, see .pareto")
        done = self.complete
        if not done:
            return None
        sign = 1 if self.directions[0] == "maximize" else -1
        return max(done, key=lambda t: (sign * t.values[0], -t.number))  # type: ignore[index]

    @property
    def best_params(self) -> dict[str, Any] | None:
        t = self.best_trial
        return None if t is None else t.params

    @property
    def best_value(self) -> float | None:
        t = self.best_trial
        return None if t is None else t.value

    @property
    def pareto(self) -> list[TrialRecord]:
        """The complete trials no other trial dominates, by trial number."""
        best = {t.number for t in self.study.best_trials}
        return [t for t in self.trials if t.number in best]

    def run(self, out_dir: Any, member: int | None = None, **kw: Any) -> Any:
        """Write a merge as a normal output folder: the best trial's (one objective) or Pareto
        member `member` (several); keyword arguments go to `Recipe.run`."""
        if len(self.directions) == 1:
            t = self.best_trial
            if t is None:
                raise MergelangError(error("E903", "no trial completed, so there is no best merge "
                                           "to write", None, "see the failed trials' errors"))
        else:
            front = self.pareto
            if member is None or not 0 <= member < len(front):
                raise MergelangError(error("E903", f"pick a member of the Pareto set (0..{len(front) - 1})"
                                           if front else "the Pareto set is empty", None,
                                           "--pick K / run(out_dir, member=K)"))
            t = front[member]
        assert self._write is not None
        label = f"tune: trial {t.number} of study {self.study.study_name!r}"
        kw.setdefault("origins", {n: label for n in t.params})
        return self._write(t.params, out_dir, **kw)


# ---------------------------------------------------------------- the search space
def value_shape(v: Value) -> Any:
    """() for a number, else a nested tuple of element shapes."""
    if isinstance(v, ListV):
        return tuple(value_shape(i) for i in v.items)
    return ()


def suggest(trial: "optuna.Trial", name: str, shape: Any, rng: "ParamRange") -> Any:
    if shape == ():
        if rng.integer:
            return trial.suggest_int(name, int(rng.lo), int(rng.hi), log=rng.log)
        return trial.suggest_float(name, rng.lo, rng.hi, log=rng.log)
    return [suggest(trial, f"{name}[{i}]", s, rng) for i, s in enumerate(shape)]


def _rebuild(params: Mapping[str, Any], name: str, shape: Any) -> Any:
    if shape == ():
        return params[name]
    return [_rebuild(params, f"{name}[{i}]", s) for i, s in enumerate(shape)]


def check_value(v: Any, n: int) -> tuple[float, ...]:
    vals = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    ok = len(vals) == n and all(isinstance(x, numbers.Real) and not isinstance(x, bool) or
                                _is_scalar_tensor(x) for x in vals)
    if ok:
        try:
            return tuple(float(x) for x in vals)
        except (OverflowError, ValueError, TypeError, RuntimeError):  # e.g. 10**400
            pass
    what = (type(v).__name__ if not isinstance(v, (tuple, list)) else f"{len(vals)} values") \
        if not ok else "a number too large for a float"
    raise MergelangError(error("E903", f"the objective returned {what}; it must return "
                               + ("a number" if n == 1 else f"{n} numbers (one per --direction)"),
                               None, "return a float (e.g. accuracy), or a tuple with one "
                               "number per direction"))


def _is_scalar_tensor(x: Any) -> bool:
    return hasattr(x, "numel") and hasattr(x, "item") and x.numel() == 1


def make_sampler(name: str, seed: int | None, objectives: int) -> Any:
    optuna = need_optuna()
    s = optuna.samplers
    if name == "tpe":
        return s.TPESampler(seed=seed)
    if name == "random":
        return s.RandomSampler(seed=seed)
    if name == "nsga2":
        return s.NSGAIISampler(seed=seed)
    if name == "cmaes":
        if objectives > 1:
            raise MergelangError(error("E902", "the cmaes sampler optimises one objective", None,
                                       "use --sampler nsga2 (or tpe) for several directions"))
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise MergelangError(error("E904", "--sampler cmaes needs the cmaes package", None,
                                       "pip install 'mergelang[tune]'")) from None
        return s.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise MergelangError(error("E902", f"unknown sampler {name!r}", None,
                               f"samplers: {', '.join(SAMPLERS)}"))


def open_study(directions: Sequence[str], sampler: str | None, seed: int | None,
               storage: str | None, study_name: str | None) -> "optuna.Study":
    optuna = need_optuna()
    dirs = tuple(directions)
    bad = [d for d in dirs if d not in DIRECTIONS]
    if not dirs or bad:
        raise MergelangError(error("E902", f"unknown direction {bad[0]!r}" if bad else
                                   "no direction given", None, "maximize or minimize"))
    chosen = sampler or ("tpe" if len(dirs) == 1 else "nsga2")
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, directions=list(dirs),
                                    sampler=make_sampler(chosen, seed, len(dirs)),
                                    load_if_exists=storage is not None)
    except ValueError as exc:  # e.g. a stored study with other directions
        raise MergelangError(error("E902", f"cannot open the study: {exc}", None,
                                   "use another --study-name, or the directions it was made with")) from None
    except ImportError as exc:  # a server URL whose database driver is not installed
        raise MergelangError(error("E904", f"the study storage {storage!r} needs a database driver "
                                   f"that is not installed ({exc})", None,
                                   "install the driver (e.g. psycopg2 for postgresql://), or use "
                                   "--storage sqlite:///study.db")) from None
    except Exception as exc:  # storage URLs: sqlalchemy errors
        if type(exc).__module__.startswith(("sqlalchemy", "optuna")):
            raise MergelangError(error("E902", f"cannot open the study storage {storage!r}: {exc}",
                                       None, "e.g. --storage sqlite:///study.db")) from None
        raise
    stored = tuple(d.name.lower() for d in study.directions)
    if stored != dirs:  # optuna loads a stored study whatever directions are asked for
        raise MergelangError(error("E902", f"the stored study {study.study_name!r} was made with "
                                   f"direction {', '.join(stored)}, not {', '.join(dirs)}", None,
                                   "give the directions it was made with, or another --study-name"))
    return study


def records(study: "optuna.Study", shapes: Mapping[str, Any]) -> list[TrialRecord]:
    out = []
    for t in study.trials:
        secs = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        params = {n: _rebuild(t.params, n, s) for n, s in shapes.items()
                  if all(k in t.params for k in _keys(n, s))}
        out.append(TrialRecord(t.number, params, tuple(t.values) if t.values else None,
                               t.state.name.lower(), secs, t.user_attrs.get("error")))
    return out


def _keys(name: str, shape: Any) -> list[str]:
    if shape == ():
        return [name]
    return [k for i, s in enumerate(shape) for k in _keys(f"{name}[{i}]", s)]


def tune(runner: "TrialRunner", objective: Callable[..., Any], shapes: Mapping[str, Any],
         ranges: Mapping[str, "ParamRange"], trials: int, study: "optuna.Study",
         progress: bool = False, timeout: float | None = None) -> None:
    """Run `trials` more trials of `study` in this process."""
    n_obj = len(study.directions)

    def one(trial: "optuna.Trial") -> Any:
        try:
            values = {n: suggest(trial, n, shapes[n], ranges[n]) for n in shapes}
        except ValueError as exc:  # a stored study that searched these names differently
            raise MergelangError(error("E902", f"cannot continue the stored study: {exc}", None,
                                       "the recipe's params changed since: use another "
                                       "--study-name")) from None
        t0 = time.perf_counter()
        state = runner.run(values)
        trial.set_user_attr("merge_seconds", time.perf_counter() - t0)
        try:
            got = objective(state)
        except (KeyboardInterrupt, MergelangError):
            raise
        except BaseException as exc:  # noqa: BLE001 - sys.exit too: a failed trial, not the end
            why = objective_error(exc)
            trial.set_user_attr("error", why)
            raise ObjectiveFailed(why) from None
        vals = check_value(got, n_obj)
        if any(math.isnan(v) for v in vals):
            trial.set_user_attr("error", "the objective returned NaN")
        return vals[0] if n_obj == 1 else vals

    if trials > 0:
        study.optimize(one, n_trials=trials, catch=(ObjectiveFailed,), show_progress_bar=progress,
                       timeout=timeout)
