"""Merge methods written in Python (lang/plugins.py, runtime/kernels/plugin.py): the example
plugins (examples/plugins/) against independent torch formulas, the opt-in (E116), W005 in
`check`, streaming under a memory budget, installed entry points, and one test per diagnostic
(E114 plugin not found / failing, E115 signature mismatch, E117 failing at run time)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import mergelang as ml
from helpers import make_sd, write_model
from mergelang.cli import main
from mergelang.diagnostics import MergelangError

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "examples" / "plugins" / "sdmecha_methods.py"
SHAPES = {"model.embed_tokens.weight": (16, 8), "model.layers.0.mlp.up_proj.weight": (32, 8),
          "model.layers.0.self_attn.q_proj.weight": (8, 8), "model.norm.weight": (8,)}


@pytest.fixture()
def folder(tmp_path):
    for seed, name in enumerate(("base", "math", "code")):
        write_model(tmp_path / name, make_sd(seed, SHAPES))
    shutil.copy(PLUGIN, tmp_path / "methods.py")
    return tmp_path


def recipe(folder: Path, rules: str, header: str = 'import "methods.py"') -> Path:
    text = (f'{header}\nmodel base = "base"\nmodel math = "math"\nmodel code = "code"\n'
            f"merge from base {{\n{rules}\n}}\n")
    (folder / "r.mrg").write_text(text)
    return folder / "r.mrg"


def tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(folder / name / "model.safetensors")


def written(out) -> dict[str, torch.Tensor]:
    """Every tensor of a merged folder (its shards)."""
    got: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(out).glob("*.safetensors")):
        got.update(load_file(shard))
    return got


def test_example_methods_equal_their_formulas(folder, tmp_path):
    r = recipe(folder, '    "*norm*" => base\n    "*.mlp.*" => geometric_sum(math, code, alpha = 0.3)\n'
                       '    "*embed*" => crossover(math, code, cutoff = 0.3)\n'
                       '    "*" => add_perpendicular(math, code, base, alpha = 0.8)')
    out = ml.compile(r, allow_plugins=True).run(tmp_path / "out")
    got = written(out)
    base, a, b = (tensors(folder, n) for n in ("base", "math", "code"))
    k = "model.layers.0.self_attn.q_proj.weight"  # add_perpendicular, written out independently
    da, db = (a[k] - base[k]).double(), (b[k] - base[k]).double()
    want = a[k].double() + 0.8 * (db - da * (da * db).sum() / (da * da).sum())
    assert torch.allclose(got[k].double(), want, rtol=1e-5, atol=1e-6)
    k = "model.layers.0.mlp.up_proj.weight"  # geometric_sum
    x, y = a[k], b[k]
    want = torch.where(x * y > 0, torch.sign(x) * x.abs() ** 0.7 * y.abs() ** 0.3, torch.zeros_like(x))
    assert torch.allclose(got[k], want, rtol=1e-5, atol=1e-6)
    k = "model.embed_tokens.weight"  # crossover: low frequencies of a, high ones of b
    fa, fb = torch.fft.fft2(a[k].double()), torch.fft.fft2(b[k].double())
    f0 = torch.fft.fftfreq(16, dtype=torch.float64)[:, None]
    f1 = torch.fft.fftfreq(8, dtype=torch.float64)[None, :]
    low = (f0 ** 2 + f1 ** 2).sqrt() / (0.5 * 2 ** 0.5) < 0.3
    want = torch.fft.ifft2(torch.where(low, fa, fb)).real
    assert torch.allclose(got[k].double(), want, atol=1e-5)
    assert torch.equal(got["model.norm.weight"], base["model.norm.weight"])


def test_plugins_are_off_unless_the_user_allows_them(folder):
    r = recipe(folder, '    "*" => geometric_sum(math, code)')
    res = CliRunner().invoke(main, ["check", str(r)])
    assert res.exit_code == 1 and "E116" in res.output and "--allow-plugins" in res.output
    assert "E102" not in res.output  # the refused file's methods are not reported as unknown
    res = CliRunner().invoke(main, ["check", str(r), "--allow-plugins"])
    assert res.exit_code == 0, res.output
    assert "W005" in res.output and "runs Python code" in res.output and "methods.py" in res.output


def test_an_elementwise_plugin_streams_in_row_chunks(folder, tmp_path):
    r = recipe(folder, '    "*" => geometric_sum(math, code, alpha = 0.3)')
    c = ml.compile(r, allow_plugins=True)
    plan = c.emit("plan", 1024)
    assert "plugin" in plan and "rows 0:" in plan
    whole = written(c.run(tmp_path / "whole"))
    chunked = written(ml.compile(r, allow_plugins=True).run(tmp_path / "chunked", memory_budget=2048))
    for k in whole:
        assert torch.equal(whole[k], chunked[k]), k
    # a whole-tensor method is not chunked: the plan says why
    r2 = recipe(folder, '    "*" => add_perpendicular(math, code, base)')
    assert "rows 0:" not in ml.compile(r2, allow_plugins=True).emit("plan", 1024)


def test_an_installed_entry_point_needs_no_import(folder, tmp_path, monkeypatch):
    site = tmp_path / "site"
    dist = site / "mergelang_extra-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mergelang-extra\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mergelang.methods]\ntwice_mean = mergelang_extra_mod:twice_mean\n")
    (site / "mergelang_extra_mod.py").write_text(
        "import torch, mergelang\n\n@mergelang.method(elementwise=True)\n"
        "def twice_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:\n    return a + b\n")
    monkeypatch.syspath_prepend(str(site))
    r = recipe(folder, '    "*" => twice_mean(math, code)', header="")
    c = ml.compile(r)  # installed methods need no opt-in: installing the package ran its code
    assert any(w.code == "W005" and "installed package" in w.message for w in c.warnings)
    got = written(c.run(tmp_path / "out"))
    a, b = tensors(folder, "math"), tensors(folder, "code")
    for k in SHAPES:
        assert torch.equal(got[k], a[k] + b[k])


def _first_error(exc: pytest.ExceptionInfo):
    return next(d for d in exc.value.diagnostics if d.is_error)


def _codes(exc: pytest.ExceptionInfo) -> list[str]:
    return [d.code for d in exc.value.diagnostics]


def test_E114_plugin_file_missing_or_failing(folder):
    r = recipe(folder, '    "*" => base', header='import "nope.py"')
    with pytest.raises(MergelangError) as exc:
        ml.compile(r, allow_plugins=True)
    assert "E114" in _codes(exc)
    (folder / "bad.py").write_text("raise RuntimeError('boom')\n")
    r = recipe(folder, '    "*" => base', header='import "bad.py"')
    with pytest.raises(MergelangError) as exc:
        ml.compile(r, allow_plugins=True)
    assert "E114" in _codes(exc) and "boom" in _first_error(exc).message


@pytest.mark.parametrize("body, call, words", [
    ("def f(a, b: torch.Tensor) -> torch.Tensor:\n    return b\n", "f(math, code)", "needs an annotation"),
    ("def f(a: torch.Tensor, k: float = 1.0) -> torch.Tensor:\n    return a\n", "f([math, code])",
     "one tensor, not a list"),
    ("def f(a: list[torch.Tensor]) -> torch.Tensor:\n    return a[0]\n", "f(math)", "a list of models"),
    ("def f(a: torch.Tensor, k: float = 1.0) -> torch.Tensor:\n    return a\n", 'f(math, k = "x")',
     "takes a number"),
    ("def f(a: torch.Tensor, k: float = 1.0) -> torch.Tensor:\n    return a\n", "f(math, k = code)",
     "takes a number"),
])
def test_E115_plugin_signature_mismatch(folder, body, call, words):
    (folder / "p.py").write_text(f"import torch, mergelang\n\n@mergelang.method\n{body}")
    r = recipe(folder, f'    "*" => {call}', header='import "p.py"')
    with pytest.raises(MergelangError) as exc:
        ml.compile(r, allow_plugins=True)
    d = _first_error(exc)
    assert d.code == "E115" and words in d.message, d.message


def test_E115_shape_rule_and_name_clash(folder):
    (folder / "p.py").write_text(
        "import torch, mergelang\n\n@mergelang.method(shape=lambda a: (a[0], a[1] + 1))\n"
        "def wide(a: torch.Tensor) -> torch.Tensor:\n    return a\n\n"
        "@mergelang.method\ndef linear(a: torch.Tensor) -> torch.Tensor:\n    return a\n")
    r = recipe(folder, '    "*norm*" => base\n    "*" => wide(math)', header='import "p.py"')
    with pytest.raises(MergelangError) as exc:
        ml.compile(r, allow_plugins=True)
    assert any(d.code == "E115" and "`linear`" in d.message for d in exc.value.diagnostics)
    (folder / "p.py").write_text(
        "import torch, mergelang\n\n@mergelang.method(shape=lambda a: 1 / 0)\n"
        "def wide(a: torch.Tensor) -> torch.Tensor:\n    return a\n")
    with pytest.raises(MergelangError) as exc:
        ml.compile(r, allow_plugins=True)
    assert _first_error(exc).code == "E115" and "shape rule" in _first_error(exc).message


@pytest.mark.parametrize("ret, words", [("a[:1]", "promised"), ("1 / 0 * a", "ZeroDivisionError"),
                                        ("a.to(torch.int64)", "not float values")])
def test_E117_plugin_failing_at_run_time(folder, tmp_path, ret, words):
    (folder / "p.py").write_text("import torch, mergelang\n\n@mergelang.method\n"
                                 f"def f(a: torch.Tensor) -> torch.Tensor:\n    return {ret}\n")
    r = recipe(folder, '    "*" => f(math)', header='import "p.py"')
    c = ml.compile(r, allow_plugins=True)
    with pytest.raises(MergelangError) as exc:
        c.run(tmp_path / "out")
    d = _first_error(exc)
    assert d.code == "E117" and words in d.message, d.message
    assert not (tmp_path / "out").exists()


def test_methods_lists_nothing_new_and_module_api():
    # the decorator works as a plain function too, and keeps the function callable
    from mergelang.lang.plugins import PluginError

    @ml.method(elementwise=True)
    def half(a: torch.Tensor) -> torch.Tensor:
        return a / 2

    assert half.name == "half" and torch.equal(half(torch.ones(2)), torch.full((2,), 0.5))
    with pytest.raises(PluginError):
        ml.method(lambda x: x)
    assert json.dumps(half.params, default=str)


def test_W006_a_plugin_file_without_methods(folder):
    (folder / "empty.py").write_text("X = 1\n")
    r = recipe(folder, '    "*" => base', header='import "empty.py"')
    c = ml.compile(r, allow_plugins=True)
    assert any(w.code == "W006" for w in c.warnings)


def test_the_example_recipe_runs(folder, tmp_path):
    """examples/plugins/plugins.mrg as shipped, with its models pointed at tiny ones."""
    example = REPO / "examples" / "plugins" / "plugins.mrg"
    c = ml.compile(example, allow_plugins=True, base=str(folder / "base"), math=str(folder / "math"),
                   code=str(folder / "code"))
    got = written(c.run(tmp_path / "out"))
    assert set(got) == set(SHAPES) and all(torch.isfinite(t).all() for t in got.values())
