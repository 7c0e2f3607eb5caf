"""Golden tests for `mergelang compile RECIPE --emit ast|graph|optimized|plan`.

The recipes live in tests/golden/emit/NAME.mrg; each refers to tiny checkpoints under `models/`
(relative to the recipe), which the test writes with deterministic tensors into a temporary
folder next to a copy of the recipe. The printed text must not contain that folder's path (it is
replaced by `<DIR>` before comparing, and must then not be needed). Regenerate with
MERGELANG_UPDATE_GOLDEN=1 pytest tests/test_emit.py (then review the diff).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import mergelang as ml
from mergelang.cli import main as cli_main

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "emit"
UPDATE = bool(os.environ.get("MERGELANG_UPDATE_GOLDEN"))
STAGES = ("ast", "graph", "optimized", "plan")
RECIPES = ("ties", "linear", "slerp_layers", "comprehension")


def _tensor(shape: tuple[int, ...], k: int) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    return (torch.arange(n, dtype=torch.float32).reshape(shape) * 0.1 + k).sin()


def model_tensors(k: int) -> dict[str, torch.Tensor]:
    return {
        "embed.weight": _tensor((8, 4), k),
        "layers.0.attn.weight": _tensor((4, 4), k + 1),
        "layers.0.norm.weight": _tensor((4,), k + 2),
        "layers.1.attn.weight": _tensor((4, 4), k + 3),
        "layers.1.norm.weight": _tensor((4,), k + 4),
        "lm_head.weight": _tensor((8, 4), k + 5).to(torch.bfloat16),
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("emit")
    for k, name in enumerate(("base", "math", "code")):
        folder = root / "models" / name
        folder.mkdir(parents=True)
        save_file(model_tensors(10 * k), str(folder / "model.safetensors"))
    for name in RECIPES + ("ties_f64",):
        shutil.copy(GOLDEN / f"{name}.mrg", root / f"{name}.mrg")
    return root


def emit(workdir: Path, name: str, stage: str) -> str:
    res = CliRunner().invoke(cli_main, ["compile", str(workdir / f"{name}.mrg"), "--emit", stage])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", RECIPES)
def test_emit_golden(workdir: Path, name: str, stage: str):
    text = emit(workdir, name, stage)
    assert str(workdir) not in text, "absolute paths leak into --emit output"
    golden = GOLDEN / f"{name}.{stage}.txt"
    if UPDATE:
        golden.write_text(text)
        return
    assert golden.exists(), f"missing {golden}; run with MERGELANG_UPDATE_GOLDEN=1"
    assert text == golden.read_text(), f"{golden.name} differs; MERGELANG_UPDATE_GOLDEN=1 to accept"


@pytest.mark.parametrize("name", RECIPES)
def test_emit_is_stable_and_matches_api(workdir: Path, name: str):
    """The same text twice (no dict-order or id leaks), and the API's emit agrees with the CLI."""
    recipe = ml.compile(workdir / f"{name}.mrg")
    try:
        for stage in ("graph", "optimized", "plan"):
            assert recipe.emit(stage) == emit(workdir, name, stage)
        assert recipe.emit("plan") == ml.compile(workdir / f"{name}.mrg").emit("plan")
    finally:
        recipe.close()


def test_emit_to_file(workdir: Path, tmp_path: Path):
    out = tmp_path / "plan.txt"
    res = CliRunner().invoke(cli_main, ["compile", str(workdir / "linear.mrg"), "--emit", "plan",
                                        "-o", str(out)])
    assert res.exit_code == 0 and res.output == ""
    assert out.read_text() == emit(workdir, "linear", "plan")


def test_optimized_is_smaller(workdir: Path):
    for name in RECIPES:
        graph = emit(workdir, name, "graph").count("\n")
        optimized = emit(workdir, name, "optimized").count("\n")
        assert optimized < graph, name


def test_emit_plan_shows_the_compute_dtype(workdir: Path):
    """option compute_dtype = "float64": the plan says so (header, float values typed f64, no
    fused loops and why); the same recipe without the option keeps its golden plan."""
    text = emit(workdir, "ties_f64", "plan")
    golden = GOLDEN / "ties_f64.plan.txt"
    if UPDATE:
        golden.write_text(text)
        return
    assert text == golden.read_text(), f"{golden.name} differs; MERGELANG_UPDATE_GOLDEN=1 to accept"
    assert "(float64 compute)" in text and "no fused CPU loops" in text
    assert "(float32 compute)" in emit(workdir, "ties", "plan")
