"""Issue 28, items 1-11: the classes of mergekit configs the importer got wrong, each against an
independent formula here (always run) and, where mergekit runs it, side by side with mergekit
0.1.5 (`test_side_by_side_fidelity`, skipped without $MERGEKIT_PYTHON; see
test_mergekit_side_by_side.py for the driver).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mergelang as ml
from mergelang.cli import main
from mergelang.interop.mergekit_import import translate
from reference import slerp as ref_slerp
from test_mergekit_side_by_side import (LAYERS, llama_tensors, mergekit_python, read_folder,
                                        run_driver, write_llama)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fidelity")
    base = llama_tensors(0)
    out = {"base": write_llama(root / "base", base)}
    for name, seed in (("a", 1), ("b", 2)):
        out[name] = write_llama(root / name, llama_tensors(seed, base))
    mistral = Path(write_llama(root / "mistral", llama_tensors(3, base)))
    cfg = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"],
                                                     "model_type": "mistral"}))
    out["mistral"] = str(mistral)
    out["lora"] = write_adapter(root / "adapter", out["base"])
    return out


def write_adapter(folder: Path, base: str) -> str:
    """A PEFT LoRA adapter (r = 2, alpha = 4) on q_proj and v_proj of every layer."""
    g = torch.Generator().manual_seed(7)
    folder.mkdir()
    sd = {}
    for i in range(LAYERS):
        for mod, rows in (("q_proj", 64), ("v_proj", 32)):
            p = f"base_model.model.model.layers.{i}.self_attn.{mod}."
            sd[p + "lora_A.weight"] = torch.randn(2, 64, generator=g) * 0.1
            sd[p + "lora_B.weight"] = torch.randn(rows, 2, generator=g) * 0.1
    save_file(sd, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA",
        "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "bias": "none",
        "fan_in_fan_out": False, "lora_dropout": 0.0}))
    return str(folder)


def tensors(folder: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def imported(cfg: dict | str, **kw) -> str:
    res = translate(yaml.safe_load(cfg) if isinstance(cfg, str) else cfg, **kw)
    assert not res.errors, [d.render() for d in res.errors]
    return res.text


def evaluate(text: str) -> dict[str, torch.Tensor]:
    r = ml.compile(text)
    try:
        return r.evaluate()
    finally:
        r.close()


# ---------------------------------------------------------------- 1: partial layer_range

def test_partial_layer_range_writes_the_covered_layers_with_gradients_over_them(folders, tmp_path):
    cfg = {"slices": [{"sources": [{"model": folders["base"], "layer_range": [0, 3]},
                                   {"model": folders["a"], "layer_range": [0, 3]}]}],
           "merge_method": "slerp", "base_model": folders["base"],
           "parameters": {"t": [{"filter": "mlp", "value": [0, 1]}, {"value": 0.3}]}}
    text = imported(cfg)
    r = ml.compile(text)
    try:
        r.run(tmp_path / "out")
    finally:
        r.close()
    got = read_folder(tmp_path / "out")
    base, a = tensors(folders["base"]), tensors(folders["a"])
    want_names = {k for k in base if not re.match(r"model\.layers\.([3-9])\.", k)}
    assert set(got) == want_names  # layers 0..2 only, as mergekit writes them
    for k in want_names:
        m = re.match(r"model\.layers\.(\d+)\.", k)
        t = (int(m.group(1)) / 2 if "mlp" in k else 0.3) if m else 0.3  # t = i / (3 - 1)
        torch.testing.assert_close(got[k], ref_slerp(base[k], a[k], t), rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3


def test_two_partial_slices_spread_gradients_per_slice(folders):
    cfg = {"slices": [{"sources": [{"model": folders[n], "layer_range": [0, 1],
                                    "parameters": {"weight": w}} for n, w in (("a", 1.0), ("b", [0.2, 0.9]))]},
                      {"sources": [{"model": folders[n], "layer_range": [1, 3],
                                    "parameters": {"weight": w}} for n, w in (("a", 1.0), ("b", [0.2, 0.9]))]}],
           "merge_method": "linear"}
    got = evaluate(imported(cfg))
    a, b = tensors(folders["a"]), tensors(folders["b"])
    assert {k for k in got if "layers" in k} == {k for k in a if re.match(r"model\.layers\.[0-2]\.", k)}
    for k in got:
        m = re.match(r"model\.layers\.(\d+)\.", k)
        # slice 1 (one layer): t = 1 -> 0.9; slice 2: layer 1 t = 0, layer 2 t = 1; outside: t = 0
        wb = {None: 0.2, 0: 0.9, 1: 0.2, 2: 0.9}[int(m.group(1)) if m else None]
        torch.testing.assert_close(got[k], (a[k] + wb * b[k]) / (1 + wb), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- 2: unknown parameters

def test_unknown_and_misspelt_parameters_are_dropped_with_w101(folders):
    cfg = {"models": [{"model": folders["a"], "parameters": {"weight": 1.0, "density": 0.5, "densty": 2}},
                      {"model": folders["b"], "parameters": {"weight": 0.5, "density": 0.5}}],
           "merge_method": "ties", "base_model": folders["base"],
           "parameters": {"nomalize": False, "embed_slerp": True}}
    res = translate(cfg)
    msgs = [d.message for d in res.diagnostics if d.code == "W101"]
    assert any("`nomalize`" in m and "did you mean `normalize`" in m and "ties takes" in m for m in msgs)
    assert any("`embed_slerp`" in m for m in msgs) and any("`densty`" in m for m in msgs)
    assert "nomalize" not in res.text.split("merge from")[1] and "embed_slerp" not in res.text.split("# NOTE")[0]
    hand = imported({**cfg, "parameters": {}, "models": [
        {"model": folders["a"], "parameters": {"weight": 1.0, "density": 0.5}}, cfg["models"][1]]})
    torch.testing.assert_close(evaluate(res.text), evaluate(hand), rtol=0, atol=0)


def test_sce_density_is_not_a_parameter(folders):
    cfg = {"models": [{"model": folders["a"], "parameters": {"density": 0.5}}, {"model": folders["b"]}],
           "merge_method": "sce", "base_model": folders["base"]}
    res = translate(cfg)
    assert any(d.code == "W101" and "`density`" in d.message and "sce takes int8_mask, select_topk"
               in d.message for d in res.diagnostics)
    assert "density" not in res.text.split("merge from")[1]


def test_per_model_parameters_missing_on_some_models_take_mergekits_defaults(folders):
    cfg = {"models": [{"model": folders["a"], "parameters": {"weight": 1.0, "density": 0.8, "gamma": 0.05}},
                      {"model": folders["b"], "parameters": {"weight": 0.5, "density": 0.6}}],
           "merge_method": "breadcrumbs", "base_model": folders["base"]}
    assert "gamma = [0.05, 0.01]" in imported(cfg)  # mergekit's gamma default
    cfg = {**cfg, "merge_method": "della", "models": [
        {"model": folders["a"], "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}},
        {"model": folders["b"], "parameters": {"weight": 0.5, "density": 0.5}}]}
    assert "epsilon = [0.1, 0.15]" in imported(cfg)  # and DELLA's epsilon default


# ---------------------------------------------------------------- 3, 4: DELLA, DARE

def test_della_model_with_density_one_is_not_pruned(folders):
    cfg = {"models": [{"model": folders["a"], "parameters": {"weight": 1.0, "density": 1.0}},
                      {"model": folders["b"], "parameters": {"weight": 0.0, "density": 0.5}}],
           "merge_method": "della_linear", "base_model": folders["base"], "parameters": {"epsilon": 0.1}}
    got = evaluate(imported(cfg))
    base, a = tensors(folders["base"]), tensors(folders["a"])
    for k in base:  # b has weight 0: base + a's whole task vector, unscaled
        torch.testing.assert_close(got[k], base[k] + (a[k] - base[k]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_dare_and_della_keep_the_task_vectors_l1_norm(folders, method):
    cfg = {"models": [{"model": folders["a"], "parameters": {"weight": 1.0, "density": 0.5}}],
           "merge_method": method, "base_model": folders["base"], "parameters": {"epsilon": 0.2}
           if method.startswith("della") else {}}
    text = imported(cfg)
    assert 'rescale = "l1"' in text
    got = evaluate(text)
    base, a = tensors(folders["base"]), tensors(folders["a"])
    for k in base:
        tv, out = a[k] - base[k], got[k] - base[k]
        if tv.numel() >= 64:
            assert 0.3 < (out != 0).float().mean() < 0.7
            torch.testing.assert_close(out.abs().sum(), tv.abs().sum(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- 5: ties with rescale

def test_ties_rescale_is_mergekits_l1_rescale(folders):
    cfg = {"models": [{"model": folders["a"], "parameters": {"weight": 1.0, "density": 0.3}}],
           "merge_method": "ties", "base_model": folders["base"], "parameters": {"rescale": True}}
    text = imported(cfg)
    assert 'rescale = "l1"' in text
    got = evaluate(text)
    base, a = tensors(folders["base"]), tensors(folders["a"])
    for k in base:  # one model: the trimmed task vector, scaled back to its L1 norm
        tv = (a[k] - base[k]).flatten()
        keep = torch.zeros_like(tv, dtype=torch.bool)
        keep[torch.argsort(tv.abs(), descending=True, stable=True)[:int(0.3 * tv.numel())]] = True
        trimmed = torch.where(keep, tv, 0)
        want = base[k] + (trimmed * (tv.abs().sum() / trimmed.abs().sum())).reshape(base[k].shape)
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 6: slerp base, moe prompts

def test_slerp_base_that_is_not_one_of_the_models(folders):
    cfg = {"slices": [{"sources": [{"model": folders[n], "layer_range": [0, 4]} for n in "ab"]}],
           "merge_method": "slerp", "base_model": folders["base"], "parameters": {"t": 0.5}}
    (err,) = translate(cfg).errors
    assert err.code == "E702" and "is not one of the two models" in err.message and "got 2" not in err.message


def test_moe_with_identical_prompts_is_refused_and_same_models_warned(folders):
    experts = [{"source_model": folders[n], "positive_prompts": ["math"]} for n in "ab"]
    res = translate({"base_model": folders["base"], "gate_mode": "cheap_embed", "experts": experts})
    assert [d.code for d in res.errors] == ["E710"]
    experts = [{"source_model": folders["a"], "positive_prompts": [p]} for p in ("math", "code")]
    res = translate({"base_model": folders["base"], "gate_mode": "cheap_embed", "experts": experts})
    assert not res.errors and "W120" in [d.code for d in res.diagnostics]
    res = translate({"base_model": folders["base"], "gate_mode": "random", "experts": [
        {"source_model": folders[n]} for n in "ab"]})  # a random gate reads no prompts
    assert not res.errors


# ---------------------------------------------------------------- 7: run config.yml

def test_run_check_explain_take_a_mergekit_config(folders, tmp_path):
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump({"models": [{"model": folders["a"], "parameters": {"weight": 1.0}},
                                              {"model": folders["b"], "parameters": {"weight": 3.0}}],
                                   "merge_method": "linear", "parameters": {"nomalize": True},
                                   "dtype": "float32"}))
    runner = CliRunner()
    res = runner.invoke(main, ["run", str(cfg), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    assert "W101" in res.output and "nomalize" in res.output  # the import's warnings
    got, a, b = read_folder(tmp_path / "out"), tensors(folders["a"]), tensors(folders["b"])
    for k in a:
        torch.testing.assert_close(got[k], (a[k] + 3 * b[k]) / 4, rtol=1e-6, atol=1e-6)
    for cmd in (["check", str(cfg)], ["explain", str(cfg)]):
        res = runner.invoke(main, cmd)
        assert res.exit_code == 0 and "W101" in res.output, res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: nope\nmodels: [x]\n")
    res = runner.invoke(main, ["check", str(bad)])
    assert res.exit_code == 1 and "E703" in res.output


# ---------------------------------------------------------------- 8: Hugging Face ids

def test_hf_ids_in_the_local_cache_become_hf_models(folders, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in Path(folders["a"]).iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cfg = {"models": [{"model": "org/tiny", "parameters": {"weight": 1.0}},
                      {"model": "org/absent@v2", "parameters": {"weight": 1.0}}], "merge_method": "linear"}
    res = translate(cfg)
    assert 'model tiny = "hf:org/tiny"\n' in res.text and '"hf:org/absent@v2"' in res.text
    (w103,) = [d for d in res.diagnostics if d.code == "W103"]
    assert "org/absent" in w103.message and "`hf download org/absent --revision v2`" in (w103.help or "")
    one = evaluate(imported({"models": [{"model": "org/tiny", "parameters": {"weight": 1.0}}],
                             "merge_method": "linear"}))
    torch.testing.assert_close(one, tensors(folders["a"]), rtol=0, atol=0)


# ---------------------------------------------------------------- 9: model+lora

def test_model_plus_lora_imports_as_lora(folders):
    ref = folders["base"] + "+" + folders["lora"]
    text = imported({"models": [{"model": ref, "parameters": {"weight": 1.0}}], "merge_method": "linear"})
    assert re.search(r'model \w+ = lora\("[^"]+adapter", base = \w+\)', text), text
    got, base = evaluate(text), tensors(folders["base"])
    lora = load_file(str(Path(folders["lora"]) / "adapter_model.safetensors"))
    for k in base:  # W + (alpha / r) B A
        p = "base_model.model." + k.removesuffix(".weight")
        want = base[k] + (4 / 2) * lora[p + ".lora_B.weight"] @ lora[p + ".lora_A.weight"] \
            if p + ".lora_A.weight" in lora else base[k]
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)
    res = translate({"models": [{"model": folders["base"] + "+/no/such/adapter"}], "merge_method": "linear"})
    (err,) = res.errors
    assert err.code == "E706" and "lora(" in (err.help or "")


# ---------------------------------------------------------------- 10: architectures

def test_different_architectures_are_refused_unless_allowed(folders, tmp_path):
    cfg = {"models": [{"model": folders[n], "parameters": {"weight": 1.0}} for n in ("a", "mistral")],
           "merge_method": "linear"}
    (err,) = translate(cfg).errors
    assert err.code == "E709" and "MistralForCausalLM" in err.message and "--allow-crimes" in err.help
    text = imported(cfg, allow_crimes=True)
    assert "option allow_crimes = true" in text
    evaluate(text)
    plain = text.replace("option allow_crimes = true", "")
    with pytest.raises(ml.MergelangError) as ei:
        ml.compile(plain)
    assert "E709" in ei.value.codes
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["import-mergekit", str(path), "--allow-crimes"])
    assert res.exit_code == 0 and "option allow_crimes = true" in res.output


# ---------------------------------------------------------------- 11: comments

def _blocks(text: str) -> list[tuple[str, list[str]]]:
    """(comment, the rules under it) inside the merge block."""
    out: list[tuple[str, list[str]]] = []
    body = text.split("merge from", 1)[1]
    for line in body.splitlines()[1:]:
        s = line.strip()
        if s.startswith("#"):
            out.append((s, []))
        elif "=>" in s and out:
            out[-1][1].append(s)
    return out


def _gradient_ts(rule: str) -> list[str]:
    """The `t` argument of every `gradient(values, t)` call in a rule (balanced parentheses)."""
    out, start = [], 0
    while (k := rule.find("gradient(", start)) >= 0:
        depth, j, comma = 1, k + len("gradient("), None
        while depth:
            depth += {"(": 1, ")": -1}.get(rule[j], 0)
            if rule[j] == "," and depth == 1 and comma is None:
                comma = j
            j += 1
        out.append(rule[comma + 1:j - 1].strip())
        start = j
    return out


@pytest.mark.parametrize("cfg", [
    {"slices": [{"sources": [{"model": "{base}", "layer_range": [0, 4]}, {"model": "{a}", "layer_range": [0, 4]}]}],
     "merge_method": "slerp", "base_model": "{base}",
     "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]}},
    {"slices": [{"sources": [{"model": "{base}", "layer_range": [0, 1]}, {"model": "{a}", "layer_range": [0, 1]}]},
                {"sources": [{"model": "{base}", "layer_range": [1, 4]}, {"model": "{a}", "layer_range": [1, 4]}]}],
     "merge_method": "slerp", "base_model": "{base}",
     "parameters": {"t": [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}]}},
    {"models": [{"model": "{a}", "parameters": {"weight": [1, 0]}}, {"model": "{b}", "parameters": {"weight": 1}}],
     "merge_method": "linear"},
])
def test_comments_describe_their_rules(folders, cfg):
    text = imported(json.loads(json.dumps(cfg).replace("{base}", folders["base"]).replace(
        "{a}", folders["a"]).replace("{b}", folders["b"])))
    blocks = _blocks(text)
    for comment, rules in blocks:
        has = any("gradient(" in r for r in rules)
        assert ("gradient" in comment) == has, (comment, rules)
        m = re.search(r"from t = 0 at layer (\d+) to t = 1 at (?:layer (\d+)|the last layer)", comment)
        if m:  # the rule's t expression is 0 at the first layer and 1 at the last
            first, last = int(m.group(1)), int(m.group(2) or LAYERS - 1)
            for r in rules:
                for t_expr in _gradient_ts(r):
                    t_expr = re.sub(r"num_layers\(\w+\)", str(LAYERS), t_expr)
                    assert eval(t_expr, {"i": first}) == 0 and eval(t_expr, {"i": last}) == 1, r
        if "t = 0, their first value" in comment:
            assert all(re.search(r"gradient\(\w+, 0\)", r) for r in rules if "gradient(" in r)
    assert any("gradient" in c for c, _ in blocks) or "gradient(" not in text


# ---------------------------------------------------------------- side by side with mergekit

SIDE: dict[str, tuple[str, str, float]] = {  # name -> (config, comparison, tolerance)
    "partial_slerp": ("""
