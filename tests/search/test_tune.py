"""`Recipe.tune`: optuna studies over ranged params (samplers, SQLite storage, failures,
several objectives), on tiny in-memory models with a known optimum."""

from __future__ import annotations

import sys

import pytest
import torch

import mergelang as ml
from mergelang.diagnostics import MergelangError

optuna = pytest.importorskip("optuna")


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(16, 16, generator=g), "b": torch.randn(16, generator=g)}


BASE, A, B = _sd(0), _sd(1), _sd(2)
TRUE = (0.35, 0.8)
TARGET = {k: BASE[k] + TRUE[0] * (A[k] - BASE[k]) + TRUE[1] * (B[k] - BASE[k]) for k in BASE}
SRC = ('model base = "<memory>"\nmodel a = "<memory>"\nmodel b = "<memory>"\n'
       "param w = [0.5, 0.5] in [0, 1]\n"
       'merge from base { "*" => task_arithmetic(base, [a, b], weights = w) }\n')


def closeness(state: dict[str, torch.Tensor]) -> float:
    """Independent of mergelang: minus the squared distance to the known merge."""
    return -sum(float((state[k] - TARGET[k]).pow(2).sum()) for k in TARGET)


def _recipe(src: str = SRC) -> ml.Recipe:
    return ml.compile(src, base=BASE, a=A, b=B)


@pytest.mark.parametrize("sampler", ["cmaes", "tpe"])
def test_tune_recovers_a_known_optimum(sampler: str) -> None:
    res = _recipe().tune(closeness, trials=60 if sampler == "cmaes" else 80, sampler=sampler, seed=0)
    assert res.runtime == ("w",) and res.compiles == 1
    assert len(res.trials) == len(res.complete) == (60 if sampler == "cmaes" else 80)
    w = res.best_params["w"]
    assert abs(w[0] - TRUE[0]) < 0.08 and abs(w[1] - TRUE[1]) < 0.08, w
    assert res.best_value == max(t.value for t in res.trials)
    assert all(t.seconds is not None for t in res.trials)


def test_minimize_direction_and_seed_reproducible() -> None:
    def dist(state):
        return -closeness(state)
    r1 = _recipe().tune(dist, trials=12, sampler="random", seed=5, directions="minimize")
    r2 = _recipe().tune(dist, trials=12, sampler="random", seed=5, directions="minimize")
    assert [t.params for t in r1.trials] == [t.params for t in r2.trials]
    assert r1.best_value == min(t.value for t in r1.trials)


