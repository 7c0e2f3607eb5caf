"""`ml.objectives.perplexity` and `ml.objectives.lm_eval` (in memory) against the tools
themselves on the written output: transformers' own causal-LM loss, and the `lm_eval` command
line (`--model hf --model_args pretrained=OUT --include_path`) on a tiny local task; and
`mergelang tune --objective perplexity:DATA / lm-eval:TASKS`."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mergelang as ml
from mergelang.cli import main as cli_main

transformers = pytest.importorskip("transformers")
pytest.importorskip("optuna")

import data_models as dm  # noqa: E402

RECIPE = """model a = "{a}"
model b = "{b}"
param t = 0.5 in [0, 1]
merge from a {{
    "*" => linear([a, b], weights = [1 - t, t])
}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("objectives")
    a = dm.save_llama(root / "a", 0)
    b = dm.save_llama(root / "b", 1, base=a, scale=0.3)
    (root / "r.mrg").write_text(RECIPE.format(a=a, b=b))
    return {"root": root, "a": a, "b": b, "txt": dm.write_texts(root / "d.txt"),
            "recipe": root / "r.mrg"}


def merged(setup, t: float) -> dict[str, torch.Tensor]:
    return ml.compile(setup["recipe"], t=t).evaluate()


def transformers_perplexity(folder: Path, texts: list[str]) -> float:
    """exp of transformers' own loss: each example's mean next-token NLL, weighted by its
    number of predicted tokens."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    total = count = 0.0
    for text in texts:
        ids = dm.encode(folder, text)
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(total / count)


def test_perplexity_equals_transformers_loss_on_the_written_output(setup, tmp_path):
    out = ml.compile(setup["recipe"], t=0.3).run(tmp_path / "out")
    f = ml.objectives.perplexity(setup["txt"], config=setup["a"])
    got = f(merged(setup, 0.3))
    assert got == pytest.approx(transformers_perplexity(Path(out), dm.TEXTS), rel=1e-5)
    first = ml.objectives.perplexity(setup["txt"], config=setup["a"], max_examples=2)(merged(setup, 0.3))
    assert first == pytest.approx(transformers_perplexity(Path(out), dm.TEXTS[:2]), rel=1e-5)
    assert f(merged(setup, 0.0)) != pytest.approx(got, rel=1e-3)  # the state drives the model


def test_perplexity_refuses_a_state_that_misses_weights(setup):
    f = ml.objectives.perplexity(setup["txt"], config=setup["a"])
    state = merged(setup, 0.5)
    state.pop("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ml.MergelangError) as info:
        f(state)
    assert info.value.codes == ["E966"] and "up_proj" in str(info.value)


def test_tune_with_perplexity_minimizes_and_writes_the_best(setup, tmp_path):
    res = CliRunner().invoke(cli_main, ["tune", str(setup["recipe"]), "--objective",
                                        f"perplexity:{setup['txt']}", "--trials", "4", "--seed", "0",
                                        "--sampler", "random", "-o", str(tmp_path / "best"), "-q"])
    assert res.exit_code == 0, res.output
    assert "direction minimize" in res.output
    best = float(res.output.split("best: trial ")[1].split("value ")[1].split(":")[0])
    values = [float(line.split()[1]) for line in res.output.splitlines()
              if line.strip() and line.split()[0].isdigit()]
    assert best == min(values)
    assert best == pytest.approx(transformers_perplexity(tmp_path / "best", dm.TEXTS), rel=1e-4)


def test_tune_objective_errors(setup, tmp_path):
    run = CliRunner().invoke
    base = ["tune", str(setup["recipe"]), "--trials", "1"]
    res = run(cli_main, [*base, "--objective", "perplexity:"])
    assert res.exit_code == 1 and "E966" in res.output
    res = run(cli_main, [*base, "--objective", f"perplexity:{tmp_path / 'none.txt'}"])
    assert res.exit_code == 1 and "E961" in res.output and "Traceback" not in res.output
    res = run(cli_main, [*base, "--objective", f"perplexity:{setup['txt']}", "--direction", "maximize"])
    assert res.exit_code == 2 and "minimize" in res.output
    res = run(cli_main, [*base, "--objective", "x.py:f", "--limit", "3"])
    assert res.exit_code == 2


# -------------------------------------------------------------------------------------- lm-eval

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: {metric}
    aggregation: {agg}
    higher_is_better: {hib}
"""
ROWS = [("the cat sat on the", ["mat", "sun", "dog"], 0), ("a big red", ["dog", "on", "the"], 0),
        ("it was a good", ["day", "cat", "to"], 0), ("the sun and the", ["night", "a", "ran"], 0),
        ("the dog ran", ["home", "big", "was"], 0), ("it was", ["bad", "mat", "on"], 0),
        ("the red", ["sun", "and", "to"], 1), ("a good", ["night", "day", "cat"], 2)]


def write_tasks(folder: Path) -> Path:
    folder.mkdir()
    dm.write_jsonl(folder / "tiny.jsonl", [{"question": q, "choices": c, "answer": a} for q, c, a in ROWS])
    (folder / "tiny_acc.yaml").write_text(TASK.format(name="tiny_acc", data=folder / "tiny.jsonl", metric="acc", agg="mean", hib="true"))
    # a continuous score (the Brier score of the choices' normalised probabilities): equal
    # numbers mean equal weights, not just the same right answers
    (folder / "tiny_brier.yaml").write_text(TASK.format(name="tiny_brier", data=folder / "tiny.jsonl",
                                                        metric="brier_score", agg="brier_score",
                                                        hib="false"))
    return folder


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_lm_eval_in_memory_equals_the_lm_eval_command(setup, tmp_path, offline):
    pytest.importorskip("lm_eval")
    tasks = write_tasks(tmp_path / "tasks")
    out = ml.compile(setup["recipe"], t=0.4).run(tmp_path / "out")
    f = ml.objectives.lm_eval("tiny_acc,tiny_brier", config=setup["a"], include_path=tasks)
    got = f(merged(setup, 0.4))
    exe = shutil.which("lm_eval", path=str(Path(sys.executable).parent)) or "lm_eval"
    proc = subprocess.run([exe, "--model", "hf", "--model_args", f"pretrained={out}",
                           "--include_path", str(tasks), "--tasks", "tiny_acc,tiny_brier",
                           "--output_path", str(tmp_path / "res"), "--device", "cpu"],
                          capture_output=True, text=True, env={**os.environ}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(next((tmp_path / "res").rglob("results*.json")).read_text())["results"]
    want = (res["tiny_acc"]["acc,none"] + res["tiny_brier"]["brier_score,none"]) / 2
    assert got == pytest.approx(want, rel=1e-6)
    assert f(merged(setup, 0.0)) != pytest.approx(got, rel=1e-4)  # the state drives the model
    assert f(merged(setup, 0.4)) == pytest.approx(got, rel=1e-9)  # and the weights are replaced


def test_lm_eval_errors(setup, tmp_path, offline, monkeypatch):
    pytest.importorskip("lm_eval")
    with pytest.raises(ml.MergelangError) as info:
        ml.objectives.lm_eval("no_such_task_here", config=setup["a"], include_path=write_tasks(tmp_path / "t"))
    assert info.value.codes == ["E966"]
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ml.MergelangError) as info:
        ml.objectives.lm_eval("tiny_acc", config=setup["a"])
    assert info.value.codes == ["E964"] and "mergelang[eval]" in str(info.value)


def test_tune_with_lm_eval_maximizes(setup, tmp_path, offline):
    pytest.importorskip("lm_eval")
    tasks = write_tasks(tmp_path / "tasks")
    res = CliRunner().invoke(cli_main, ["tune", str(setup["recipe"]), "--objective", "lm-eval:tiny_acc",
                                        "--lm-eval-include", str(tasks), "--limit", "4",
                                        "--trials", "2", "--seed", "0", "-q"])
    assert res.exit_code == 0, res.output
    assert "direction maximize" in res.output
