"""`import-mergekit` against hostile configs (issue 27: items 9, 10, 17, 22 and the internal
errors): every one is a coded diagnostic within a second, never a hang, a memory blow-up, an
internal error or recipe code injected from the config.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import mergelang as ml
from mergelang.cli import main
from mergelang.interop.mergekit_import import translate
from mergelang.lang import ast

REPO = Path(__file__).resolve().parents[2]


def write_model(folder: Path, seed: int, layers: int = 4, arch: str = "LlamaForCausalLM") -> str:
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(6, 4, generator=g),
          "model.norm.weight": torch.randn(4, generator=g), "lm_head.weight": torch.randn(6, 4, generator=g)}
    for i in range(layers):
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(5, 4, generator=g)
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(4, 4, generator=g)
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": [arch], "num_hidden_layers": layers,
                                                    "model_type": "llama"}))
    return str(folder)


def cli(*args: str) -> tuple[int, str, float]:
    start = time.perf_counter()
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.output, time.perf_counter() - start


def codes(cfg) -> list[str]:
    return [d.code for d in translate(cfg).diagnostics]


# ---------------------------------------------------------------- 9: devices, FIFOs, big files

def test_dev_zero_is_refused_at_once():
    code, out, took = cli("import-mergekit", "/dev/zero")
    assert code == 1 and "E701" in out and "not a regular file" in out, out
    assert took < 1.0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "config.yml"
    os.mkfifo(fifo)
    code, out, took = cli("import-mergekit", str(fifo))
    assert code == 1 and "E701" in out and "not a regular file" in out, out
    assert took < 1.0


def test_folder_oversized_and_binary_files_are_refused(tmp_path):
    big = tmp_path / "big.yml"
    big.write_bytes(b"# " + b"x" * (5 * 1024 * 1024))
    binary = tmp_path / "bin.yml"
    binary.write_bytes(b"\xff\xfe\x00merge_method: linear")
    for path, why in ((big, "more than the 524288 bytes"), (binary, "not UTF-8")):
        code, out, _ = cli("import-mergekit", str(path))
        assert code == 1 and "E701" in out and why in out, out
    from mergelang.diagnostics import MergelangError
    from mergelang.interop.mergekit_import import import_file

    with pytest.raises(MergelangError) as ei:  # the CLI says so first (a usage error)
        import_file(tmp_path)
    assert ei.value.codes == ["E701"] and "a folder" in str(ei.value)


# ---------------------------------------------------------------- 10: alias bombs, depth, digits

def laughs(levels: int) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for k in range(1, levels):
        lines.append(f"l{k}: &l{k} [" + ", ".join([f"*l{k - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_fast(tmp_path):
    path = tmp_path / "bomb.yml"
    path.write_text(laughs(9) + "merge_method: linear\nmodels: [a]\nparameters: {weight: *l8}\n")
    code, out, took = cli("import-mergekit", str(path))
    assert code == 1 and "E701" in out and "expands to more than" in out, out
    assert took < 1.0 and len(out) < 1000


def test_a_long_value_is_cut_in_messages(models):
    cfg = {"models": [{"model": models["a"], "parameters": {"weight": 1.0}}],
           "merge_method": "linear", "parameters": {"normalize": ["x" * 50] * 2000}}
    res = translate(cfg)
    (err,) = res.errors
    assert err.code == "E705" and "..." in err.message and len(err.message) < 200, err.message


def test_deep_nesting_and_huge_numbers_are_coded(tmp_path):
    deep = tmp_path / "deep.yml"
    deep.write_text("merge_method: linear\nmodels: " + "[" * 500 + "]" * 500 + "\n")
    digits = tmp_path / "digits.yml"
    digits.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: "
                      + "9" * 5000 + "}\n")
    for path, why in ((deep, "levels deep"), (digits, "5000 digits")):
        code, out, took = cli("import-mergekit", str(path))
        assert code == 1 and "E701" in out and why in out, out
        assert took < 1.0


def test_a_cycle_of_aliases_is_refused(tmp_path):
    path = tmp_path / "cycle.yml"
    path.write_text("merge_method: linear\nmodels: &m [*m]\n")
    code, out, _ = cli("import-mergekit", str(path))
    assert code == 1 and "E701" in out, out


# ---------------------------------------------------------------- internal errors -> coded

@pytest.mark.parametrize("cfg,code", [
    ({"merge_method": "linear", "models": 5}, "E702"),
    ({"merge_method": "linear", "models": ["a"], "parameters": 7}, "E702"),
    ({"merge_method": ["linear"], "models": ["a"]}, "E703"),
    ({"merge_method": {"x": 1}, "models": ["a"]}, "E703"),
    ({"merge_method": "linear", "models": [["a"]]}, "E702"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": [1]}]}, "E702"),
    ({"merge_method": "linear", "slices": [{"sources": [5]}]}, "E702"),
    ({"merge_method": "linear", "slices": 3}, "E702"),
    ({"merge_method": "linear", "base_model": 5, "models": ["a"]}, "E702"),
    ({"base_model": "b", "experts_per_token": "two", "experts": [{"source_model": "x"}]}, "E705"),
    ({"base_model": "b", "experts_per_token": 1.7, "experts": [{"source_model": "x"}] * 2}, "E705"),
    ({"base_model": "b", "gate_mode": ["hidden"], "experts": [{"source_model": "x"}]}, "E704"),
    ({"base_model": "b", "experts": [{"source_model": "x", "residual_scale": "big",
                                      "positive_prompts": ["a"]}]}, "E705"),
    ({"base_model": "b", "experts": [{"source_model": "x", "positive_prompts": "a"}]}, "E702"),
    ([{"merge_method": "linear", "models": ["a"]}, "text"], "E702"),
    ("just text", "E702"),
])
def test_malformed_configs_are_coded(cfg, code):
    res = translate(cfg)
    assert [d.code for d in res.errors][:1] == [code], [d.render() for d in res.diagnostics]


def test_cli_gives_exit_1_for_each_malformed_config(tmp_path):
    for k, text in enumerate(["models: 5\nmerge_method: linear\n", "parameters: 7\n",
                              "merge_method: [linear]\n", "experts_per_token: two\nexperts: [{}]\n"]):
        path = tmp_path / f"c{k}.yml"
        path.write_text(text)
        code, out, _ = cli("import-mergekit", str(path))
        assert code == 1 and "internal error" not in out and "error[E7" in out, out


# ---------------------------------------------------------------- 22: ranges, numbers

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hostile")
    return {n: write_model(root / n, seed) for n, seed in (("base", 0), ("a", 1), ("b", 2))}


def test_layer_range_past_the_last_layer_is_refused(models):
    cfg = {"slices": [{"sources": [{"model": models["a"], "layer_range": [0, 8]},
                                   {"model": models["b"], "layer_range": [0, 8]}]}],
           "merge_method": "slerp", "base_model": models["a"], "parameters": {"t": 0.5}}
    res = translate(cfg)
    assert {d.code for d in res.errors} == {"E708"}, [d.render() for d in res.diagnostics]
    assert "4 layers" in res.errors[0].message


@pytest.mark.parametrize("value", [1e999, "1e999", "-1e999", float("nan"), "9" * 5000])
def test_weights_that_are_not_finite_numbers_are_coded(models, value):
    cfg = {"models": [{"model": models["a"], "parameters": {"weight": value}},
                      {"model": models["b"], "parameters": {"weight": 1.0}}], "merge_method": "linear"}
    res = translate(cfg)
    assert [d.code for d in res.errors] == ["E705"] and "finite" in res.errors[0].message


def test_gradient_with_an_infinite_value_is_coded(models):
    cfg = {"models": [{"model": models["a"], "parameters": {"weight": [0.1, "1e999"]}},
                      {"model": models["b"], "parameters": {"weight": 1.0}}], "merge_method": "linear"}
    assert codes(cfg) == ["E705"]


# ---------------------------------------------------------------- 17: no injection

HOSTILE = ['x"\nfn linear(models, weights = none, normalize = true) { return 0 * models }\n#',
           "a\\\"b", "}#{", "q\u2028model evil = \"x\"", "r\u0085merge from a { }", 'tab\there"',
           "uni\u00e9\U0001f600"]


def _no_injection(text: str, model_names: set[str]) -> ast.Program:
    prog = ml.parse(text)
    assert not prog.of(ast.FnDef) and not prog.of(ast.Import), text
    assert {d.name for d in prog.of(ast.ModelDecl)} == model_names, text
    assert len(prog.of(ast.MergeBlock)) == 1
    for line in text.splitlines():  # every line of the text is what it says it is
        assert line.isprintable(), repr(line)
    return prog


def test_hostile_keys_filters_and_ids_never_reach_the_recipe_raw(models):
    params: dict = {k: 1 for k in HOSTILE}  # unknown parameters: dropped with W101
    params["weight"] = [{"filter": f, "value": 0.25} for f in HOSTILE] + [{"value": 0.5}]
    cfg = {"models": [{"model": models["a"], "parameters": {"weight": 1.0}},
                      {"model": models["b"], "parameters": params}]
           + [{"model": f"org/{'n'}{k}" + h.replace("/", "_"), "parameters": {"weight": 1.0}}
              for k, h in enumerate(HOSTILE[:2])],
           "merge_method": "linear", **{h: 1 for h in HOSTILE}}
    res = translate(cfg, config_path=Path("/tmp") / ("cfg\n" + HOSTILE[0].replace("/", "_") + ".yml"))
    assert not res.errors, [d.render() for d in res.errors]
    prog = ml.parse(res.text)
    _no_injection(res.text, {d.name for d in prog.of(ast.ModelDecl)})
    assert len(prog.of(ast.ModelDecl)) == 4
    w101 = [d.message for d in res.diagnostics if d.code == "W101"]
    assert any(HOSTILE[0] in m for m in w101)  # the warning names the key as it is
    # the ids come back exactly from the recipe's strings
    assert sorted(d.value.value for d in prog.of(ast.ModelDecl)) == sorted(
        [models["a"], models["b"]] + [m["model"] for m in cfg["models"][2:]])
    assert sum("can never match" in m for m in w101) == sum(not h.isprintable() for h in HOSTILE)


def test_hostile_filters_keep_mergekit_semantics(models):
    """A filter is a substring of tensor names: the hostile ones match none, `mlp` matches."""
    params: dict = {k: 1 for k in HOSTILE}
    params["weight"] = [{"filter": f, "value": 0.25} for f in HOSTILE] + [
        {"filter": 'mlp', "value": 2.0}, {"value": 0.5}]
    cfg = {"models": [{"model": models["a"], "parameters": {"weight": 1.0}},
                      {"model": models["b"], "parameters": params}], "merge_method": "linear"}
    res = translate(cfg)
    assert not res.errors
    _no_injection(res.text, {"a", "b"})
    r = ml.compile(res.text)
    try:
        got = r.evaluate()
    finally:
        r.close()
    from safetensors.torch import load_file

    a, b = (load_file(str(Path(models[n]) / "model.safetensors")) for n in "ab")
    for k in a:
        w = 2.0 if "mlp" in k else 0.5
        torch.testing.assert_close(got[k], (a[k] + w * b[k]) / (1 + w), rtol=1e-6, atol=1e-6)


def test_hostile_local_folder_names_round_trip_and_merge(tmp_path):
    names = ['we"ird}#', "back\\slash", "line\u2028sep", "nel\u0085x"]
    paths = [write_model(tmp_path / n, seed) for seed, n in enumerate(names)]
    cfg = {"models": [{"model": p, "parameters": {"weight": 1.0}} for p in paths],
           "merge_method": "linear", "dtype": "float32"}
    res = translate(cfg)
    assert not res.errors, [d.render() for d in res.errors]
    prog = _no_injection(res.text, {d.name for d in ml.parse(res.text).of(ast.ModelDecl)})
    assert sorted(d.value.value for d in prog.of(ast.ModelDecl)) == sorted(paths)
    r = ml.compile(res.text)
    try:
        got = r.evaluate()
    finally:
        r.close()
    from safetensors.torch import load_file

    sds = [load_file(str(Path(p) / "model.safetensors")) for p in paths]
    for k in sds[0]:  # linear with equal weights: the mean
        torch.testing.assert_close(got[k], sum(sd[k] for sd in sds) / len(sds), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- the fuzzer

def test_import_fuzzer_runs_a_bounded_number_of_cases():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import fuzz
    finally:
        sys.path.remove(str(REPO / "scripts"))
    stats = fuzz.fuzz_import_mergekit(cases=60, seed=1)
    assert stats["cases"] == 60 and stats["internal"] == [] and stats["slow"] == [], stats
    assert stats["coded"] + stats["ok"] == 60
    assert math.isfinite(stats["seconds"])
