"""Fuzz targets for the user's code that `tune` and `learn` call: objectives, losses and data
that return junk, raise anything, call sys.exit or change `state` in place. The property: the
call ends with a result or a MergelangError carrying known codes, never another exception;
no trial is left RUNNING; learned values are finite; the merge is not changed by a loss that
mutates its state. `scripts/fuzz.py` runs these for longer (MERGELANG_FUZZ_EXAMPLES)."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mergelang as ml
from mergelang.diagnostics import CODES

pytest.importorskip("optuna")

FUZZ = settings(max_examples=int(os.environ.get("MERGELANG_FUZZ_EXAMPLES", "8")), deadline=None,
                derandomize="MERGELANG_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=list(HealthCheck))

BASE = {"w": torch.linspace(-1, 1, 16).reshape(4, 4), "c": torch.ones(3)}
A = {"w": torch.full((4, 4), 0.5), "c": torch.zeros(3)}
HEAD = 'model base = "<memory>"\nmodel a = "<memory>"\n'
BODY = 'merge from base {\n    "w" => linear([base, a], weights = [1 - t, t])\n    "c" => base\n}\n'

EXCEPTIONS = [ValueError("v"), RuntimeError("r"), TypeError("t"), ZeroDivisionError("z"),
              RecursionError("deep"), MemoryError(), OSError(5, "io"), StopIteration(),
              GeneratorExit(), SystemExit(0), SystemExit(3), SystemExit("bye"), AssertionError()]

JUNK = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-10**500, max_value=10**500),
    st.booleans(), st.none(), st.text(max_size=5), st.lists(st.floats(), max_size=3).map(tuple),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.sampled_from([torch.tensor(1.0), torch.tensor([1.0, 2.0]), torch.tensor(1 + 2j),
                     torch.tensor(3), torch.tensor(True), torch.tensor(float("nan")),
                     torch.zeros(0), torch.tensor(float("inf")), torch.tensor([[0.5]])]))

#: what the user's function does: ("return", value) | ("raise", exception) | ("mutate", value)
BEHAVIOUR = st.one_of(st.tuples(st.just("return"), JUNK),
                      st.tuples(st.just("raise"), st.sampled_from(EXCEPTIONS)),
                      st.tuples(st.just("mutate"), JUNK))


def _act(behaviour: tuple, state: dict) -> object:
    kind, what = behaviour
    if kind == "raise":
        raise what
    if kind == "mutate":
        for v in state.values():
            if isinstance(v, torch.Tensor):
                with torch.no_grad():
                    v.mul_(0).add_(7)
    return what


def _coded(exc: ml.MergelangError) -> None:
    assert exc.codes and all(c in CODES for c in exc.codes), exc.codes


@FUZZ
@given(st.lists(BEHAVIOUR, min_size=1, max_size=3), st.sampled_from(["maximize", "minimize"]))
def test_objectives(behaviours: list, direction: str) -> None:
    r = ml.compile(HEAD + "param t = 0.5 in [0, 1]\n" + BODY, base=BASE, a=A)
    calls = iter(behaviours * 2)

    def objective(state):
        return _act(next(calls), state)

    try:
        res = r.tune(objective, len(behaviours), seed=0, directions=direction)
    except ml.MergelangError as exc:
        _coded(exc)
        return
    finally:
        r.close()
    assert {t.state for t in res.trials} <= {"complete", "fail"}
    for t in res.complete:
        assert isinstance(t.value, float)


def _loss_of(behaviours: list):
    calls = iter(behaviours * 50)

    def loss(state, batch):
        got = _act(next(calls), state)
        if isinstance(got, torch.Tensor) and got.numel() == 1 and got.dtype.is_floating_point:
            return got + 0 * state["w"].sum()  # differentiable, with the junk's value
        return got
    return loss


DATA = st.one_of(st.lists(st.integers(), max_size=4), st.integers(), st.none(), st.text(max_size=3),
                 st.sampled_from(["gen-raises", "fn-raises", "fn-exits"]))


def _data(kind: object) -> object:
    if kind == "gen-raises":
        def gen():
            yield 0
            raise OSError("gone")
        return gen()
    if kind == "fn-raises":
        return lambda: 1 / 0
    if kind == "fn-exits":
        return lambda: sys.exit(2)
    return kind


@FUZZ
@given(st.lists(BEHAVIOUR, min_size=1, max_size=3), DATA,
       st.sampled_from([1e-2, 0.0, -1.0, float("nan"), float("inf")]), st.sampled_from(["adam", "sgd"]))
def test_losses(behaviours: list, data: object, lr: float, optimizer: str) -> None:
    r = ml.compile(HEAD + "param t = 0.5 learn\n" + BODY, base=BASE, a=A)
    try:
        res = r.learn(_loss_of(behaviours), _data(data), lr=lr, optimizer=optimizer, steps=3)
    except ml.MergelangError as exc:
        _coded(exc)
        return
    finally:
        r.close()
    assert math.isfinite(res.values["t"]) and all(math.isfinite(v) for v in res.losses)
    merged = res.recipe().evaluate()
    assert torch.equal(merged["c"], BASE["c"])  # a loss that mutated `state` changed nothing