def test_study_continues_from_sqlite(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first = _recipe().tune(closeness, trials=5, seed=1, storage=url, study_name="s")
    assert len(first.trials) == 5
    second = _recipe().tune(closeness, trials=4, seed=2, storage=url, study_name="s")
    assert [t.number for t in second.trials] == list(range(9))  # the trials accumulate
    assert second.trials[:5] == first.trials
    loaded = optuna.load_study(study_name="s", storage=url)
    assert len(loaded.trials) == 9


def test_an_objective_that_raises_is_a_failed_trial() -> None:
    calls = []

    def flaky(state):
        calls.append(1)
        if len(calls) % 3 == 0:
            raise RuntimeError("evaluation crashed")
        return closeness(state)
    res = _recipe().tune(flaky, trials=9, sampler="random", seed=0)
    failed = [t for t in res.trials if t.state == "fail"]
    assert len(failed) == 3 and len(res.complete) == 6
    assert failed[0].error == "RuntimeError: evaluation crashed" and failed[0].values is None
    assert res.best_trial.state == "complete"


@pytest.mark.parametrize("bad", ["text", (1.0, 2.0), None, {"acc": 0.3}, True])
def test_an_objective_returning_a_non_number_is_E903(bad) -> None:
    with pytest.raises(MergelangError) as ei:
        _recipe().tune(lambda state: bad, trials=3, seed=0)
    assert ei.value.diagnostics[0].code == "E903"


def test_tensor_scalars_are_numbers() -> None:
    res = _recipe().tune(lambda s: torch.tensor(closeness(s)), trials=2, seed=0)
    assert len(res.complete) == 2


def test_several_objectives_give_a_pareto_set(tmp_path) -> None:
    def two(state):  # closeness to each fine-tune: a real trade-off
        da = sum(float((state[k] - A[k]).pow(2).sum()) for k in A)
        db = sum(float((state[k] - B[k]).pow(2).sum()) for k in B)
        return da, db
    res = _recipe().tune(two, trials=20, seed=0, directions=["minimize", "minimize"])
    front = res.pareto
    assert front and all(t.state == "complete" for t in front)
    for t in front:  # no complete trial dominates a member
        assert not any(u.values[0] <= t.values[0] and u.values[1] <= t.values[1] and u.values != t.values
                       for u in res.complete)
    with pytest.raises(ValueError):
        res.best_trial
    out = res.run(tmp_path / "m0", member=0, device="cpu")
    assert (out / "mergelang_recipe.mrg").is_file()
    with pytest.raises(MergelangError):
        res.run(tmp_path / "m9", member=99)


def test_best_merge_written_as_a_normal_output(tmp_path) -> None:
    from safetensors.torch import load_file

    res = _recipe().tune(closeness, trials=6, seed=0)
    out = res.run(tmp_path / "best", device="cpu")
    got = load_file(next(out.glob("*.safetensors")))
    want = _recipe().with_params(w=res.best_params["w"]).evaluate()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert "param w = [" in (out / "mergelang_recipe.mrg").read_text()


def test_nothing_to_tune_is_E901() -> None:
    src = SRC.replace(" in [0, 1]", "")
    with pytest.raises(MergelangError) as ei:
        _recipe(src).tune(closeness, trials=2)
    assert ei.value.diagnostics[0].code == "E901"
    with pytest.raises(MergelangError) as ei:
        _recipe().tune(closeness, trials=2, params=["nope"])
    assert ei.value.diagnostics[0].code == "E901"


def test_bad_sampler_and_cmaes_with_two_objectives_are_E902() -> None:
    with pytest.raises(MergelangError) as ei:
        _recipe().tune(closeness, trials=1, sampler="grid")
    assert ei.value.diagnostics[0].code == "E902"
    with pytest.raises(MergelangError) as ei:
        _recipe().tune(lambda s: (1.0, 2.0), trials=1, sampler="cmaes", directions=["maximize", "minimize"])
    assert ei.value.diagnostics[0].code == "E902"


def test_missing_optuna_is_E904(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(MergelangError) as ei:
        _recipe().tune(closeness, trials=1)
    d = ei.value.diagnostics[0]
    assert d.code == "E904" and "mergelang[tune]" in d.help


def test_ctrl_c_keeps_the_study_usable(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    calls = []

    def interrupted(state):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return closeness(state)
    with pytest.raises(KeyboardInterrupt):
        _recipe().tune(interrupted, trials=10, seed=0, storage=url, study_name="s")
    calls.clear()
    res = _recipe().tune(interrupted, trials=10, seed=0, storage=url, study_name="s",
                         interruptible=True)
    assert res.interrupted
    states = [t.state for t in res.trials]
    assert states[:3] == ["complete"] * 3 and states[3] == "fail"  # the interrupted one
    more = _recipe().tune(closeness, trials=2, seed=0, storage=url, study_name="s")
    assert len(more.complete) == len(res.complete) + 2


def test_tune_reads_files_once(tmp_path) -> None:
    """From model folders: each input tensor is read from disk once for all trials."""
    from helpers import write_model
    from mergelang.io.checkpoint import SafetensorsSource

    for name, sd in (("base", BASE), ("a", A), ("b", B)):
        write_model(tmp_path / name, sd)
    src = SRC
    for name in ("base", "a", "b"):
        src = src.replace(f'model {name} = "<memory>"', f'model {name} = "{tmp_path / name}"')
    reads = []
    orig = SafetensorsSource.load_as

    def counting(self, name, *a, **kw):
        reads.append(name)
        return orig(self, name, *a, **kw)
    SafetensorsSource.load_as = counting
    try:
        res = ml.compile(src).tune(closeness, trials=5, seed=0)
    finally:
        SafetensorsSource.load_as = orig
    assert len(res.complete) == 5
    assert len(reads) == 6  # 2 tensors x 3 models, once


def test_ray_executor_without_ray_is_E801(tmp_path, monkeypatch) -> None:
    from helpers import write_model

    for name, sd in (("base", BASE), ("a", A), ("b", B)):
        write_model(tmp_path / name, sd)
    src = SRC
    for name in ("base", "a", "b"):
        src = src.replace(f'model {name} = "<memory>"', f'model {name} = "{tmp_path / name}"')
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MergelangError) as ei:
        ml.compile(src).tune(closeness, trials=2, executor="ray")
    assert ei.value.diagnostics[0].code == "E801" and "mergelang[ray]" in ei.value.diagnostics[0].help


def test_numpy_scalars_are_numbers() -> None:
    import numpy as np

    res = _recipe().tune(lambda s: np.float32(closeness(s)), trials=2, seed=0)
    assert len(res.complete) == 2
