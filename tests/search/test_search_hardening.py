"""Issue 27: objectives and losses that exit, raise, mutate or return junk; stored studies that
no longer fit; learn settings that make no sense. Each gets a coded diagnostic (or, for an
objective that exits, a failed trial and W110), never a traceback, a hang or a silent exit 0."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mergelang as ml
from helpers import write_model
from mergelang.cli import main
from mergelang.diagnostics import MergelangError

pytest.importorskip("optuna")

BASE = {"w": torch.arange(16, dtype=torch.float32).reshape(4, 4), "c": torch.ones(4)}
A = {"w": torch.full((4, 4), 2.0), "c": torch.full((4,), 3.0)}
HEAD = 'model base = "<memory>"\nmodel a = "<memory>"\n'


def _recipe(body: str) -> ml.Recipe:
    return ml.compile(HEAD + body, base=BASE, a=A)


def _codes(ei) -> list[str]:
    return ei.value.codes


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    write_model(tmp_path / "base", BASE, {"model_type": "test"})
    write_model(tmp_path / "a", A, {"model_type": "test"})
    (tmp_path / "r.mrg").write_text('model base = "base"\nmodel a = "a"\nparam t = 0.5 in [0, 1]\n'
                                    'merge from base { "*" => linear([base, a], weights = [1 - t, t]) }\n')
    (tmp_path / "l.mrg").write_text('model base = "base"\nmodel a = "a"\nparam t = 0.5 learn\n'
                                    'merge from base { "*" => linear([base, a], weights = [1 - t, t]) }\n')
    (tmp_path / "o.py").write_text(
        "import sys\n"
        "def exits(state):\n    sys.exit(0)\n"
        "def huge(state):\n    return 10**400\n"
        "def ok(state):\n    return float(state['w'].sum())\n"
        "def lexit(state, batch):\n    sys.exit(0)\n"
        "def lraise(state, batch):\n    raise ValueError('bad loss')\n"
        "def lplain(state, batch):\n    return (state['w'] - 3).pow(2).mean()\n"
        "def data_raise():\n    raise RuntimeError('no data')\n"
        "B = [0, 1, 2]\nN = 5\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _cli(*argv: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(argv))
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exc_info
    return res.exit_code, res.output


# ------------------------------------------------------------------ 18: sys.exit in the user's code

def test_objective_that_exits_fails_its_trial_and_the_summary_is_printed(project: Path) -> None:
    code, out = _cli("tune", "r.mrg", "--objective", "o.py:exits", "--trials", "2", "-q",
                     "--storage", "sqlite:///s.db")
    assert code == 0, out
    assert "study: 2 trials (0 complete, 2 failed)" in out and "W110" in out and "sys.exit(0)" in out
    con = sqlite3.connect(project / "s.db")
    states = [s for (s,) in con.execute("select state from trials")]
    con.close()
    assert states == ["FAIL", "FAIL"]  # none left RUNNING


def test_loss_that_exits_is_e907(project: Path) -> None:
    code, out = _cli("learn", "l.mrg", "--loss", "o.py:lexit", "--data", "o.py:B", "-o", "out", "-q")
    assert code == 1 and "E907" in out and "sys.exit(0)" in out
    assert not (project / "out").exists()


# ------------------------------------------------------------------ 19: directions of a stored study

def test_continuing_a_stored_study_with_other_directions_is_e902(project: Path) -> None:
    assert _cli("tune", "r.mrg", "--objective", "o.py:ok", "--trials", "1", "-q",
                "--storage", "sqlite:///s.db")[0] == 0
    code, out = _cli("tune", "r.mrg", "--objective", "o.py:ok", "--trials", "1", "-q",
                     "--storage", "sqlite:///s.db", "--direction", "minimize")
    assert code == 1 and "E902" in out and "maximize" in out


def test_stored_study_whose_param_changed_kind_is_e902(project: Path) -> None:
    assert _cli("tune", "r.mrg", "--objective", "o.py:ok", "--trials", "1", "-q",
                "--storage", "sqlite:///s.db")[0] == 0
    (project / "r.mrg").write_text((project / "r.mrg").read_text().replace("0.5 in [0, 1]", "1 in [0, 3]"))
    code, out = _cli("tune", "r.mrg", "--objective", "o.py:ok", "--trials", "1", "-q",
                     "--storage", "sqlite:///s.db")
    assert code == 1 and "E902" in out and "internal error" not in out, out


def test_tune_internal_errors_are_coded(project: Path) -> None:
    code, out = _cli("tune", "r.mrg", "--objective", "o.py:huge", "--trials", "1", "-q")
    assert code == 1 and "E903" in out, out
    code, out = _cli("tune", "r.mrg", "--objective", "o.py:ok", "--trials", "1", "-q",
                     "--storage", "postgresql://u@localhost/db")
    assert code == 1 and ("E904" in out or "E902" in out) and "internal error" not in out, out
    (project / "w.mrg").write_text('model base = "base"\nparam t = 0.5 in [-1e308, 1e308]\n'
                                   'merge from base { "*" => base * t }\n')
    code, out = _cli("tune", "w.mrg", "--objective", "o.py:ok", "--trials", "1", "-q")
    assert code == 1 and "E406" in out, out


# ------------------------------------------------------------------ 20: constant tensors by reference

def test_a_loss_that_mutates_state_does_not_change_later_steps() -> None:
    r = _recipe('param t = 0.5 learn\nmerge from base {\n    "w" => linear([base, a], weights = [1 - t, t])\n'
                '    "c" => base\n}\n')
    seen: list[torch.Tensor] = []

    def loss(state, batch):
        seen.append(state["c"].clone())
        state["c"].add_(100.0)  # a careless loss
        return (state["w"] - 3).pow(2).mean()

    r.learn(loss, [0, 1, 2], lr=0.0)
    assert all(torch.equal(s, BASE["c"]) for s in seen)
    assert torch.equal(r.evaluate()["c"], BASE["c"])


# ------------------------------------------------------------------ 23: NaN / inf loss

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_loss_stops_at_once(bad: float) -> None:
    r = _recipe('param t = 0.5 learn\nmerge from base { "*" => linear([base, a], weights = [1 - t, t]) }\n')
    calls = []

    def loss(state, batch):
        calls.append(batch)
        return state["w"].sum() * bad

    with pytest.raises(MergelangError) as ei:
        r.learn(loss, list(range(50)))
    assert _codes(ei) == ["E908"] and calls == [0]


# ------------------------------------------------------------------ 24: clamp(param) out of range

def test_learn_through_clamp_leaving_its_range() -> None:
    """clamp(t, 0, 1) is t inside [0, 1] and a constant outside; with t starting at 0.9 and the
    target at t = 3 (out of reach), t grows past 1 and the merge stays `a` (t clamped to 1)."""
    r = _recipe('param t = 0.9 learn\nmerge from base { "*" => linear([base, a], '
                'weights = [1 - clamp(t, 0, 1), clamp(t, 0, 1)]) }\n')
    target = {k: BASE[k] + 3 * (A[k] - BASE[k]) for k in BASE}
    res = r.learn(lambda s, b: sum((s[k] - target[k]).pow(2).mean() for k in target),
                  list(range(20)), lr=0.1, optimizer="sgd")
    assert res.values["t"] > 1.0
    merged = res.recipe().evaluate()
    assert torch.allclose(merged["w"], A["w"])


def test_gradient_flows_through_a_compile_time_reduction() -> None:
    """base * sum([t, t]) = 2 t base: the loss ||2 t base - 3 base||^2 has its minimum at
    t = 1.5 (by hand); the gradient reaches t only through `sum`."""
    r = _recipe('param t = 0.5 learn\nmerge from base { "*" => base * sum([t, t]) }\n')
    res = r.learn(lambda s, b: sum((s[k] - 3 * BASE[k]).pow(2).mean() for k in BASE),
                  list(range(300)), lr=0.05)
    assert not res.warnings
    assert res.values["t"] == pytest.approx(1.5, abs=1e-3)


# ------------------------------------------------------------------ learn: the user's code and settings

@pytest.mark.parametrize("args,code_", [
    (("--loss", "o.py:lraise", "--data", "o.py:B"), "E907"),
    (("--loss", "o.py:lplain", "--data", "o.py:data_raise"), "E907"),
    (("--loss", "o.py:lplain", "--data", "o.py:N"), "E903"),
    (("--loss", "o.py:lplain", "--data", "o.py:B", "--lr", "nan"), "E902"),
    (("--loss", "o.py:lplain", "--data", "o.py:B", "--lr", "-1"), "E902"),
])
def test_learn_failures_are_coded(project: Path, args: tuple[str, ...], code_: str) -> None:
    code, out = _cli("learn", "l.mrg", *args, "-o", "out", "-q")
    assert code == 1 and code_ in out and "internal error" not in out, out
    assert not (project / "out").exists()


def test_complex_loss_and_generator_that_raises() -> None:
    r = _recipe('param t = 0.5 learn\nmerge from base { "*" => linear([base, a], weights = [1 - t, t]) }\n')
    with pytest.raises(MergelangError) as ei:
        r.learn(lambda s, b: s["w"].sum() * 1j, [0])
    assert _codes(ei) == ["E903"]

    def batches():
        yield 0
        raise OSError("the disk went away")

    with pytest.raises(MergelangError) as ei:
        r.learn(lambda s, b: (s["w"] - 3).pow(2).mean(), batches())
    assert _codes(ei) == ["E907"] and "the disk went away" in str(ei.value)


def test_api_storage_is_guarded_too(project: Path) -> None:
    r = ml.compile(project / "r.mrg")
    try:
        for url, code in ((f"sqlite:///{project}/a/study.db", "E404"), (f"sqlite:///{project}/a/config.json", "E404")):
            with pytest.raises(MergelangError) as ei:
                r.tune(lambda s: 1.0, 1, storage=url)
            assert _codes(ei) == [code]
        foreign = project / "mine.db"
        con = sqlite3.connect(foreign)
        con.execute("create table t (x int)")
        con.commit()
        con.close()
        with pytest.raises(MergelangError) as ei:
            r.tune(lambda s: 1.0, 1, storage=f"sqlite:///{foreign}")
        assert _codes(ei) == ["E403"]
    finally:
        r.close()
    assert not (project / "a" / "study.db").exists()