slices:
  - sources:
      - {{model: "{base}", layer_range: [0, 2]}}
      - {{model: "{a}", layer_range: [0, 2]}}
merge_method: slerp
base_model: "{base}"
parameters:
  t: [{{filter: mlp, value: [0, 1]}}, {{value: 0.3}}]
dtype: float32
""", "exact", 1e-5),
    "partial_two_slices": ("""
slices:
  - sources:
      - {{model: "{a}", layer_range: [0, 1], parameters: {{weight: 1.0}}}}
      - {{model: "{b}", layer_range: [0, 1], parameters: {{weight: [0.2, 0.9]}}}}
  - sources:
      - {{model: "{a}", layer_range: [1, 3], parameters: {{weight: 1.0}}}}
      - {{model: "{b}", layer_range: [1, 3], parameters: {{weight: [0.2, 0.9]}}}}
merge_method: linear
dtype: float32
""", "exact", 1e-6),
    "repeated_layers_merge": ("""
slices:
  - sources:
      - {{model: "{base}", layer_range: [0, 2]}}
      - {{model: "{a}", layer_range: [0, 2]}}
  - sources:
      - {{model: "{base}", layer_range: [1, 4]}}
      - {{model: "{a}", layer_range: [1, 4]}}
merge_method: slerp
base_model: "{base}"
parameters:
  t: [{{filter: self_attn, value: [0, 1]}}, {{value: 0.3}}]
