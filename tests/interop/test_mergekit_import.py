"""`mergelang import-mergekit`: translated mergekit configs merge exactly like hand-written recipes.

Each test writes a typical mergekit config, translates it, and compares the merged tensors with a
recipe written by hand from mergekit's documented semantics (gradient values per layer worked out
by hand below, not with mergelang's `gradient`). Models: tiny Llama-shaped safetensors files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mergelang as ml  # noqa: E402
from mergelang.cli import main  # noqa: E402
from mergelang.interop.mergekit_import import translate  # noqa: E402

LAYERS = 4


def _tensors(seed: int, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,), "lm_head.weight": (16, 8)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (8, 8), p + "self_attn.k_proj.weight": (4, 8),
                       p + "mlp.up_proj.weight": (12, 8), p + "mlp.down_proj.weight": (8, 12),
                       p + "input_layernorm.weight": (8,)})
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        out[name] = noise if base is None else base[name] + 0.3 * noise
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mk")
    base = _tensors(0)
    paths = {}
    for name, seed in (("base", None), ("a", 1), ("b", 2), ("c", 3)):
        t = base if seed is None else _tensors(seed, base)
        path = root / f"{name}.safetensors"
        save_file(t, str(path))
        paths[name] = str(path)
    return paths


def _merge(text: str, no_warnings: bool = True) -> dict[str, torch.Tensor]:
    r = ml.compile(text)
    # translated recipes are pruned against the local reference model: no rule is dead (W001)
    assert not no_warnings or not r.warnings, [w.render() for w in r.warnings]
    try:
        return r.evaluate()
    finally:
        r.close()


def _translate(cfg: dict) -> str:
    res = translate(cfg)
    assert not res.errors, [d.render() for d in res.errors]
    return res.text


def _header(models: dict[str, str], *names: str) -> str:
    return "".join(f'model {n} = "{models[n]}"\n' for n in names)


def _assert_same(got: dict, want: dict, exact: bool = False) -> None:
    assert got.keys() == want.keys()
    for k in want:
        if exact:
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------------------------
# translations compared with hand-written recipes


def test_slerp_slices_with_gradients_and_filters(models):
    cfg = {"slices": [{"sources": [{"model": models["base"], "layer_range": [0, LAYERS]},
                                   {"model": models["a"], "layer_range": [0, LAYERS]}]}],
           "merge_method": "slerp", "base_model": models["base"],
           "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                {"value": 0.5}]},
           "dtype": "bfloat16"}
    text = _translate(cfg)
    assert 'option dtype = "bfloat16"' in text and "gradient(t_self_attn, i / 3)" in text
    # t per layer = idx / 3; [0, .5, .3, .7, 1] at t = 1/3 -> .5*(2/3) + .3/3 = 13/30, at 2/3 -> 17/30
    hand = _header(models, "base", "a") + """option dtype = "bfloat16"
merge from base {
    "model.layers.{i}.self_attn.*" => slerp(base, a, t = [0, 13 / 30, 17 / 30, 1][i])
    "model.layers.{i}.mlp.*"       => slerp(base, a, t = [1, 17 / 30, 13 / 30, 0][i])
    "*"                            => slerp(base, a, t = 0.5)
}
"""
    got, want = _merge(text), _merge(hand)
    _assert_same(got, want)
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


def test_slerp_models_config_counts_layers(models):
    cfg = {"models": [{"model": models["base"]}, {"model": models["a"]}], "merge_method": "slerp",
           "base_model": models["base"], "parameters": {"t": [0, 1]}}
    text = _translate(cfg)
    assert "num_layers(base)" in text
    # tensors outside the layers (embeddings, final norm, lm_head) take t = 0, the first value,
    # as mergekit's module planner reads them (issue 16: the importer used t = 1 after the layers)
    hand = _header(models, "base", "a") + """merge from base {
    "model.layers.{i}.*" => slerp(base, a, t = i / 3)
    "*"                  => base
}
"""
    _assert_same(_merge(text), _merge(hand))


def test_ties_per_model_weights_density_gradient_and_filter(models):
    cfg = yaml.safe_load(f"""
models:
  - model: {models['base']}
  - model: {models['a']}
    parameters: {{density: 0.5, weight: 0.5}}
  - model: {models['b']}
    parameters:
      density: [1, 0.4]
      weight:
        - filter: mlp
          value: 0.5
        - value: 0.3
