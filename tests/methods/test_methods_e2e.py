"""New methods through the whole path: a recipe over safetensors checkpoints on disk, run by the
CLI into a sharded output folder, gives bit-identical tensors to the in-memory `ml.merge`, and a
second run with the same seed is bit-identical (random methods)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mergelang as ml
from mergelang.cli import main

SHAPES = {"model.embed.weight": (16, 8), "model.layers.0.mlp.weight": (12, 8),
          "model.layers.1.mlp.weight": (12, 8), "model.norm.weight": (8,)}
RULES = {
    "dare": "dare_ties(base, [a, b], weights = [1, 0.5], density = 0.4, seed = 5)",
    "della": "della(base, [a, b], density = 0.5, epsilon = 0.1, seed = 2)",
    "breadcrumbs": "breadcrumbs_ties(base, [a, b], density = 0.8, gamma = 0.1)",
    "stock": "model_stock(base, [a, b])",
    "karcher": "karcher([a, b], weights = [1, 2])",
    "tsv": "tsv_merge(base, [a, b])",
    "iso_cts": "iso_cts(base, [a, b], common_space_fraction = 0.5)",
    "lines": "base + lines(a - base, alpha = 0.5, beta = 0.5, num_layers = 2)",
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    g = torch.Generator().manual_seed(0)
    sds = {}
    for name in ("base", "a", "b"):
        sd = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
        save_file(sd, str(root / f"{name}.safetensors"))
        sds[name] = sd
    return root, sds


def _read(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / f)))
    return out


@pytest.mark.parametrize("method", sorted(RULES))
def test_disk_run_matches_in_memory_merge(ckpts, tmp_path, method):
    root, sds = ckpts
    recipe = tmp_path / "r.mrg"
    recipe.write_text("\n".join(f'model {n} = "{root / (n + ".safetensors")}"' for n in sds)
                      + f'\nmerge from base {{\n    "*" => {RULES[method]}\n}}\n')
    for run in ("one", "two"):
        result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / run), "-q"])
        assert result.exit_code == 0, result.output
    one, two = _read(tmp_path / "one"), _read(tmp_path / "two")
    mem = ml.merge(RULES[method], **sds)
    assert set(one) == set(SHAPES)
    for k in SHAPES:
        assert torch.equal(one[k], two[k]), k
        assert torch.equal(one[k], mem[k]), k


def test_example_recipe_runs(tmp_path):
    import importlib.util
    import shutil
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples"
    spec = importlib.util.spec_from_file_location("mk", examples / "make_tiny_models.py")
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    mk.make_models(tmp_path / "models", seed=0)
    shutil.copy(examples / "dare_della.mrg", tmp_path / "dare_della.mrg")
    runner = CliRunner()
    for run in ("one", "two"):
        result = runner.invoke(main, ["run", str(tmp_path / "dare_della.mrg"), "-o",
                                      str(tmp_path / run), "-q"])
        assert result.exit_code == 0, result.output
    one, two = _read(tmp_path / "one"), _read(tmp_path / "two")
    assert all(torch.equal(one[k], two[k]) for k in one)
    result = runner.invoke(main, ["run", str(tmp_path / "dare_della.mrg"), "-o",
                                  str(tmp_path / "three"), "-q", "--set", "seed=1"])
    assert result.exit_code == 0, result.output
    three = _read(tmp_path / "three")
    assert any(not torch.equal(one[k], three[k]) for k in one if ".mlp." in k)