dtype: float32
""", "exact", 1e-5),
    "other_layers_of_each_model": ("""
slices:
  - sources:
      - {{model: "{a}", layer_range: [0, 2], parameters: {{weight: 1.0}}}}
      - {{model: "{b}", layer_range: [2, 4], parameters: {{weight: [0.5, 2.0]}}}}
merge_method: linear
dtype: float32
""", "exact", 1e-6),
    "unknown_params": ("""
models:
  - {{model: "{a}", parameters: {{weight: 1.0, density: 0.5, densty: 3}}}}
  - {{model: "{b}", parameters: {{weight: 0.5, density: 0.7}}}}
merge_method: ties
base_model: "{base}"
parameters: {{nomalize: false, embed_slerp: true}}
dtype: float32
""", "exact", 1e-5),
    "ties_rescale": ("""
models:
  - {{model: "{a}", parameters: {{weight: 1.0, density: 0.3}}}}
  - {{model: "{b}", parameters: {{weight: 0.5, density: 0.6}}}}
merge_method: ties
base_model: "{base}"
parameters: {{rescale: true}}
dtype: float32
""", "exact", 1e-5),
    "breadcrumbs_rescale": ("""
models:
  - {{model: "{a}", parameters: {{weight: 1.0, density: 0.8, gamma: 0.05}}}}
  - {{model: "{b}", parameters: {{weight: 0.5, density: 0.6}}}}