merge_method: ties
base_model: {models['base']}
parameters: {{normalize: true, int8_mask: true}}
""")
    res = translate(cfg)
    assert [d.code for d in res.diagnostics] == ["W102"]  # int8_mask, reported, not dropped
    # density of b: [1, 0.4] over 4 layers -> 1, 0.8, 0.6, 0.4; outside the layers t = 0: 1
    hand = _header(models, "base", "a", "b") + """merge from base {
    "model.layers.{i}.mlp.*" => ties(base, [a, b], weights = [0.5, 0.5], density = [0.5, [1, 0.8, 0.6, 0.4][i]])
    "model.layers.{i}.*"     => ties(base, [a, b], weights = [0.5, 0.3], density = [0.5, [1, 0.8, 0.6, 0.4][i]])
    "*"                      => ties(base, [a, b], weights = [0.5, 0.3], density = [0.5, 1])
}
"""
    _assert_same(_merge(res.text), _merge(hand))


def test_linear_soup(models):
    cfg = {"models": [{"model": models[n], "parameters": {"weight": w}}
                      for n, w in (("a", 1.0), ("b", 2.0), ("c", 3.0))],
           "merge_method": "linear", "dtype": "float32"}
    text = _translate(cfg)
    assert "linear([a, b, c], weights = [1, 2, 3])" in text
    hand = _header(models, "a", "b", "c") + 'merge from a {\n "*" => (a + 2 * b + 3 * c) / 6\n}\n'
    _assert_same(_merge(text), _merge(hand))


def test_task_arithmetic_global_lambda_and_weight_gradient(models):
    cfg = {"models": [{"model": models["a"], "parameters": {"weight": [0.2, 0.8]}},
                      {"model": models["b"], "parameters": {"weight": 0.5}}],
           "merge_method": "task_arithmetic", "base_model": models["base"],
           "parameters": {"lambda": 0.9}}
    text = _translate(cfg)
    hand = _header(models, "base", "a", "b") + """merge from base {
    "model.layers.{i}.*" => base + 0.9 * ([0.2, 0.4, 0.6, 0.8][i] * (a - base) + 0.5 * (b - base))
    "*"                  => base + 0.9 * (0.2 * (a - base) + 0.5 * (b - base))
}
"""
    _assert_same(_merge(text), _merge(hand))


def test_filters_that_overlap_get_a_combined_rule(models):
    # `up_proj` tensors also contain `mlp`: weight follows the up_proj filter, density the mlp one
    cfg = {"models": [{"model": models["a"], "parameters": {
               "weight": [{"filter": "up_proj", "value": 0.9}, {"value": 0.5}],
               "density": [{"filter": "mlp", "value": 0.3}, {"value": 1.0}]}}],
           "merge_method": "ties", "base_model": models["base"]}
    text = _translate(cfg)
    assert 're"model\\.layers\\.(?P<i>\\d+)\\.(?:.*up_proj.*mlp.*|.*mlp.*up_proj.*)"' in text
    hand = _header(models, "base", "a") + """merge from base {
    "*.mlp.up_proj.*" => ties(base, [a], weights = [0.9], density = 0.3)
    "*.mlp.*"         => ties(base, [a], weights = [0.5], density = 0.3)
    "*"               => ties(base, [a], weights = [0.5], density = 1)
}
"""
    _assert_same(_merge(text), _merge(hand))


def test_passthrough_slices_from_two_models_in_order(models):
    cfg = {"slices": [{"sources": [{"model": models["a"], "layer_range": [0, 2]}]},
                      {"sources": [{"model": models["b"], "layer_range": [2, 4]}]}],
           "merge_method": "passthrough"}
    text = _translate(cfg)
    # mergekit takes the embeddings from the first slice's model and norm/lm_head from the last's
    hand = _header(models, "a", "b") + """merge from a {
    "model.layers.{i}.*" if i < 2 => a
    "model.layers.{i}.*"          => b
    "*embed*"                     => a
    "*"                           => b
}
"""
    _assert_same(_merge(text), _merge(hand), exact=True)


def test_rules_are_pruned_with_the_local_reference(models):
    cfg = {"models": [{"model": models["a"], "parameters": {
               "weight": [{"filter": "norm", "value": 0.2}, {"filter": "lm_head", "value": 0.9},
                          {"value": 0.5}]}}],
           "merge_method": "task_arithmetic", "base_model": models["base"]}
    text = _translate(cfg)
    cfg["models"][0]["parameters"]["density"] = 0.5  # task arithmetic does not sparsify
    res = translate(cfg)
    assert [d.code for d in res.diagnostics] == ["W102"] and "density" in res.diagnostics[0].message
    assert res.text.split("merge from")[1] == text.split("merge from")[1]
    del cfg["models"][0]["parameters"]["density"]
    hand = _header(models, "base", "a") + """merge from base {
    "*norm*"         => base + 0.2 * (a - base)
    "lm_head.weight" => base + 0.9 * (a - base)
    "*"              => base + 0.5 * (a - base)
}
"""
    _assert_same(_merge(text), _merge(hand))
    # with a gradient, layers and the tensors around them get rules of their own; the rules
    # no tensor of the local reference can reach are dropped (no W001 when compiling)
    cfg["models"][0]["parameters"]["density"] = [1, 0.5]
    cfg["merge_method"] = "ties"
    text = _translate(cfg)
    assert '"*lm_head*"' in text and "model.layers.{i}.*lm_head*" not in text
    _merge(text)
    cfg["base_model"] = "org/remote-base"  # not local: nothing to prune against
    assert "model.layers.{i}.*lm_head*" in translate(cfg).text


def test_gta_family_methods_are_emitted(models):
    cfg = {"models": [{"model": models["a"], "parameters": {"weight": 0.5, "density": 0.7}},
                      {"model": models["b"], "parameters": {"weight": 0.5, "density": 0.7}}],
           "merge_method": "dare_ties", "base_model": models["base"],
           "parameters": {"rescale": True}}
    text = _translate(cfg)
    # mergekit's rescale is an L1-norm rescale (issue 28, item 4)
    assert '"*" => dare_ties(base, [a, b], weights = [0.5, 0.5], density = 0.7, rescale = "l1")' in text
    from mergelang.lang.loader import stdlib_functions

    if "dare_ties" in stdlib_functions():  # the stdlib method lives on another branch
        ml.compile(text).close()


# ------------------------------------------------------------------------------------------------
# what cannot be translated is reported


def _codes(cfg) -> list[str]:
    return [d.code for d in translate(cfg).diagnostics]


def test_frankenmerge_is_translated_to_stack_layers(models):
    cfg = {"slices": [{"sources": [{"model": models["a"], "layer_range": [0, 3]}]},
                      {"sources": [{"model": models["b"], "layer_range": [1, 4],
                                    "parameters": {"scale": [{"filter": "down_proj", "value": 0.5},
                                                             {"value": 1.0}]}}]}],
           "merge_method": "passthrough"}
    text = _translate(cfg)
    assert "model stacked = stack_layers([layer_range(a, 0, 3), layer_range(b, 1, 4)])" in text
    assert "merge from stacked {" in text
    hand = _header(models, "a", "b") + """model s = stack_layers([layer_range(a, 0, 3), layer_range(b, 1, 4)])
