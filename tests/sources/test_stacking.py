"""Layer stacking: `stack_layers([layer_range(a, 0, 3), layer_range(b, 1, 4)])` renumbers layers,
and as the `merge from` model its layer count goes into the output's config.json (transformers
loads the result)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mergelang as ml  # noqa: E402
from test_e2e import load_folder  # noqa: E402


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    spec = importlib.util.spec_from_file_location("mtm", REPO / "examples" / "make_tiny_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    root = tmp_path_factory.mktemp("stack")
    return {k: Path(v) for k, v in mod.make_models(root / "models", seed=0, noise=0.05).items()}


def test_frankenmerge_folder_loads_with_new_layer_count(hf_models, tmp_path):
    transformers = pytest.importorskip("transformers")
    recipe = (f'model math = "{hf_models["math"]}"\nmodel code = "{hf_models["code"]}"\n'
              "model franken = stack_layers([layer_range(math, 0, 3), layer_range(code, 1, 4)])\n"
              'option dtype = "bfloat16"\nmerge from franken {\n    "*" => franken\n}\n')
    r = ml.compile(recipe)
    out = r.run(tmp_path / "out")
    r.close()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6 and cfg["torch_dtype"] == "bfloat16"
    got = load_folder(out)
    math, code = load_folder(hf_models["math"]), load_folder(hf_models["code"])
    for new, (src, old) in {0: (math, 0), 2: (math, 2), 3: (code, 1), 5: (code, 3)}.items():
        name = "model.layers.{}.mlp.up_proj.weight"
        assert torch.equal(got[name.format(new)], src[name.format(old)].to(torch.bfloat16))
    assert torch.equal(got["model.embed_tokens.weight"], math["model.embed_tokens.weight"].bfloat16())
    assert torch.equal(got["lm_head.weight"], code["lm_head.weight"].bfloat16())
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 6
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7]])).logits
    assert logits.shape == (1, 3, cfg["vocab_size"]) and torch.isfinite(logits).all()


def test_stack_layers_errors(hf_models):
    base = f'model math = "{hf_models["math"]}"\n'
    for decl, code in (("stack_layers([layer_range(math, 2, 9)])", "E203"),
                       ("stack_layers([layer_range(math, 3, 1)])", "E203"),
                       ("stack_layers([math])", "E201"),
                       ("stack_layers([layer_range(later, 0, 1)])", "E201")):
        text = base + f"model f = {decl}\nmodel later = stack_layers([layer_range(math, 0, 1)])\n" \
            'merge from math {\n "*" => math\n}\n'
        with pytest.raises(ml.MergelangError) as exc:
            ml.compile(text)
        assert exc.value.codes == [code], (decl, exc.value.render())