merge_method: breadcrumbs_ties
base_model: "{base}"
parameters: {{rescale: true}}
dtype: float32
""", "exact", 1e-5),
    "della_density_one": ("""
models:
  - {{model: "{a}", parameters: {{weight: 1.0, density: 1.0}}}}
  - {{model: "{b}", parameters: {{weight: 1.0, density: 0.5}}}}
merge_method: della_linear
base_model: "{base}"
parameters: {{epsilon: 0.2}}
dtype: float32
""", "random", 0.0),
    "dare_linear_l1": ("""
models:
  - {{model: "{a}", parameters: {{weight: 1.0, density: 0.3}}}}
merge_method: dare_linear
base_model: "{base}"
dtype: float32
""", "random", 0.0),
    "model_plus_lora": ("""
models:
  - {{model: "{base}+{lora}", parameters: {{weight: 1.0}}}}
merge_method: linear
dtype: float32
""", "exact", 1e-5),
    "crimes": ("""
models:
  - {{model: "{a}", parameters: {{weight: 1.0}}}}
  - {{model: "{mistral}", parameters: {{weight: 1.0}}}}
merge_method: linear
dtype: float32
""", "refused", 0.0),
}


@pytest.fixture(scope="module")
def mergekit_side(folders, tmp_path_factory):
    if mergekit_python() is None:
        pytest.skip("no mergekit venv ($MERGEKIT_PYTHON or $MERGEKIT)")
    root = tmp_path_factory.mktemp("fidelity_mk")
    jobs = []
    for name, (text, _, _) in SIDE.items():
        (root / f"{name}.yml").write_text(text.format(**folders))
        jobs.append([str(root / f"{name}.yml"), str(root / name), "yaml"])
    return run_driver(jobs, root)


@pytest.mark.parametrize("name", list(SIDE))
def test_side_by_side_fidelity(name, folders, mergekit_side):
    text, kind, tol = SIDE[name]
    mk = mergekit_side[name]
    res = translate(yaml.safe_load(text.format(**folders)))
    if kind == "refused":
        assert isinstance(mk, str) and "allow-crimes" in mk, mk
        assert [d.code for d in res.errors] == ["E709"]
        return
    assert isinstance(mk, Path), f"mergekit failed: {mk}"
    assert not res.errors, [d.render() for d in res.errors]
    ours, theirs = evaluate(res.text), read_folder(mk)
    assert ours.keys() == theirs.keys()
    base = tensors(folders["base"])
    for k in theirs:
        o, t = ours[k], theirs[k].to(torch.float32)
        assert o.shape == t.shape, k
        if kind == "exact":
            torch.testing.assert_close(o, t, rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")
        elif o.numel() >= 1024:  # random drops: kept fraction and L1 norm of the change
            do, dt = o - base[k], t - base[k]
            assert abs((do != 0).float().mean() - (dt != 0).float().mean()) < 0.05, k
            assert abs(do.abs().sum() / dt.abs().sum() - 1) < 0.05, k