merge from s {
    "model.layers.{i}.mlp.down_proj.*" if i >= 3 => s * 0.5
    "*"                                          => s
}
"""
    got, want = _merge(text), _merge(hand)
    _assert_same(got, want, exact=True)
    assert len([k for k in got if k.endswith("q_proj.weight")]) == 6
    a, b = load_file(models["a"]), load_file(models["b"])
    assert torch.equal(got["model.layers.2.self_attn.q_proj.weight"], a["model.layers.2.self_attn.q_proj.weight"])
    assert torch.equal(got["model.layers.3.self_attn.q_proj.weight"], b["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(got["model.layers.5.mlp.down_proj.weight"], 0.5 * b["model.layers.3.mlp.down_proj.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])


def test_slices_that_move_layers_in_a_merge_restack_each_model(models):
    """mergekit writes the slices' layers renumbered in order (issue 28, item 1): layers 0..1,
    then 1..2 again, merged. Side by side with mergekit: test_mergekit_fidelity.py."""
    cfg = {"slices": [{"sources": [{"model": models["a"], "layer_range": [0, 2]},
                                   {"model": models["b"], "layer_range": [0, 2]}]},
                      {"sources": [{"model": models["a"], "layer_range": [1, 3]},
                                   {"model": models["b"], "layer_range": [1, 3]}]}],
           "merge_method": "linear", "parameters": {"weight": 1.0}}
    res = translate(cfg)
    assert not res.errors and "stack_layers([layer_range(a, 0, 2), layer_range(a, 1, 3)])" in res.text
    got = _merge(res.text)
    a, b = load_file(models["a"]), load_file(models["b"])
    for out_layer, in_layer in enumerate([0, 1, 1, 2]):
        k = "model.layers.{}.mlp.up_proj.weight"
        torch.testing.assert_close(got[k.format(out_layer)], (a[k.format(in_layer)] + b[k.format(in_layer)]) / 2)
    assert not any(n.startswith("model.layers.4.") for n in got)


def test_slices_with_different_lengths_in_one_slice_are_reported(models):
    cfg = {"slices": [{"sources": [{"model": models["a"], "layer_range": [0, 2]},
                                   {"model": models["b"], "layer_range": [1, 4]}]}],
           "merge_method": "slerp", "base_model": models["a"], "parameters": {"t": 0.5}}
    res = translate(cfg)
    assert [d.code for d in res.errors] == ["E704"] and res.text == ""
    assert "stack_layers" in res.errors[0].help


def test_errors_and_warnings(models):
    assert _codes({"models": [{"model": models["a"]}], "merge_method": "magic"}) == ["E703"]
    assert "E705" in _codes({"models": [{"model": models["a"]}, {"model": models["b"]}],
                             "merge_method": "linear"})  # no weights
    assert "E706" in _codes({"models": [{"model": models["a"] + "+some/lora"}],
                             "merge_method": "passthrough"})
    assert "E702" in _codes({"merge_method": "linear"})
    assert "E702" in translate("[1, 2]").diagnostics[0].code
    with pytest.raises(ml.MergelangError) as exc:
        translate("models: [\n")
    assert exc.value.codes == ["E701"]
    cfg = {"models": [{"model": "org/not-here", "parameters": {"weight": 1}, "extra": 1}],
           "merge_method": "linear", "tokenizer_source": "union", "chat_template": "chatml",
           "surprise": True}
    res = translate(cfg)
    assert not res.errors
    codes = [d.code for d in res.diagnostics]
    assert codes.count("W101") == 3 and "W103" in codes  # extra, chatml, surprise
    assert "option tokenizer_source = \"union\"" in res.text
    assert "# NOTE (W101): `surprise` is not translated" in res.text  # also visible in the recipe


def test_gradient_and_num_layers_intrinsics(models):
    base = {"w": torch.ones(2)}
    out = ml.merge("base * gradient([0, 0.5, 1, 0], 0.5)", base=base)["w"]  # 1.5 -> (.5 + 1) / 2
    assert torch.equal(out, torch.full((2,), 0.75))
    out = ml.merge("base * gradient([0, 1], 0.25)", base=base)["w"]
    assert torch.equal(out, torch.full((2,), 0.25))
    with pytest.raises(ml.MergelangError) as exc:
        ml.merge("base * gradient([0, 1], 2)", base=base)
    assert exc.value.codes == ["E203"]
    text = _header(models, "base") + 'merge from base {\n "*" => base * num_layers(base)\n}\n'
    assert torch.equal(_merge(text)["model.norm.weight"], _tensors(0)["model.norm.weight"] * LAYERS)


def test_cli_import_then_check(models, tmp_path):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({
        "models": [{"model": models["a"], "parameters": {"weight": 1}},
                   {"model": models["b"], "parameters": {"weight": 1}}],
        "merge_method": "linear"}))
    out = tmp_path / "r.mrg"
    runner = CliRunner()
    res = runner.invoke(main, ["import-mergekit", str(cfg), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.exists()
    res = runner.invoke(main, ["check", str(out)])
    assert res.exit_code == 0, res.output
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: magic\nmodels: [a]\n")
    res = runner.invoke(main, ["import-mergekit", str(bad)])
    assert res.exit_code == 1 and "E703" in res.output


# ---------------------------------------------------------------------------------------------
# issue 16: configs published on model cards that failed to import or reproduce


def test_model_stock_and_sce_ignore_weights_like_mergekit(models):
    for method, extra in (("model_stock", {}), ("sce", {"normalize": True, "rescale": True, "lambda": 2})):
        cfg = {"models": [{"model": models[n], "parameters": {"weight": 0.7}} for n in ("a", "b")],
               "merge_method": method, "base_model": models["base"], "parameters": extra}
        res = translate(cfg)
        assert not res.errors, [d.render() for d in res.errors]
        assert "weights" not in res.text and "W102" in [d.code for d in res.diagnostics]
        for k in extra:
            assert f"{k} =" not in res.text
        plain = _header(models, "base", "a", "b") + f'merge from base {{ "*" => {method}(base, [a, b]) }}\n'
        _assert_same(_merge(res.text, no_warnings=False), _merge(plain))


def test_yaml_numeric_strings_are_numbers(models):
    cfg = yaml.safe_load(f"""
