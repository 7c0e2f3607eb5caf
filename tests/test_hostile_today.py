"""Regression tests from the hostile pass `hostile3` over the commands added on 2026-12-07
(stats --kind correlation / gram-plusplus, align(by = "activations"), import-mergekit of evolve
configs, verify of single files, outputs inside outputs, lm-eval objective specs). Each case
once gave exit 0 on a failure, an internal error (exit 3), or a silently wrong result; now a coded
diagnostic and exit 1. Notes: notes/hostile3.md."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergelang.cli import main

sys.path.insert(0, str(Path(__file__).parent / "datatools"))
import data_models as dm  # noqa: E402

MLP_PY = dm.MLP_SOURCE + '''
def exits():
    sys.exit(0)

def gen():
    yield torch.randn(2, 6)
    raise ValueError("gen fail")

_g = torch.Generator().manual_seed(0)
BATCHES = [torch.randn(16, 6, generator=_g) for _ in range(2)]
GEN = gen()
INT = 5
WRONG = [torch.randn(4, 7)]
NAN = [torch.full((4, 6), float("nan"))]
'''
GROUPS = dm.GROUPS


def cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, [*args])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exc_info
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mlp")
    (root / "mlp.py").write_text(MLP_PY)
    (root / "exitmod.py").write_text("import sys\nsys.exit(0)\n")
    ns: dict = {}
    exec(MLP_PY, ns)  # noqa: S102 - the test's own module
    torch.manual_seed(0)
    sd = {k: v.detach().clone() for k, v in ns["MLP"]().state_dict().items()}
    torch.manual_seed(1)
    sb = {k: v.detach().clone() for k, v in ns["MLP"]().state_dict().items()}
    for name, state in (("a", sd), ("b", sb)):
        (root / name).mkdir()
        save_file(state, str(root / name / "model.safetensors"))
    return root


def stats(root: Path, out: Path, data: str = "mlp.py:BATCHES", module: str = "mlp.py:MLP") -> tuple[int, str]:
    args = ["stats", str(root / "a"), str(root / "b"), "--kind", "correlation", "--data", str(root / data),
            "--module", str(root / module), "-o", str(out), "-q"]
    for g in GROUPS:
        args += ["--group", g]
    return cli(*args)


@pytest.mark.parametrize("data, module, code", [
    ("mlp.py:BATCHES", "mlp.py:exits", "E969"),     # a factory calling sys.exit(0): was exit 0
    ("mlp.py:BATCHES", "exitmod.py:MLP", "E905"),   # sys.exit(0) on import: was exit 0
    ("exitmod.py:BATCHES", "mlp.py:MLP", "E905"),
    ("mlp.py:GEN", "mlp.py:MLP", "E961"),           # the batches' iterator raises: was exit 3
    ("mlp.py:INT", "mlp.py:MLP", "E961"),           # not an iterable: was exit 3
    ("mlp.py:WRONG", "mlp.py:MLP", "E970"),         # the forward pass fails: was exit 3
    ("mlp.py:NAN", "mlp.py:MLP", "E970"),           # NaN activations: were written silently
])
def test_stats_correlation_with_failing_user_code(mlp, tmp_path, data, module, code):
    rc, text = stats(mlp, tmp_path / "c", data, module)
    assert rc == 1 and f"error[{code}]" in text, text
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def sidecar(mlp, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("side") / "c"
    rc, text = stats(mlp, out)
    assert rc == 0, text
    return out


def edited(sidecar: Path, tmp_path: Path, tensors: dict | None = None, sites: list | None = None,
           group_sites: object = None) -> Path:
    c = tmp_path / "c"
    shutil.copytree(sidecar, c)
    if tensors is not None:
        shard = next(c.glob("model-*.safetensors"))
        save_file({**load_file(str(shard)), **tensors}, str(shard))
    info = json.loads((c / "mergelang_stats.json").read_text())
    if sites is not None:
        info["sites"] = sites
    if group_sites is not None:
        info["groups"]["h0"]["sites"] = group_sites
    (c / "mergelang_stats.json").write_text(json.dumps(info))
    return c


def align_recipe(mlp: Path, c: Path, tmp_path: Path) -> Path:
    r = tmp_path / "r.mrg"
    r.write_text(f'model a = "{mlp / "a"}"\nmodel b = "{mlp / "b"}"\nmodel c = "{c}"\n'
                 f'param G = {json.dumps(GROUPS)}\n'
                 'merge from a {\n    "*" => align(b, to = a, by = "activations", stats = c, groups = G)\n}\n')
    return r


@pytest.mark.parametrize("edit", ["nan", "inf", "group_sites_int", "group_site_unknown", "sites_not_dicts",
                                  "axis"])
def test_an_edited_correlation_sidecar(mlp, sidecar, tmp_path, edit):
    k = "layers.1.weight:in.corr"
    info = json.loads((sidecar / "mergelang_stats.json").read_text())
    kw = {"nan": dict(tensors={k: torch.full((10, 10), float("nan"))}),
          "inf": dict(tensors={k: torch.full((10, 10), float("inf"))}),
          "group_sites_int": dict(group_sites=5),
          "group_site_unknown": dict(group_sites=["nope:in"]),
          "sites_not_dicts": dict(sites=[1, 2]),
          "axis": dict(sites=[{**s, "axis": 99} for s in info["sites"]])}[edit]
    r = align_recipe(mlp, edited(sidecar, tmp_path, **kw), tmp_path)
    rc, text = cli("run", str(r), "-o", str(tmp_path / "out"), "-q")
    assert rc == 1 and "error[E968]" in text, text  # nan/inf: exit 3; the JSON edits: exit 3 or a silent merge
    if edit not in ("nan", "inf"):
        assert "r.mrg:6:12" in text, text
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")

    root = tmp_path_factory.mktemp("llamas")
    dm.save_llama(root / "a", 0)
    dm.save_llama(root / "b", 1)
    dm.save_llama(root / "deep", 1, num_hidden_layers=3)
    dm.write_texts(root / "d.txt")
    (root / "ids.py").write_text(
        "import torch\n"
        "def gen():\n    yield {'input_ids': torch.randint(3, 10, (2, 5))}\n    raise ValueError('gen fail')\n"
        "GEN = gen()\nBIG = [{'input_ids': torch.full((2, 5), 10 ** 6)}]\nFLOAT = [{'input_ids': torch.rand(2, 5)}]\n")
    return root


def test_correlation_of_models_of_different_depth(llamas, tmp_path):
    rc, text = cli("stats", str(llamas / "a"), str(llamas / "deep"), "--kind", "correlation",  # was accepted
                   "--data", str(llamas / "d.txt"), "-o", str(tmp_path / "c"), "-q")
    assert rc == 1 and "error[E967]" in text and "differs between" in text, text


@pytest.mark.parametrize("kind", ["gram", "fisher", "gram-plusplus", "correlation"])
@pytest.mark.parametrize("data, code", [("GEN", "E961"), ("BIG", "E970"), ("FLOAT", "E970")])
def test_stats_on_batches_the_model_cannot_read(llamas, tmp_path, kind, data, code):
    two = kind in ("gram-plusplus", "correlation")
    args = ["stats", str(llamas / "a"), *([str(llamas / "b")] if two else []), "--kind", kind,
            "--data", f"{llamas / 'ids.py'}:{data}", "-o", str(tmp_path / "g1"), "-q"]
    if kind == "gram-plusplus":
        args += ["-o", str(tmp_path / "g2"), "--alpha", "0.5"]
    rc, text = cli(*args)
    assert rc == 1 and f"error[{code}]" in text, text  # was exit 3 (internal error)
    assert not (tmp_path / "g1").exists()


def test_evolve_merge_method_that_is_not_a_string(tmp_path):
    cfg = tmp_path / "e.yml"
    cfg.write_text(yaml.safe_dump({"genome": {"models": ["x", "y"], "merge_method": ["linear"]},
                                    "tasks": ["t"]}))
    rc, text = cli("import-mergekit", str(cfg), "-o", str(tmp_path / "r.mrg"))
    assert rc == 1 and "error[E711]" in text, text  # was exit 3 (unhashable list)


@pytest.fixture()
def outputs(tmp_path) -> Path:
    for name, seed in (("a", 0), ("b", 1)):
        (tmp_path / name).mkdir()
        torch.manual_seed(seed)
        save_file({"w": torch.randn(4, 4), "n": torch.randn(4)}, str(tmp_path / name / "model.safetensors"))
    (tmp_path / "r.mrg").write_text(f'model a = "{tmp_path / "a"}"\nmodel b = "{tmp_path / "b"}"\n'
                                    'merge from a { "*" => linear([a, b]) }\n')
    return tmp_path


def test_verify_a_truncated_or_edited_single_file(outputs):
    f = outputs / "m.safetensors"
    assert cli("run", str(outputs / "r.mrg"), "-o", str(f), "-q")[0] == 0
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    hdr = json.loads(raw[8:8 + n])
    name = next(k for k in hdr if k != "__metadata__")
    hdr[name]["shape"] = [1, 1]
    hb = json.dumps(hdr).encode()
    for label, data in (("cut", raw[:-10]), ("shape", struct.pack("<Q", len(hb)) + hb + raw[8 + n:])):
        bad = outputs / f"{label}.safetensors"
        bad.write_bytes(data)
        rc, text = cli("verify", str(bad))
        assert rc == 1 and "error[E420]" in text and "not a readable safetensors file" in text, text


def test_only_inspect_replaces_its_report_inside_an_output(outputs):
    out = outputs / "out"
    assert cli("run", str(outputs / "r.mrg"), "-o", str(out), "-q")[0] == 0
    assert cli("inspect", str(outputs / "a"), str(outputs / "b"), "-o", str(outputs / "rep"), "-q")[0] == 0
    shutil.copytree(outputs / "rep", out / "rep")  # an inspect report inside an output
    rc, text = cli("inspect", str(outputs / "a"), str(outputs / "b"), "-o", str(out / "rep"), "--force", "-q")
    assert rc == 0, text  # the documented exception
    rc, text = cli("run", str(outputs / "r.mrg"), "-o", str(out / "rep"), "--force", "-q")
    assert rc == 1 and "error[E403]" in text, text  # was: a merge output written inside the output
    assert (out / "rep" / "report.json").is_file()


@pytest.mark.parametrize("spec", ["t=/x", "t=acc/", "t=acc=x", "t*0", "t*0,u*1e-400", "t*nan", "t*-inf", "t*"])
def test_lm_eval_spec_errors(spec):
    from mergelang.data.objectives import task_entries
    from mergelang.diagnostics import MergelangError

    with pytest.raises(MergelangError) as info:
        task_entries(spec)
    assert info.value.codes == ["E966"]


def test_lm_eval_spec_is_read_before_lm_eval_is_imported(monkeypatch, tmp_path):
    import mergelang as ml

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed: the spec error still comes first
    with pytest.raises(ml.MergelangError) as info:
        ml.objectives.lm_eval("t=/x", config=tmp_path)
    assert info.value.codes == ["E966"]


def test_python_api_settings_of_the_wrong_type(mlp, tmp_path, monkeypatch):
    import mergelang as ml

    with pytest.raises(ml.MergelangError) as info:  # was AttributeError: 'int' object has no attribute 'partition'
        ml.stats([mlp / "a", mlp / "b"], f"{mlp / 'mlp.py'}:BATCHES", kind="correlation",
                 module=f"{mlp / 'mlp.py'}:MLP", groups=[1])
    assert info.value.codes == ["E967"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ml.MergelangError) as info:  # a string of 2 characters was 2 folders: "g" and "1"
        ml.regmeanpp([mlp / "a", mlp / "b"], f"{mlp / 'mlp.py'}:BATCHES", out="g1")
    assert info.value.codes == ["E965"]
    assert list(tmp_path.iterdir()) == []


def test_evolve_import_never_replaces_a_task_yaml_it_read(llamas, tmp_path):
    a, b = llamas / "a", llamas / "b"
    cfg = tmp_path / "e.yml"
    cfg.write_text(yaml.safe_dump({"genome": {"models": [str(a), str(b)], "merge_method": "linear"},
                                   "tasks": ["t1"], "apply_chat_template": False}))
    task = tmp_path / "t1.yaml"
    task.write_text("task: t1\ndataset_path: json\n")
    rc, text = cli("import-mergekit", str(cfg), "-o", str(task), "--force")
    assert rc == 1 and "error[E404]" in text, text  # was: the task YAML replaced by the recipe
    assert task.read_text() == "task: t1\ndataset_path: json\n"
    rc, text = cli("import-mergekit", str(cfg), "-o", str(tmp_path / "r.mrg"))
    assert rc == 0 and "--lm-eval-include" in text, text


def test_align_stats_given_as_a_single_file(mlp, sidecar, tmp_path):
    r = align_recipe(mlp, next(sidecar.glob("model-*.safetensors")), tmp_path)
    rc, text = cli("check", str(r))
    assert rc == 1 and "error[E968]" in text and "not a local folder" in text and "in None" not in text, text
