"""`mergelang tune` and `mergelang learn` from the command line, on tiny model folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from helpers import TARGET_OBJECTIVE, write_model
from mergelang.cli import main

pytest.importorskip("optuna")


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(8, 8, generator=g), "b": torch.randn(8, generator=g)}


OBJECTIVE = TARGET_OBJECTIVE + '''
def two(state):
    return (sum(float((state[k] - a[k]).pow(2).sum()) for k in a),
            sum(float((state[k] - b[k]).pow(2).sum()) for k in b))

def loss(state, batch):
    return sum((state[k] - target[k]).pow(2).mean() for k in target)

BATCHES = list(range(150))
'''


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    for i, name in enumerate(("base", "a", "b")):
        write_model(tmp_path / name, _sd(i), {"model_type": "test"})
    (tmp_path / "r.mrg").write_text('model base = "base"\nmodel a = "a"\nmodel b = "b"\n'
                                    "param w = [0.5, 0.5] in [0, 1]\n"
                                    'merge from base { "*" => task_arithmetic(base, [a, b], weights = w) }\n')
    (tmp_path / "l.mrg").write_text('model base = "base"\nmodel a = "a"\nmodel b = "b"\n'
                                    "param w = [0.5, 0.5] learn\n"
                                    'merge from base { "*" => task_arithmetic(base, [a, b], weights = w) }\n')
    (tmp_path / "obj.py").write_text(OBJECTIVE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_tune_writes_the_best_merge_and_a_plot(project: Path) -> None:
    res = _run("tune", "r.mrg", "--objective", "obj.py:score", "--trials", "40", "--sampler",
               "cmaes", "--seed", "0", "-o", "best", "--plot", "h.png", "-q")
    assert res.exit_code == 0, res.output
    assert "best: trial" in res.output and "run-time inputs: w; 1 compilation" in res.output
    assert (project / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert (project / "best" / "config.json").is_file()
    recipe = (project / "best" / "mergelang_recipe.mrg").read_text()
    assert "param w = [" in recipe
    got = load_file(next((project / "best").glob("model*.safetensors")))
    assert set(got) == {"w", "b"}


def test_tune_continues_a_stored_study(project: Path) -> None:
    for n in (3, 2):
        res = _run("tune", "r.mrg", "--objective", "obj.py:score", "--trials", str(n), "--storage",
                   "sqlite:///s.db", "--seed", "1", "-q")
        assert res.exit_code == 0, res.output
    assert "study: 5 trials (5 complete, 0 failed)" in res.output
    res = _run("tune", "r.mrg", "--objective", "obj.py:score", "--trials", "0", "--storage",
               "sqlite:///s.db", "-o", "best", "-q")  # no new trials: write the best so far
    assert res.exit_code == 0 and (project / "best").is_dir()


def test_tune_two_objectives_pareto_table_and_pick(project: Path) -> None:
    res = _run("tune", "r.mrg", "--objective", "obj.py:two", "--trials", "12", "--direction",
               "minimize", "--direction", "minimize", "--seed", "0", "--storage", "sqlite:///p.db",
               "-o", "table", "-q")
    assert res.exit_code == 0, res.output
    assert "Pareto set:" in res.output
    table = json.loads((project / "table" / "pareto.json").read_text())
    assert table["directions"] == ["minimize", "minimize"] and table["members"]
    assert (project / "table" / "pareto.csv").read_text().startswith("member,trial,value_0,value_1,w")
    res = _run("tune", "r.mrg", "--objective", "obj.py:two", "--trials", "0", "--direction",
               "minimize", "--direction", "minimize", "--storage", "sqlite:///p.db", "-o", "m0",
               "--pick", "0", "-q")
    assert res.exit_code == 0, res.output
    assert (project / "m0" / "mergelang_recipe.mrg").is_file()
    # the table is not written over a folder that holds something else
    res = _run("tune", "r.mrg", "--objective", "obj.py:two", "--trials", "0", "--direction",
               "minimize", "--direction", "minimize", "--storage", "sqlite:///p.db", "-o", "m0", "-q")
    assert res.exit_code == 1 and "E403" in res.output


@pytest.mark.parametrize("spec, text", [("obj.py:nope", "defines no `nope`"),
                                        ("missing.py:score", "no file missing.py"),
                                        ("obj.py", "is not FILE.py:FUNC"),
                                        ("obj.py:BATCHES", "not a function")])
def test_bad_objective_is_E905(project: Path, spec: str, text: str) -> None:
    res = _run("tune", "r.mrg", "--objective", spec, "--trials", "2")
    assert res.exit_code == 1 and "E905" in res.output and text in res.output, res.output
    assert "Traceback" not in res.output


def test_objective_import_error_is_E905(project: Path) -> None:
    (project / "broken.py").write_text("import not_a_module_anywhere\n")
    res = _run("tune", "r.mrg", "--objective", "broken.py:f", "--trials", "2")
    assert res.exit_code == 1 and "E905" in res.output and "ModuleNotFoundError" in res.output


def test_usage_errors(project: Path) -> None:
    res = _run("tune", "r.mrg", "--objective", "obj.py:score", "--trials", "2", "--pick", "1")
    assert res.exit_code == 2
    res = _run("tune", "r.mrg", "--objective", "obj.py:score", "--trials", "1", "--sampler", "grid")
    assert res.exit_code == 2


def test_learn_cli_writes_the_learned_merge(project: Path) -> None:
    res = _run("learn", "l.mrg", "--loss", "obj.py:loss", "--data", "obj.py:BATCHES", "-o", "out",
               "--lr", "0.05", "-q")
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("w = "))
    w = json.loads(line[4:])
    assert w == pytest.approx([0.3, 0.6], abs=1e-3)
    assert (project / "out" / "mergelang_recipe.mrg").is_file()


@pytest.mark.parametrize("clamp", ["project", "use"])
def test_learn_cli_clamp_option(project: Path, clamp: str) -> None:
    """--clamp is passed to learn (l.mrg's w has no range, so both give the same values); a
    convention that does not exist is a usage error."""
    res = _run("learn", "l.mrg", "--loss", "obj.py:loss", "--data", "obj.py:BATCHES", "-o", f"out-{clamp}",
               "--lr", "0.05", "-q", "--clamp", clamp)
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("w = "))
    assert json.loads(line[4:]) == pytest.approx([0.3, 0.6], abs=1e-3)
    assert _run("learn", "l.mrg", "--loss", "obj.py:loss", "--data", "obj.py:BATCHES", "-o", "x",
                "--clamp", "paper").exit_code == 2


def test_learn_cli_bad_data_is_E905(project: Path) -> None:
    res = _run("learn", "l.mrg", "--loss", "obj.py:loss", "--data", "obj.py:NOPE", "-o", "out")
    assert res.exit_code == 1 and "E905" in res.output


def test_an_output_that_cannot_be_written_is_refused_before_the_study(project: Path) -> None:
    calls = project / "calls.txt"
    (project / "count.py").write_text(f"def f(state):\n    open({str(calls)!r}, 'a').write('x')\n    return 1.0\n")
    res = _run("tune", "r.mrg", "--objective", "count.py:f", "--trials", "3", "-o", "base", "-q")
    assert res.exit_code == 1 and "E404" in res.output
    assert not calls.exists()  # no trial ran
    (project / "full").mkdir()
    (project / "full" / "mine.txt").write_text("keep")
    res = _run("learn", "l.mrg", "--loss", "obj.py:loss", "--data", "obj.py:BATCHES", "-o", "full", "-q")
    assert res.exit_code == 1 and "E403" in res.output
    assert (project / "full" / "mine.txt").read_text() == "keep"
