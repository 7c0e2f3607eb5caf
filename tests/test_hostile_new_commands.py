"""Regression tests from the hostile pass over this session's new commands (single-file output,
plugins, comprehensions, inspect, run --report, stats): each case once broke a rule (exit 0 for a
failed run, exit 3, a memory blow-up) and must now give a coded diagnostic and exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from helpers import make_sd, write_model
from mergelang.cli import main

SHAPES = {"model.layers.0.mlp.up_proj.weight": (16, 8), "model.norm.weight": (8,)}


@pytest.fixture()
def root(tmp_path):
    for seed, name in enumerate(("base", "a", "b")):
        write_model(tmp_path / name, make_sd(seed, SHAPES),
                    {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    return tmp_path


def cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, [*args])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exc_info
    return res.exit_code, res.output


def plugin_recipe(root: Path, body: str) -> Path:
    (root / "p.py").write_text("import sys, torch, mergelang\n\n@mergelang.method\n"
                               f"def f(a: torch.Tensor, k: int = 1) -> torch.Tensor:\n    {body}\n")
    (root / "r.mrg").write_text('import "p.py"\nmodel base = "base"\nmodel a = "a"\n'
                                'merge from base { "*" => f(a) }\n')
    return root / "r.mrg"


@pytest.mark.parametrize("body", ["sys.exit(0)", 'sys.exit("bye")', 'return torch.empty_like(a, device="meta")'])
def test_a_plugin_that_exits_or_returns_no_values_fails_the_run(root, body):
    r = plugin_recipe(root, body)
    for out in ("x.safetensors", "x"):
        code, text = cli("run", str(r), "-o", str(root / out), "--allow-plugins", "-q")
        assert code == 1 and "E117" in text, text
        assert not (root / out).exists()


def test_a_plugin_file_that_exits_on_import(root):
    (root / "p.py").write_text("import sys\nsys.exit(0)\n")
    (root / "r.mrg").write_text('import "p.py"\nmodel base = "base"\nmerge from base { "*" => base }\n')
    code, text = cli("check", str(root / "r.mrg"), "--allow-plugins")
    assert code == 1 and "E114" in text, text


def test_an_int_plugin_value_must_be_whole(root):
    r = plugin_recipe(root, "return a * k")
    r.write_text(r.read_text().replace("f(a)", "f(a, k = 2.5)"))
    code, text = cli("check", str(r), "--allow-plugins")
    assert code == 1 and "E115" in text and "whole number" in text, text


def test_single_file_failure_gives_no_resume_advice(root):
    (root / "n.mrg").write_text('model base = "base"\nmodel a = "a"\n'
                                'merge from base { "*" => log(a - 1000) }\n')
    code, text = cli("run", str(root / "n.mrg"), "-o", str(root / "n.safetensors"), "-q")
    assert code == 1 and "--resume" not in text, text
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []


def _nan_model(root: Path) -> Path:
    write_model(root / "nanm", {k: torch.full(s, float("nan")) for k, s in SHAPES.items()})
    return root / "nanm"


def test_inspect_an_empty_or_non_finite_model(root):
    (root / "empty").mkdir()
    save_file({}, str(root / "empty" / "model.safetensors"))
    code, text = cli("inspect", str(root / "base"), str(root / "empty"), "-o", str(root / "r1"),
                     "--format", "json")
    assert code in (0, 1) and "internal error" not in text, text
    nan = _nan_model(root)
    code, text = cli("inspect", str(root / "base"), str(nan), "-o", str(root / "r2"), "--format",
                     "json", "--spectrum")
    assert code == 0 and "internal error" not in text, text
    report = json.loads((root / "r2" / "report.json").read_text())  # valid JSON: NaN -> null
    assert report["total"]["models"]["nanm"]["norm"] is None


def test_run_report_with_a_non_finite_output(root):
    _nan_model(root)
    (root / "nan.mrg").write_text('model base = "base"\nmodel a = "nanm"\nmerge from base { "*" => a }\n')
    code, text = cli("run", str(root / "nan.mrg"), "-o", str(root / "nw"), "--report",
                     "--nan-check", "off", "-q")
    assert code == 0, text
    json.loads((root / "nw" / "mergelang_report.json").read_text())


def test_stats_refuses_a_config_that_does_not_describe_the_checkpoint(root):
    """config.json without sizes would build transformers' default 7B Llama (28 GB)."""
    pytest.importorskip("transformers")
    (root / "d.txt").write_text("one\ntwo\n")
    code, text = cli("stats", str(root / "a"), "--data", str(root / "d.txt"), "--kind", "gram",
                     "-o", str(root / "s"), "-q")
    assert code == 1 and "E960" in text and "does not describe" in text, text


def test_reduce_with_a_builtin_and_enumerate_start_messages(root):
    (root / "x.mrg").write_text('model base = "base"\nmodel a = "a"\n'
                                'merge from base { "*" => reduce("maximum", [base, a]) }\n')
    code, text = cli("check", str(root / "x.mrg"))
    assert code == 1 and "built-in" in text, text
    (root / "y.mrg").write_text('model base = "base"\nmodel a = "a"\n'
                                'merge from base { "*" => a * len(enumerate([1], start = "x")) }\n')
    code, text = cli("check", str(root / "y.mrg"))
    assert code == 1 and "enumerate's start" in text, text
