"""mergekit-multi files (several `---` separated configs that use each other's names) imported
as one recipe with named blocks; compared with the same merges written by hand as separate runs."""

from __future__ import annotations

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

import mergelang as ml
from mergelang.cli import main
from mergelang.interop.mergekit_import import translate


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.weight": torch.randn(6, 4, generator=g) for i in range(3)}
    base["model.norm.weight"] = torch.randn(4, generator=g)
    out = {}
    for name in ("base", "a", "b", "c"):
        sd = base if name == "base" else {k: v + 0.3 * torch.randn(v.shape, generator=g)
                                          for k, v in base.items()}
        (root / name).mkdir()
        save_file(sd, str(root / name / "model.safetensors"))
        out[name] = str(root / name)
    return out


def docs(m):
    return yaml.safe_load_all(f"""
name: stage-1
models:
  - {{model: "{m['a']}", parameters: {{weight: 1.0, density: 0.5}}}}
  - {{model: "{m['b']}", parameters: {{weight: 1.0, density: 0.7}}}}
merge_method: ties
base_model: "{m['base']}"
---
models:
  - model: stage-1
  - model: "{m['c']}"
merge_method: slerp
base_model: stage-1
parameters: {{t: [0.1, 0.9]}}
dtype: float32
""")


def evaluate(text):
    r = ml.compile(text)
    try:
        return r.evaluate()
    finally:
        r.close()


def test_multi_documents_become_named_blocks_in_one_graph(models, tmp_path):
    res = translate(list(docs(models)))
    assert not res.errors, [d.render() for d in res.errors]
    assert 'model stage_1 = output("stage-1")' in res.text
    assert 'merge "stage-1" from base' in res.text and 'merge "final" from stage_1' in res.text
    got = evaluate(res.text)
    hand1 = "".join(f'model {n} = "{models[n]}"\n' for n in ("base", "a", "b")) + \
        'merge from base { "*" => ties(base, [a, b], weights = [1, 1], density = [0.5, 0.7]) }\n'
    r = ml.compile(hand1)
    r.run(tmp_path / "s1")
    r.close()
    hand2 = f'model s1 = "{tmp_path / "s1"}"\nmodel c = "{models["c"]}"\n' + '''merge from s1 {
    "model.layers.{i}.*" => slerp(s1, c, t = 0.1 + 0.8 * i / 2)
    "*" => slerp(s1, c, t = 0.1)
}
'''
    want = evaluate(hand2)
    for k in want:
        torch.testing.assert_close(got["final"][k], want[k], rtol=1e-6, atol=1e-7)


def test_cli_imports_a_multi_document_file(models, tmp_path):
    cfg = tmp_path / "multi.yml"
    cfg.write_text(yaml.safe_dump_all(list(docs(models))))
    out = CliRunner().invoke(main, ["import-mergekit", str(cfg), "-o", str(tmp_path / "r.mrg")])
    assert out.exit_code == 0, out.output
    run = CliRunner().invoke(main, ["run", str(tmp_path / "r.mrg"), "-o", str(tmp_path / "out")])
    assert run.exit_code == 0, run.output
    assert (tmp_path / "out" / "stage-1").is_dir() and (tmp_path / "out" / "final").is_dir()


@pytest.mark.parametrize("edit,message", [
    (lambda d: [dict(d[0], name=None), d[1]], "allows one unnamed"),
    (lambda d: [d[0], dict(d[1], name="stage-1")], "used by two documents"),
    (lambda d: [dict(d[0], name="a/b"), d[1]], "output folder name"),
    (lambda d: [dict(d[0], base_model="final"), d[1]], "cycle"),
    (lambda d: [d[0], 3], "must be a config"),
])
def test_bad_multi_files(models, edit, message):
    res = translate(edit(list(docs(models))))
    assert res.errors and res.errors[0].code == "E702" and message in res.errors[0].message


def test_different_dtypes_are_reported(models):
    d = list(docs(models))
    d[0]["dtype"] = "bfloat16"
    res = translate(d)
    assert not res.errors
    assert any(w.code == "W101" and "different dtypes" in w.message for w in res.diagnostics)
    assert 'option dtype = "float32"' in res.text
