"""Issue 27 (writers): the output guard's rules beyond "which option is guarded"
(test_write_guard.py enumerates those): multi-output folders compared recursively, --resume
never writes through a link planted in the work folder, tune's Pareto folder, single-file
outputs (--force, links, missing folders) and study storages."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mergelang as ml
from helpers import write_model
from mergelang.cli import main
from mergelang.io.journal import work_dir_for


def _sd(seed: int, n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(16, 16, generator=g) for i in range(n)}


@pytest.fixture
def models(tmp_path: Path) -> Path:
    for i, name in enumerate(("base", "a", "b")):
        write_model(tmp_path / name, _sd(i), {"model_type": "test"})
    return tmp_path


def _invoke(*argv: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in argv])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exc_info
    return res.exit_code, res.output


MULTI = """model base = "base"
model a = "a"
model b = "b"
merge "avg" from base { "*" => linear([a, b], weights = [0.5, 0.5]) }
merge "ta" from base { "*" => task_arithmetic(base, [a, b], weights = [0.3, 0.3]) }
"""


@pytest.mark.parametrize("planted", ["avg/my_notes.txt", "ta/mydata/x.bin"])
def test_run_force_refuses_files_added_inside_named_outputs(models: Path, planted: str) -> None:
    (models / "m.mrg").write_text(MULTI)
    out = models / "out"
    assert _invoke("run", models / "m.mrg", "-o", out, "-q")[0] == 0
    assert _invoke("run", models / "m.mrg", "-o", out, "-q", "--force")[0] == 0  # its own: replaced
    mine = out / planted
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_text("mine")
    code, text = _invoke("run", models / "m.mrg", "-o", out, "-q", "--force")
    assert code == 1 and "E403" in text and planted.split("/")[1] in text, text
    assert mine.read_text() == "mine"


RECIPE = """model base = "base"
model a = "a"
option shard_size = "1KB"
merge from base { "*" => linear([base, a], weights = [0.5, 0.5]) }
"""


def test_resume_refuses_a_link_planted_in_the_work_folder(models: Path, monkeypatch) -> None:
    (models / "r.mrg").write_text(RECIPE)
    out = models / "out"
    recipe = ml.compile(models / "r.mrg")
    real, calls = os.pwrite, {"n": 0}

    def filling(fd: int, data, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > 12:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", filling)
    with pytest.raises(ml.MergelangError):
        recipe.run(out, device="cpu")
    monkeypatch.undo()
    work = work_dir_for(out)
    shard = sorted(work.glob("model-*.safetensors"))[0]
    outside = models / "precious.bin"
    outside.write_bytes(shard.read_bytes())  # same size and header: resume would reuse it
    shard.unlink()
    shard.symlink_to(outside)
    before = outside.read_bytes()
    code, text = _invoke("run", models / "r.mrg", "-o", out, "--resume", "-q")
    assert code == 1 and "E505" in text and "symbolic link" in text, text
    assert outside.read_bytes() == before
    recipe.close()


def test_tune_pareto_table_is_guarded_before_the_study(models: Path) -> None:
    head = 'model base = "base"\nmodel a = "a"\nmodel b = "b"\nparam w = [0.5, 0.5] in [0, 1]\n'
    (models / "r.mrg").write_text(head + 'merge from base { "*" => task_arithmetic(base, [a, b], '
                                  'weights = w) }\n')
    (models / "obj.py").write_text("def two(state):\n    return (1.0, 2.0)\n"
                                   "def boom(state):\n    raise SystemExit('the study must not run')\n")
    argv = ["tune", models / "r.mrg", "--objective", f"{models}/obj.py:boom", "--trials", "1",
            "--direction", "maximize", "--direction", "minimize", "-q"]
    code, text = _invoke(*argv, "-o", models / "a")  # an input model folder
    assert code == 1 and "E404" in text and "trial" not in text, text
    assert not (models / "a" / "pareto.csv").exists()
    argv[3] = f"{models}/obj.py:two"
    assert _invoke(*argv, "-o", models / "front")[0] == 0
    assert (models / "front" / "pareto.csv").is_file()
    code, text = _invoke(*argv, "-o", models / "front")
    assert code == 1 and "E403" in text and "--force" in text
    assert _invoke(*argv, "-o", models / "front", "--force")[0] == 0  # its own table: replaced


def test_single_file_outputs(models: Path, tmp_path: Path) -> None:
    (models / "r.mrg").write_text(RECIPE)
    r = str(models / "r.mrg")
    code, text = _invoke("compile", r, "-o", "/nonexistent/x")
    assert code == 1 and "E502" in text and "Traceback" not in text
    code, text = _invoke("explain", r, "-o", "/nonexistent/x")
    assert code == 1 and "E502" in text
    plan = tmp_path / "plan.txt"
    assert _invoke("compile", r, "-o", plan)[0] == 0
    first = plan.read_text()
    assert first.strip() and _invoke("compile", r, "-o", plan)[0] == 1  # exists: E403
    assert _invoke("compile", r, "-o", plan, "--force")[0] == 0 and plan.read_text() == first
    link = tmp_path / "link.txt"
    link.symlink_to(tmp_path / "target.txt")
    (tmp_path / "target.txt").write_text("keep")
    code, text = _invoke("compile", r, "-o", link, "--force")
    assert code == 1 and "E403" in text and (tmp_path / "target.txt").read_text() == "keep"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for special in (fifo, Path("/dev/null")):  # never replaced, --force or not
        code, text = _invoke("compile", r, "-o", special, "--force")
        assert code == 1 and "E403" in text and "regular file" in text, text
    assert Path("/dev/null").is_char_device()
    # an imported recipe never lands inside a model the YAML names
    (tmp_path / "mk.yml").write_text(f"merge_method: linear\nmodels:\n  - model: {models / 'a'}\n"
                                     "    parameters: {weight: 1.0}\n")
    code, text = _invoke("import-mergekit", tmp_path / "mk.yml", "-o", models / "a" / "r.mrg")
    assert code == 1 and "E404" in text, text
    assert not list(tmp_path.glob(".*mergelang-*"))  # no temporary file left behind


def test_storage_accepts_its_own_study_and_refuses_others(models: Path, tmp_path: Path) -> None:
    head = 'model base = "base"\nmodel a = "a"\nparam t = 0.5 in [0, 1]\n'
    (models / "r.mrg").write_text(head + 'merge from base { "*" => linear([base, a], weights = [1 - t, t]) }\n')
    (models / "obj.py").write_text("def f(state):\n    return float(state['t0'].sum())\n")
    argv = ["tune", models / "r.mrg", "--objective", f"{models}/obj.py:f", "--trials", "2", "-q"]
    db = tmp_path / "study.db"
    assert _invoke(*argv, "--storage", f"sqlite:///{db}")[0] == 0
    code, text = _invoke(*argv, "--storage", f"sqlite:///{db}")  # continued: 4 trials
    assert code == 0 and "4 trials" in text, text
    for junk in (b"", b"not a database", None):
        other = tmp_path / "other.db"
        other.unlink(missing_ok=True)
        if junk is None:
            con = sqlite3.connect(other)
            con.execute("create table studies (x int)")
            con.execute("create table trials (x int)")
            con.execute("create table my_table (x int)")  # optuna's names plus one of the user's
            con.commit()
            con.close()
        else:
            other.write_bytes(junk)
        before = other.read_bytes()
        code, text = _invoke(*argv, "--storage", f"sqlite:///{other}")
        assert code == 1 and "E403" in text, text
        assert other.read_bytes() == before


def test_plot_is_checked_before_the_study(models: Path, tmp_path: Path) -> None:
    head = 'model base = "base"\nmodel a = "a"\nparam t = 0.5 in [0, 1]\n'
    (models / "r.mrg").write_text(head + 'merge from base { "*" => linear([base, a], weights = [1 - t, t]) }\n')
    (models / "obj.py").write_text("def f(state):\n    raise SystemExit('the study must not run')\n")
    argv = ["tune", models / "r.mrg", "--objective", f"{models}/obj.py:f", "--trials", "2", "-q",
            "-o", tmp_path / "best"]
    for bad, code_ in ((tmp_path / "plot.txt", "E902"), (tmp_path / "nofolder" / "p.png", "E502")):
        code, text = _invoke(*argv, "--plot", bad)
        assert code == 1 and code_ in text and "study:" not in text, text
    assert not (tmp_path / "best").exists()


def test_plot_or_storage_inside_the_output_folder_is_refused(models: Path, tmp_path: Path) -> None:
    head = 'model base = "base"\nmodel a = "a"\nparam t = 0.5 in [0, 1]\n'
    (models / "r.mrg").write_text(head + 'merge from base { "*" => linear([base, a], weights = [1 - t, t]) }\n')
    (models / "obj.py").write_text("def f(state):\n    return 1.0\n")
    best = tmp_path / "best"
    best.mkdir()
    argv = ["tune", models / "r.mrg", "--objective", f"{models}/obj.py:f", "--trials", "1", "-q", "-o", best]
    for extra in (["--plot", best / "h.png"], ["--storage", f"sqlite:///{best}/s.db"]):
        code, text = _invoke(*argv, *extra)
        assert code == 1 and "E403" in text and "inside the -o folder" in text, text
    assert not any(best.iterdir())