models:
  - model: {models['a']}
  - model: {models['b']}
merge_method: karcher
parameters:
  tol: 1e-10
  max_iter: 5
""")
    assert cfg["parameters"]["tol"] == "1e-10"  # YAML 1.1: a string
    res = translate(cfg)
    assert not res.errors, [d.render() for d in res.errors]
    assert "tol = 1e-10" in res.text and '"1e-10"' not in res.text


def test_karcher_import_averages_the_base_too_and_ignores_weights(models):
    cfg = {"models": [{"model": models["a"], "parameters": {"weight": 0.9}},
                      {"model": models["b"], "parameters": {"weight": 0.1}}],
           "merge_method": "karcher", "base_model": models["base"]}
    res = translate(cfg)
    assert not res.errors and "W102" in [d.code for d in res.diagnostics]
    assert "karcher([a, b, base]" in res.text and "weights" not in res.text
    uniform = _header(models, "base", "a", "b") + 'merge from base { "*" => karcher([a, b, base]) }\n'
    _assert_same(_merge(res.text, no_warnings=False), _merge(uniform))


def test_della_with_per_model_epsilon_imports_and_runs(models):
    cfg = {"models": [{"model": models["a"], "parameters": {"weight": 1, "density": 0.5, "epsilon": 0.1}},
                      {"model": models["b"], "parameters": {"weight": 1, "density": 0.5, "epsilon": 0.3}}],
           "merge_method": "della", "base_model": models["base"], "parameters": {"lambda": 1.0}}
    text = _translate(cfg)
    assert "epsilon = [0.1, 0.3]" in text
    hand = _header(models, "base", "a", "b") + \
        'merge from base { "*" => della(base, [a, b], weights = [1, 1], density = 0.5, epsilon = [0.1, 0.3], lambda = 1, rescale = "l1") }\n'
    _assert_same(_merge(text), _merge(hand), exact=True)


@pytest.mark.parametrize("method,params,call", [
    ("ram", {"epsilon": 1e-4}, "ram(base, [a, b], epsilon = 0.0001)"),
    ("ramplus_tl", {"r": 0.3, "alpha": 0.5}, "ramplus_tl(base, [a, b], r = 0.3, alpha = 0.5)"),
    ("arcee_fusion", {}, "arcee_fusion(base, [a])"),
])
def test_ram_ramplus_and_arcee_fusion_import(models, method, params, call):
    names = ["a"] if method == "arcee_fusion" else ["a", "b"]
    cfg = {"models": [{"model": models[n], "parameters": {"weight": 0.5}} for n in names],
           "merge_method": method, "base_model": models["base"], "parameters": params}
    res = translate(cfg)
    assert not res.errors, [d.render() for d in res.errors]
    assert "W102" in [d.code for d in res.diagnostics] and "weights" not in res.text
    hand = _header(models, "base", *names) + f'merge from base {{ "*" => {call} }}\n'
    _assert_same(_merge(res.text, no_warnings=False), _merge(hand), exact=True)


def test_tokenizer_settings_become_options(models):
    base = {"models": [{"model": models["a"], "parameters": {"weight": 1}},
                       {"model": models["b"], "parameters": {"weight": 1}}],
            "merge_method": "linear"}
    text = _translate({**base, "tokenizer_source": "union", "chat_template": "auto"})
    assert 'option tokenizer_source = "union"' in text and 'option chat_template = "auto"' in text
    text = _translate({**base, "tokenizer_source": models["b"]})
    assert 'option tokenizer_source = "b"' in text
    res = translate({**base, "tokenizer": {"pad_to_multiple_of": 64, "tokens": {"<x>": {"source": "a"}}}})
    assert 'option tokenizer_source = "union"' in res.text  # mergekit's default source
    assert "option pad_to_multiple_of = 64" in res.text
    assert any(d.code == "W101" and "tokenizer.tokens" in d.message for d in res.diagnostics)
    res = translate({**base, "tokenizer": {"source": "base"}, "tokenizer_source": "base"})
    assert [d.code for d in res.errors] == ["E702"]
    res = translate({**base, "chat_template": "chatml"})
    assert any(d.code == "W101" and "chatml" in d.message for d in res.diagnostics)
