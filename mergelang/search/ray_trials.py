"""`tune --executor ray`: trials in parallel on a Ray cluster.

One actor per CPU of each node (as a Ray run: distributed/ray_driver.py) compiles the recipe
once, with the searched params as run-time inputs, holds its inputs in memory after its first
trial and runs many trials (search/trials.py). The objective travels to the workers: a
`FILE.py:FUNC` objective (the CLI) as the file's text, executed there as if imported from the
same path (its neighbours importable where the filesystem is shared); a Python callable by
Ray's pickling (cloudpickle: a function of `__main__` or of a module the workers can import).
The driver keeps the optuna study: it asks for a trial whenever a worker is free, sends the
sampled values and tells the study each result, so every sampler works as in a local study
(TPE and CMA-ES see the results in completion order; NSGA-II by generation).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from mergelang.diagnostics import MergelangError, error
from mergelang.io.textfile import read_text
from mergelang.lang.loader import MAX_RECIPE_BYTES
from mergelang.distributed.ray_worker import failure_text, node_name

if TYPE_CHECKING:
    import optuna

    from mergelang.distributed.ray_worker import RecipeSpec
    from mergelang.lang.ranges import ParamRange


class TrialWorker:
    """The actor's class (wrapped with `ray.remote` by the driver)."""

    def __init__(self, spec: "RecipeSpec", names: tuple[str, ...], runtime: tuple[str, ...],
                 device: str, objective: tuple[str, Any], objectives: int):
        import torch

        from mergelang.compiler import compile_recipe
        from mergelang.search.trials import TrialRunner

        torch.set_num_threads(1)
        self.error: str | None = None
        self.objectives = objectives

        def compile_(rt: tuple[str, ...], fixed: Mapping[str, Any]) -> Any:
            return compile_recipe(spec.source, spec.base_dir, {**spec.overrides, **fixed},
                                  spec.options, allow_pickle=spec.allow_pickle,
                                  follow_symlinks=spec.follow_symlinks, runtime=rt,
                                  allow_plugins=spec.allow_plugins)
        try:
            if objective[0] == "source":
                from mergelang.search.objectives import module_attribute, module_from_source

                _, text, path, name = objective
                self.objective = module_attribute(module_from_source(text, Path(path)), name, path, "objective")
            else:
                self.objective = objective[1]
            self.runner = TrialRunner(compile_, names, device, runtime=runtime)
            if not self.runner.static:  # compile now (static params: at their first value)
                self.runner.compilation({})
        except Exception as e:  # noqa: BLE001 - reported to the driver, named by node
            self.error = failure_text(e)

    def ready(self) -> tuple[str, str | None]:
        return node_name(), self.error

    def trial(self, values: dict[str, Any]) -> tuple[str, Any, float]:
        """("ok", values, merge seconds) | ("fail", error) | ("bad", E903 message)."""
        from mergelang.search.study import check_value, objective_error

        t0 = time.perf_counter()
        try:
            state = self.runner.run(values)
        except MergelangError as e:
            return "bad", e.diagnostics[0].message, 0.0
        secs = time.perf_counter() - t0
        try:
            got = self.objective(state)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - a failed trial (sys.exit too: not the actor's end)
            return "fail", objective_error(e), secs
        try:
            return "ok", check_value(got, self.objectives), secs
        except MergelangError as e:
            return "bad", e.diagnostics[0].message, secs


def _ship(objective: Callable[..., Any], objective_spec: str | None) -> tuple[str, Any]:
    if objective_spec:
        path_text, _, name = objective_spec.rpartition(":")
        path = Path(path_text).resolve()
        return ("source", read_text(path, MAX_RECIPE_BYTES), str(path), name)
    return ("callable", objective)


def tune_on_ray(spec: "RecipeSpec | None", compile_: Callable[..., Any], names: tuple[str, ...],
                shapes: Mapping[str, Any], ranges: Mapping[str, "ParamRange"],
                objective: Callable[..., Any], objective_spec: str | None, trials: int,
                study: "optuna.Study", device: str, address: str | None,
                progress: bool) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """Run `trials` trials of `study` on Ray; (run-time params, static params, compilations)."""
    from optuna.trial import TrialState

    from mergelang.distributed.ray_driver import await_ready, connect, cpu_slots, import_ray, stop
    from mergelang.search.study import suggest
    from mergelang.search.trials import split_runtime

    if spec is None:
        raise MergelangError(error("E802", "this recipe cannot be tuned on Ray: its models are held "
                                   "in memory (state dicts), which workers cannot read", None,
                                   "give the models as paths on a filesystem the workers share"))
    ray = import_ray()
    runtime, static = split_runtime(compile_, names)
    connect(ray, address)
    cls = ray.remote(max_restarts=2, max_task_retries=2)(TrialWorker)
    opts = cpu_slots(ray)[:max(1, trials)]
    n_obj = len(study.directions)
    blob = _ship(objective, objective_spec)
    actors = [cls.options(**o).remote(spec, names, runtime, device, blob, n_obj) for o in opts]
    await_ready(ray, actors, "every worker must see the recipe, the models and the objective "
                "file at the driver's paths")
    pending: dict[Any, tuple[Any, Any]] = {}
    try:
        from tqdm import tqdm

        bar = tqdm(total=trials, disable=not progress, desc="trials", unit="trial")
        idle, asked, done = list(actors), 0, 0
        while done < trials:
            while idle and asked < trials:
                t = study.ask()
                values = {n: suggest(t, n, shapes[n], ranges[n]) for n in shapes}
                a = idle.pop()
                pending[a.trial.remote(values)] = (t, a)
                asked += 1
            finished, _ = ray.wait(list(pending), num_returns=1)
            for ref in finished:
                t, a = pending.pop(ref)
                idle.append(a)
                try:
                    status, payload, secs = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the worker died (after Ray's retries)
                    status, payload, secs = "fail", f"the Ray worker failed: {type(e).__name__}: {e}", 0.0
                t.set_user_attr("merge_seconds", secs)
                if status == "ok":
                    study.tell(t, payload[0] if n_obj == 1 else list(payload))
                elif status == "fail":
                    t.set_user_attr("error", payload)
                    study.tell(t, state=TrialState.FAIL)
                else:
                    study.tell(t, state=TrialState.FAIL)
                    raise MergelangError(error("E903", payload, None, "return a float (e.g. "
                                               "accuracy), or a tuple with one number per direction"))
                done += 1
                bar.update()
        bar.close()
    except BaseException:
        for t, _ in pending.values():  # Ctrl-C, an error: the study stays consistent
            study.tell(t, state=TrialState.FAIL)
        raise
    finally:
        stop(ray, actors)
    return runtime, static, len(actors)
