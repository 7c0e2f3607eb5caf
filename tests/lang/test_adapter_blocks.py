"""`merge adapter` blocks: PEFT LoRA adapters from any delta expression (`low_rank(delta, rank)`),
equal to `mergelang extract-lora` for ft - base, loadable by peft, beside merged models in one
run (Twin-Merging's shape: a shared model plus task adapters); E319."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import mergelang as ml
from mergelang.cli import main
from test_mergekit_side_by_side import llama_tensors, write_llama


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = llama_tensors(0)
    return {"base": write_llama(root / "base", base),
            "a": write_llama(root / "a", llama_tensors(1, base, 0.05)),
            "b": write_llama(root / "b", llama_tensors(2, base, 0.05))}


def header(f, *names):
    return "".join(f'model {n} = "{f[n]}"\n' for n in names)


ADAPTER = '''merge adapter from base {
    "*proj.weight" => low_rank(a - base, rank = 8)
    "*"            => a
}
'''


def test_adapter_equals_extract_lora(folders, tmp_path):
    r = ml.compile(header(folders, "base", "a") + ADAPTER)
    try:
        r.run(tmp_path / "recipe")
    finally:
        r.close()
    res = CliRunner().invoke(main, ["extract-lora", folders["base"], folders["a"], "-o",
                                    str(tmp_path / "cli"), "--rank", "8"])
    assert res.exit_code == 0, res.output
    got = load_file(str(tmp_path / "recipe" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "cli" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    cfg = json.loads((tmp_path / "recipe" / "adapter_config.json").read_text())
    ref = json.loads((tmp_path / "cli" / "adapter_config.json").read_text())
    for k in ("r", "lora_alpha", "rank_pattern", "target_modules", "peft_type"):
        assert cfg[k] == ref[k], k
    assert set(cfg["modules_to_save"]) == set(ref["modules_to_save"])
    assert not (tmp_path / "recipe" / "config.json").exists()


def test_shared_model_and_task_adapters_in_one_run(folders, tmp_path):
    """Twin-Merging's output shape: the merged shared model, and per task its exclusive part
    (task - shared) compressed to rank 4 as an adapter; both adapters load in peft on it."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    text = header(folders, "base", "a", "b") + '''model shared = output("shared")
merge "shared" from base { "*" => task_arithmetic(base, [a, b], lambda = 0.5) }
merge adapter "a_excl" from base { "*proj.weight" => low_rank(a - shared, rank = 64)  "*" => none }
merge adapter "b_excl" from base { "*proj.weight" => low_rank(b - shared, rank = 4)  "*" => none }
'''
    r = ml.compile(text)
    try:
        r.run(tmp_path / "out")
    finally:
        r.close()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["a_excl", "b_excl", "shared"]
    shared = load_file(str(next((out / "shared").glob("*.safetensors"))))
    b_ad = load_file(str(out / "b_excl" / "adapter_model.safetensors"))
    name = "model.layers.2.mlp.up_proj"
    b_ft = load_file(str(Path(folders["b"]) / "model.safetensors"))[name + ".weight"]
    delta = b_ft - shared[name + ".weight"]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    prod = b_ad[f"base_model.model.{name}.lora_B.weight"] @ b_ad[f"base_model.model.{name}.lora_A.weight"]
    torch.testing.assert_close(prod, (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-4, atol=1e-5)
    # the shared model plus a's full-rank exclusive adapter gives a's projections back (the
    # norms were left out with `none`, so compare weights, not logits)
    assert (out / "shared" / "config.json").exists()
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "shared"),
                                           str(out / "a_excl"))
    merged = model.merge_and_unload().state_dict()
    a_ft = load_file(str(Path(folders["a"]) / "model.safetensors"))
    torch.testing.assert_close(merged[name + ".weight"], a_ft[name + ".weight"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("body,part", [
    ('merge from base { "*proj.weight" => low_rank(a - base, rank = 2)  "*" => base }', "only a `merge adapter`"),
    ('merge adapter from base { "*proj.weight" => sum(a - base, over = "rows")  "*" => none }', "whole tensor"),
    ('model x = output("ad")\nmerge adapter "ad" from base { "*" => none }\n'
     'merge "m" from base { "*" => linear([x, a]) }', "not a model"),
])
def test_E319(folders, body, part):
    with pytest.raises(ml.MergelangError) as info:
        ml.compile(header(folders, "base", "a") + body)
    errs = [d for d in info.value.diagnostics if d.is_error]
    assert errs[0].code == "E319" and part in errs[0].message + (errs[0].help or "")


def test_a_list_for_a_multi_name_adapter_block_must_fit(folders):
    with pytest.raises(ml.MergelangError) as info:
        ml.compile(header(folders, "base", "a") + 'merge adapter ["x", "y"] from base {\n'
                   '  "*proj.weight" => low_rank([a, a, a] - base, rank = 2)\n  "*" => none\n}')
    assert [d.code for d in info.value.diagnostics if d.is_error][0] == "E313"


def test_energy_threshold_keeps_the_fewest_directions(folders, tmp_path):
    """low_rank(delta, rank = R, energy = e): per tensor, the smallest r whose singular values
    hold e of sum(s^2) (at most R); B @ A is that rank-r truncation (independent SVD here)."""
    from safetensors.torch import load_file as lf

    r = ml.compile(header(folders, "base", "a") +
                   'merge adapter from base {\n    "*proj.weight" => low_rank(a - base, rank = 6, energy = 0.5)\n'
                   '    "*" => none\n}\n')
    out = r.run(tmp_path / "out")
    got = lf(str(out / "adapter_model.safetensors"))
    base, a = (lf(str(Path(folders[n]) / "model.safetensors")) for n in ("base", "a"))
    checked = 0
    for name in base:
        if not name.endswith("proj.weight"):
            continue
        delta = (a[name].float() - base[name].float()).double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        e = s ** 2
        k = int((e.cumsum(0) < 0.5 * e.sum()).sum()) + 1
        k = min(k, 6)
        want = (u[:, :k] * s[:k]) @ vh[:k]
        module = name[: -len(".weight")]
        A, B = got[f"base_model.model.{module}.lora_A.weight"], got[f"base_model.model.{module}.lora_B.weight"]
        assert A.shape[0] == min(6, *delta.shape)  # the files keep the maximum rank's shape
        assert torch.allclose((B.double() @ A.double()), want, atol=1e-4), name
        checked += 1
    assert checked


def test_rank_above_the_tensor_is_clamped_with_W108(folders):
    r = ml.compile(header(folders, "base", "a") +
                   'merge adapter from base {\n    "*proj.weight" => low_rank(a - base, rank = 4096)\n'
                   '    "*" => none\n}\n')
    w = [d for d in r.warnings if d.code == "W108"]
    assert w and "clamped to" in w[0].message
    r.close()
    with pytest.raises(ml.MergelangError) as ei:
        ml.compile(header(folders, "base", "a") +
                   'merge adapter from base { "*proj.weight" => low_rank(a - base, rank = 4, energy = 1.5)\n'
                   '    "*" => none }\n')
    assert ei.value.diagnostics[0].code == "E203"
