"""examples/digits: the search and learned-merging demo runs end to end (one seed, few trials),
through both the Python API (run.py) and the CLI commands its recipes document."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("sklearn")
pytest.importorskip("optuna")

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"


@pytest.fixture(scope="module")
def digits():
    sys.path.insert(0, str(DIGITS))
    import run

    yield run
    sys.path.remove(str(DIGITS))


def test_demo_quick_table(digits) -> None:
    text = digits.main(["--quick"])
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in text.splitlines()[2:]}
    assert len(rows) == 16
    avg = {k: float(v.split("**")[1]) for k, v in rows.items()}
    individual = avg["Individual (each task's own fine-tune)"]
    base = avg["Pretrained base (heads: linear probes)"]
    assert base < avg[digits.TA] < individual  # merging helps, and is below each task's own model
    assert all(0 <= a <= 100 for a in avg.values())


def test_recipes_run_from_the_cli(digits, tmp_path: Path, monkeypatch) -> None:
    from mergelang.cli import main
    from setting import build

    build(tmp_path / "models", seed=0)
    for f in ("ties.mrg", "adamerging_task.mrg", "objectives.py", "setting.py"):
        (tmp_path / f).write_text((DIGITS / f).read_text())
    monkeypatch.chdir(tmp_path)
    for mod in ("setting", "objectives"):  # the copies in tmp_path, not run.py's
        monkeypatch.delitem(sys.modules, mod, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    res = CliRunner().invoke(main, ["tune", "ties.mrg", "--objective", "objectives.py:val_accuracy",
                                    "--trials", "4", "--sampler", "cmaes", "--seed", "0", "-o", "tuned", "-q"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "tuned" / "model-00001-of-00001.safetensors").is_file() or \
        list((tmp_path / "tuned").glob("*.safetensors"))
    res = CliRunner().invoke(main, ["learn", "adamerging_task.mrg", "--loss", "objectives.py:entropy_loss",
                                    "--data", "objectives.py:batches", "--steps", "5", "-o", "learned", "-q"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "lam = [" in res.output
