"""`tune --executor ray` on a local two-node cluster bound to 127.0.0.1: workers compile once and
run many trials, the objective file is shipped to them, failures are recorded, and the study is
the same kind of study a local run makes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when ray is imported: before it
ray = pytest.importorskip("ray")
pytest.importorskip("optuna")

import mergelang as ml  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from helpers import TARGET_OBJECTIVE, local_ray_cluster, make_sd, write_model  # noqa: E402
from mergelang.cli import main  # noqa: E402
from mergelang.diagnostics import MergelangError  # noqa: E402

SHAPES = {"w": (16, 16), "b": (16,)}
OBJECTIVE = TARGET_OBJECTIVE + '''
def worker_pid(state):
    if state["w"].sum() > 1e9:
        raise AssertionError
    return float(os.getpid())

def exits(state):
    import sys
    sys.exit(0)

def flaky(state):
    if state["b"][0] > target["b"][0]:
        raise ValueError("too far")
    return score(state)
'''


@pytest.fixture(scope="module")
def cluster():
    yield from local_ray_cluster()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tune_ray")
    for i, name in enumerate(("base", "a", "b")):
        write_model(root / name, make_sd(i, SHAPES), {"model_type": "test"})
    (root / "r.mrg").write_text('model base = "base"\nmodel a = "a"\nmodel b = "b"\n'
                                "param w = [0.5, 0.5] in [0, 1]\n"
                                'merge from base { "*" => task_arithmetic(base, [a, b], weights = w) }\n')
    (root / "obj.py").write_text(OBJECTIVE)
    return root


def test_cli_tune_on_ray(cluster, project: Path, monkeypatch) -> None:
    monkeypatch.chdir(project)
    res = CliRunner().invoke(main, ["tune", "r.mrg", "--objective", "obj.py:score", "--trials", "24",
                                    "--sampler", "cmaes", "--seed", "0", "--executor", "ray",
                                    "--ray-address", cluster.address, "-o", "best", "-q"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "study: 24 trials (24 complete, 0 failed)" in res.output
    assert "run-time inputs: w; 2 compilations" in res.output  # one per worker
    assert (project / "best" / "mergelang_recipe.mrg").is_file()


def test_trials_run_on_several_workers(cluster, project: Path, monkeypatch) -> None:
    monkeypatch.chdir(project)
    from mergelang.search.objectives import load_function

    r = ml.compile(project / "r.mrg")
    res = r.tune(load_function("obj.py:worker_pid"), trials=8, sampler="random", seed=0,
                 executor="ray", ray_address=cluster.address, objective_spec="obj.py:worker_pid")
    pids = {t.value for t in res.complete}
    assert len(res.complete) == 8 and len(pids) == 2 and os.getpid() not in pids


def test_failures_are_recorded(cluster, project: Path, monkeypatch) -> None:
    monkeypatch.chdir(project)
    from mergelang.search.objectives import load_function

    res = ml.compile(project / "r.mrg").tune(load_function("obj.py:flaky"), trials=12, sampler="random",
                                            seed=1, executor="ray", ray_address=cluster.address,
                                            objective_spec="obj.py:flaky")
    failed = [t for t in res.trials if t.state == "fail"]
    assert failed and all(t.error == "ValueError: too far" for t in failed)
    assert len(res.complete) + len(failed) == 12


def test_in_memory_models_are_refused(cluster) -> None:
    sd = make_sd(0, SHAPES)
    r = ml.compile('model base = "<memory>"\nparam lam = 0.5 in [0, 1]\n'
                   'merge from base { "*" => base * lam }\n', base=sd)
    with pytest.raises(MergelangError) as ei:
        r.tune(lambda s: 1.0, trials=2, executor="ray", ray_address=cluster.address)
    assert ei.value.diagnostics[0].code == "E802"


def test_an_objective_that_exits_fails_its_trial_on_the_worker(cluster, project: Path, monkeypatch) -> None:
    """sys.exit in an objective on a Ray worker is a failed trial (issue 27), as it is locally:
    the worker lives on and the next trials run there."""
    monkeypatch.chdir(project)
    from mergelang.search.objectives import load_function

    res = ml.compile(project / "r.mrg").tune(load_function("obj.py:exits"), trials=4, sampler="random",
                                             seed=0, executor="ray", ray_address=cluster.address,
                                             objective_spec="obj.py:exits")
    assert [t.state for t in res.trials] == ["fail"] * 4
    assert all("sys.exit(0)" in (t.error or "") for t in res.trials)
