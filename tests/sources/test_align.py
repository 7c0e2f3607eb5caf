"""`align`: the built-in permutation specs are symmetries of the real models (same logits in
transformers after a random permutation), weight matching / OT recover a permuted copy exactly,
and `align(...)` works in recipes as a model value, permuting on load."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mergelang as ml  # noqa: E402
from mergelang.sources.align import apply_permutations, spec_for, weight_matching  # noqa: E402
from mergelang.sources.align.source import AlignedSource  # noqa: E402
from mergelang.sources.align.spec import Member, member_index, units_view  # noqa: E402

import align_helpers as ah  # noqa: E402

CONFIGS = {
    "llama_gqa": lambda: ah.llama_config(),
    "llama_bias": lambda: ah.llama_config(attention_bias=True, mlp_bias=True, num_key_value_heads=1),
    "llama_mha_tied": lambda: ah.llama_config(num_key_value_heads=4, tie_word_embeddings=True),
    "qwen2": lambda: __import__("transformers").Qwen2Config(
        vocab_size=ah.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False),
    "mistral": lambda: __import__("transformers").MistralConfig(
        vocab_size=ah.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, head_dim=8),
    "gpt2": lambda: ah.gpt2_config(),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def permuted(request):
    model = ah.tiny_model(CONFIGS[request.param]())
    state = ah.state_of(model)
    pstate, perms, spec = ah.permuted_copy(model, seed=1)
    return model, state, pstate, perms, spec


def test_spec_is_a_symmetry(permuted):
    model, state, pstate, perms, spec = permuted
    assert not spec.check({k: tuple(v.shape) for k, v in state.items()})
    moved = [k for k in state if not torch.equal(state[k], pstate[k])]
    assert len(moved) >= len(spec.tensors()) - 2  # everything in the spec moved (bar chance)
    before = ah.logits(model, state)
    after = ah.logits(model, pstate)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    model.load_state_dict(state)


def test_spec_groups(permuted):
    _, _, _, _, spec = permuted
    names = {g.name for g in spec.groups}
    assert "residual" in names
    if spec.arch == "gpt2":
        assert {"h.0.mlp", "h.0.heads", "h.0.qk_dims", "h.0.vo_dims"} <= names
    else:
        assert {"layers.0.mlp", "layers.0.vo_dims"} <= names
        assert not any("qk" in n for n in names)  # rotary: q/k dims inside a head stay fixed


@pytest.mark.parametrize("method", ["weight_matching", "ot"])
def test_alignment_recovers_exactly(permuted, method):
    _, state, pstate, perms, spec = permuted
    res = weight_matching(state, pstate, spec, seed=0, method=method)
    assert res.converged and res.sweeps <= 100
    back = apply_permutations(pstate, spec, res.perms)
    for k in state:
        assert torch.equal(back[k], state[k]), k


def test_a_permutation_is_undone_by_its_inverse_found():
    model = ah.tiny_model(ah.llama_config())
    pstate, perms, spec = ah.permuted_copy(model, seed=3)
    res = weight_matching(ah.state_of(model), pstate, spec, seed=5)
    for name, p in perms.items():  # p then q gives the identity: q = argsort(p)
        assert torch.equal(p[res.perms[name]], torch.arange(len(p))), name


def test_member_layouts_against_loops():
    """Gather index and unit rows for a (repeat, n, block) member, written out by hand."""
    m = Member("t", 0, repeat=3, block=2, start=1)
    p = torch.tensor([2, 0, 1, 3])
    idx = member_index(m, 4, 1 + 3 * 4 * 2 + 2, p)
    want = [0]
    for r in range(3):
        for i in range(4):
            for t in range(2):
                want.append(1 + r * 8 + int(p[i]) * 2 + t)
    want += [25, 26]
    assert idx.tolist() == want
    x = torch.arange(27.0).reshape(27, 1)
    rows = units_view(x, m, 4)
    for i in range(4):
        assert rows[i].tolist() == [1 + r * 8 + i * 2 + t for r in range(3) for t in range(2)]


def test_no_config_falls_back_to_residual_and_mlp():
    model = ah.tiny_model(ah.llama_config())
    state = ah.state_of(model)
    spec = spec_for(None, {k: tuple(v.shape) for k, v in state.items()})
    assert sorted(g.name for g in spec.groups) == ["layers.0.mlp", "layers.1.mlp", "residual"]


# ------------------------------------------------------------------ the language
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    model = ah.tiny_model(ah.llama_config())
    state = ah.state_of(model)
    pstate, _, _ = ah.permuted_copy(model, seed=7)
    other = ah.tiny_model(ah.llama_config(), seed=11)
    return {
        "base": ah.save(model, state, root / "base"),
        "perm": ah.save(model, pstate, root / "perm"),
        "other": ah.save(other, ah.state_of(other), root / "other"),
        "small": ah.save(ah.tiny_model(ah.llama_config(intermediate_size=40)),
                         ah.state_of(ah.tiny_model(ah.llama_config(intermediate_size=40))), root / "small"),
        "gpt2": ah.save(ah.tiny_model(ah.gpt2_config()), ah.state_of(ah.tiny_model(ah.gpt2_config())),
                        root / "gpt2"),
        "state": state,
        "root": root,
    }


def recipe(body: str, **models: str) -> str:
    decl = "".join(f'model {k} = "{v}"\n' for k, v in models.items())
    return decl + "merge from base {\n" + body + "\n}\n"


@pytest.mark.parametrize("method", ["weight_matching", "ot"])
def test_recipe_align_recovers_the_original(folders, method):
    text = recipe(f'    "*" => align(perm, to = base, method = "{method}")',
                  base=folders["base"], perm=folders["perm"])
    r = ml.compile(text)
    out = r.evaluate()
    for k, v in folders["state"].items():
        assert torch.equal(out[k], v), k


def test_align_then_merge_as_a_model_value(folders):
    """align(...) in a list, through a stdlib function; aligned == base, so the mean is base."""
    text = recipe('    "*" => linear([base, align(perm, to = base)])', base=folders["base"], perm=folders["perm"])
    out = ml.compile(text).evaluate()
    plain = ml.compile(recipe('    "*" => linear([base, perm])', base=folders["base"],
                              perm=folders["perm"])).evaluate()
    state = folders["state"]
    for k, v in state.items():
        torch.testing.assert_close(out[k], v, rtol=0, atol=1e-6)
    assert any(not torch.allclose(plain[k], state[k]) for k in state)


def test_compile_reads_headers_only_and_permutes_on_load(folders, tmp_path):
    text = recipe('    "*" => align(perm, to = base)', base=folders["base"], perm=folders["perm"])
    r = ml.compile(text)
    aligned = [s for s in r.compilation.models.values() if isinstance(s, AlignedSource)]
    assert len(aligned) == 1 and aligned[0].label == "align(perm, to=base)"
    assert aligned[0].result is None  # nothing solved (no tensor data read) at compile time
    assert "align(perm, to=base)" in r.emit("plan")
    out = r.run(tmp_path / "out", device="cpu")
    assert aligned[0].result is not None and aligned[0].result.converged
    shards = [p for p in out.iterdir() if p.suffix == ".safetensors"]
    assert len(shards) == 1  # the merged output only: no permuted copy of `perm` is written
    from safetensors.torch import load_file

    written = load_file(shards[0])
    for k, v in folders["state"].items():
        assert torch.equal(written[k], v), k


def test_align_names_and_nesting(folders):
    text = recipe('    "*" => linear([align(perm, to = base, seed = 3), align(align(perm, to = other), to = base)])',
                  base=folders["base"], perm=folders["perm"], other=folders["other"])
    r = ml.compile(text)
    names = set(r.compilation.models)
    assert {"align(perm, to=base, seed=3)", "align(perm, to=other)",
            "align(align(perm, to=other), to=base)"} <= names
    out = r.evaluate()
    assert set(out) == set(folders["state"])


@pytest.mark.parametrize("body, code", [
    ('"*" => align(1, to = base)', "E601"),
    ('"*" => align(perm, to = 2.0)', "E601"),
    ('"*" => align(perm, to = base, method = "zipit")', "E602"),
    ('"*" => align(gpt2, to = base)', "E604"),
    ('"*" => align(small, to = base)', "E604"),
    ('"*" => align(perm, to = base, seed = 0.5)', "E201"),
    ('"*" => align(perm, to = base, reg = 0.1)', "E606"),
    ('"*" => align(perm, to = base, method = "ot", reg = -1)', "E606"),
    ('"*" => align(perm, to = base, method = "ot", reg = "soft")', "E606"),
])
def test_align_diagnostics(folders, body, code):
    text = recipe("    " + body, base=folders["base"], perm=folders["perm"], gpt2=folders["gpt2"],
                  small=folders["small"])
    with pytest.raises(ml.MergelangError) as exc:
        ml.compile(text)
    assert code in exc.value.codes, exc.value.render()


def test_align_in_a_param_is_an_error(folders):
    text = f'model base = "{folders["base"]}"\nparam x = align(base, to = base)\n' \
           'merge from base {\n    "*" => base\n}\n'
    with pytest.raises(ml.MergelangError) as exc:
        ml.compile(text)
    assert "E601" in exc.value.codes


def test_unknown_architecture_is_e603():
    sd = {"encoder.w": torch.ones(4, 4)}
    with pytest.raises(ml.MergelangError) as exc:
        ml.merge("align(a, to = base)", base=sd, a=sd)
    assert exc.value.codes == ["E603"]


def test_example_recipe_runs(tmp_path):
    """examples/align_then_merge.mrg on the example models: fine-tunes of one base align to the
    identity, so the result equals the plain average."""
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("make_tiny_models", REPO / "examples" / "make_tiny_models.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    maker.make_models(tmp_path / "models", seed=0, noise=0.05, tokenizer=False)
    shutil.copy(REPO / "examples" / "align_then_merge.mrg", tmp_path)
    r = ml.compile(tmp_path / "align_then_merge.mrg")
    out = r.evaluate()
    from safetensors.torch import load_file

    states = {}
    for name in ("base", "math", "code"):
        folder = tmp_path / "models" / name
        states[name] = {}
        for f in folder.glob("*.safetensors"):
            states[name].update(load_file(f))
    for k, v in out.items():
        want = (states["base"][k].double() + states["math"][k].double() + states["code"][k].double()) / 3
        torch.testing.assert_close(v.double(), want, rtol=1e-5, atol=1e-6)
    aligned = [s for s in r.compilation.models.values() if isinstance(s, AlignedSource)]
    assert len(aligned) == 2
    for s in aligned:
        assert all(torch.equal(p, torch.arange(len(p))) for p in s.result.perms.values())


def test_merge_on_state_dicts_uses_the_shape_only_spec():
    """ml.merge has no config.json: residual and MLP groups only (heads fixed), still exact."""
    from mergelang.sources.align import random_permutations

    model = ah.tiny_model(ah.llama_config())
    state = ah.state_of(model)
    spec = spec_for(None, {k: tuple(v.shape) for k, v in state.items()})
    pstate = apply_permutations(state, spec, random_permutations(spec, 2))
    out = ml.merge("align(a, to = base)", base=state, a=pstate)
    for k, v in state.items():
        assert torch.equal(out[k], v), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_weight_matching_on_gpu_matches_cpu():
    model = ah.tiny_model(ah.llama_config())
    pstate, _, spec = ah.permuted_copy(model, seed=4)
    state = ah.state_of(model)
    cpu = weight_matching(state, pstate, spec, device="cpu")
    gpu = weight_matching(state, pstate, spec, device="cuda")
    for k in cpu.perms:
        assert torch.equal(cpu.perms[k], gpu.perms[k])


MLP_GROUP = ("mlp: model.layers.{i}.mlp.gate_proj.weight@0 model.layers.{i}.mlp.up_proj.weight@0 "
             "model.layers.{i}.mlp.down_proj.weight@1")
KV_GROUP = ("kv: model.layers.{i}.self_attn.q_proj.weight@0x16, model.layers.{i}.self_attn.k_proj.weight@0x8, "
            "model.layers.{i}.self_attn.v_proj.weight@0x8, model.layers.{i}.self_attn.o_proj.weight@1x16")


def test_custom_groups_in_a_recipe():
    """groups = [...] replaces the built-in spec: per-layer groups from {i}, blocks with @AXISxB."""
    from mergelang.sources.align.spec import custom_spec

    model = ah.tiny_model(ah.llama_config())
    state = ah.state_of(model)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    builtin = spec_for(model.config.to_dict(), shapes)
    perms = {g.name: torch.arange(g.size) for g in builtin.groups}
    gen = torch.Generator().manual_seed(9)
    for g in builtin.groups:
        if g.name.endswith(".mlp"):
            perms[g.name] = torch.randperm(g.size, generator=gen)
        if g.name.endswith(".kv_heads"):
            perms[g.name] = torch.tensor([1, 0])  # 2 KV heads: swap them
    pstate = apply_permutations(state, builtin, perms)
    torch.testing.assert_close(ah.logits(model, pstate), ah.logits(model, state), rtol=1e-4, atol=1e-5)
    spec = custom_spec([MLP_GROUP, KV_GROUP], shapes)
    assert sorted(g.name for g in spec.groups) == ["kv[i=0]", "kv[i=1]", "mlp[i=0]", "mlp[i=1]"]
    assert {g.size for g in spec.groups} == {48, 2}
    out = ml.merge(f'align(a, to = base, groups = ["{MLP_GROUP}", "{KV_GROUP}"])', base=state, a=pstate)
    for k, v in state.items():
        assert torch.equal(out[k], v), k
    only_mlp = ml.merge(f'align(a, to = base, groups = "{MLP_GROUP}")', base=state, a=pstate)
    assert not torch.equal(only_mlp["model.layers.0.self_attn.k_proj.weight"],
                           state["model.layers.0.self_attn.k_proj.weight"])  # heads not aligned


@pytest.mark.parametrize("groups", [
    '"mlp model.layers.0.mlp.up_proj.weight@0"',                       # no NAME:
    '"mlp: model.layers.0.mlp.up_proj.weight"',                        # no @AXIS
    '"mlp: model.layers.0.mlp.nope.weight@0"',                         # matches nothing
    '"mlp: model.layers.0.mlp.up_proj.weight@0 model.layers.0.mlp.up_proj.weight@1"',  # sizes differ
    '"mlp: model.layers.0.mlp.up_proj.weight@5"',                      # no such axis
    "[1, 2]",
])
def test_custom_group_errors_are_e605(groups):
    model = ah.tiny_model(ah.llama_config())
    state = ah.state_of(model)
    with pytest.raises(ml.MergelangError) as exc:
        ml.merge(f"align(a, to = base, groups = {groups})", base=state, a=state)
    assert exc.value.codes == ["E605"], exc.value.render()
