"""Hostile adapter folders, tokenizer files and Hugging Face cache refs (issue 27, items 6-8,
13 and the adapter internal errors): one rule for `lora("dir")` and `mergelang rmm` — files
confined to the adapter folder (E314), adapter_config.json checked (E327, patterns on RE2) —
and every malformed case is a coded diagnostic found by `check`, never a traceback in `run`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mergelang as ml
from mergelang.cli import main as cli_main
from mergelang.diagnostics import MergelangError

Q = "model.layers.0.self_attn.q_proj"


def base_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    save_file({f"{Q}.weight": torch.randn(6, 4, generator=g),
               "model.norm.weight": torch.ones(4)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def adapter(folder: Path, seed: int = 1, r: int = 2, cfg: dict | None = None,
            a_shape: tuple = (2, 4), b_shape: tuple = (6, 2)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file({f"base_model.model.{Q}.lora_A.weight": torch.randn(*a_shape, generator=g),
               f"base_model.model.{Q}.lora_B.weight": torch.randn(*b_shape, generator=g)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 4, **(cfg or {})}))
    return folder


def recipe(base: Path, ad: Path) -> str:
    return f'model base = "{base}"\nmodel a = lora("{ad}", base = base)\nmerge from base {{ "*" => a }}\n'


def cli(*args, expect: int):
    res = CliRunner().invoke(cli_main, [str(a) for a in args])
    assert res.exit_code == expect, res.output
    return res


# --- item 6: symlinks out of the adapter folder, for lora() and rmm alike --------------------


@pytest.mark.parametrize("which", ["adapter_model.safetensors", "adapter_config.json"])
def test_rmm_refuses_adapter_files_linking_out_of_the_folder(tmp_path: Path, which: str) -> None:
    a, b = adapter(tmp_path / "a", 1), adapter(tmp_path / "b", 2)
    secret = adapter(tmp_path / "secret", 3)
    (b / which).unlink()
    (b / which).symlink_to(secret / which)
    res = cli("rmm", a, b, "-o", tmp_path / "out", "--basis", "2", expect=1)
    assert "E314" in res.output and not (tmp_path / "out").exists()
    # lora() applies the same rule to the same folder
    with pytest.raises(MergelangError) as exc:
        ml.compile(recipe(base_model(tmp_path / "base"), b))
    assert exc.value.codes == ["E314"]


# --- item 13 and the lora() internal errors: adapter_config.json checked at compile time --------


BAD_CONFIGS = [
    {"alpha_pattern": {"[": 8}},                       # not a regex: was exit 3
    {"alpha_pattern": {"(?=q)q_proj": 8}},             # lookahead: RE2 has none
    {"alpha_pattern": {"(a+)+\\1": 8}},                # backreference
    {"alpha_pattern": ["q_proj"]},                     # a list: was AttributeError in run
    {"alpha_pattern": {"q_proj": "8"}},                # a string value
    {"rank_pattern": {"q_proj": None}},
    {"lora_alpha": "16"},                              # a string: was TypeError in run
    {"lora_alpha": 1e300 * 1e300},                     # json writes Infinity
    {"lora_alpha": 10 ** 400},                         # a huge integer
    {"lora_alpha": 0},
    {"use_rslora": "yes"},
    {"fan_in_fan_out": 1},
]


@pytest.mark.parametrize("cfg", BAD_CONFIGS, ids=[json.dumps(c, default=str)[:40] for c in BAD_CONFIGS])
def test_bad_adapter_config_is_a_diagnostic_at_check(tmp_path: Path, cfg: dict) -> None:
    ad = adapter(tmp_path / "ad", cfg=cfg)
    with pytest.raises(MergelangError) as exc:
        ml.compile(recipe(base_model(tmp_path / "base"), ad))
    assert exc.value.codes == ["E327"], exc.value.render()
    # rmm reads the same config with the same rule
    other = adapter(tmp_path / "other", 2)
    res = cli("rmm", other, ad, "-o", tmp_path / "out", "--basis", "2", expect=1)
    assert "E327" in res.output


@pytest.mark.parametrize("text", ["[1, 2]", "not json", "{" * 5000, ""])
def test_adapter_config_that_is_not_an_object(tmp_path: Path, text: str) -> None:
    ad = adapter(tmp_path / "ad")
    (ad / "adapter_config.json").write_text(text)
    with pytest.raises(MergelangError) as exc:
        ml.compile(recipe(base_model(tmp_path / "base"), ad))
    assert exc.value.codes == ["E327"]


def test_catastrophic_pattern_runs_in_linear_time(tmp_path: Path) -> None:
    """`(a|aa)*$`-style keys backtrack exponentially on Python's re; RE2 is linear."""
    ad = adapter(tmp_path / "ad", cfg={"alpha_pattern": {"(x+x+)+y": 2}})
    r = ml.compile(recipe(base_model(tmp_path / "base"), ad))
    from mergelang.io.adapter import pattern_value

    t = time.perf_counter()
    assert pattern_value({"(x+x+)+y": 2}, "x" * 5000, 7) == 7
    assert time.perf_counter() - t < 1
    r.close()


def test_alpha_pattern_follows_peft_matching(tmp_path: Path) -> None:
    """PEFT: the first key with re.match(rf"(.*\\.)?{key}$", module) wins (an independent
    re-implementation with Python's re gives the expected scale)."""
    import re

    pats = {"layers\\.1\\..*": 1, "self_attn\\.q_proj": 8, "q_proj": 2}
    module = f"base_model.model.{Q}"
    want = next(v for k, v in pats.items() if re.match(rf"(.*\.)?{k}$", module))
    base = base_model(tmp_path / "base")
    ad = adapter(tmp_path / "ad", cfg={"alpha_pattern": pats})
    r = ml.compile(recipe(base, ad))
    got = r.evaluate()[f"{Q}.weight"]
    r.close()
    t = load_file(str(ad / "adapter_model.safetensors"))
    w = load_file(str(base / "model.safetensors"))[f"{Q}.weight"]
    delta = t[f"base_model.model.{Q}.lora_B.weight"] @ t[f"base_model.model.{Q}.lora_A.weight"]
    torch.testing.assert_close(got, w + want / 2 * delta)
    assert want == 8


@pytest.mark.parametrize("fifo,a_shape,b_shape", [(True, (2, 4), (6, 2)),   # fan_in_fan_out: (4, 6)
                                                  (False, (2, 4), (6, 3)),  # ranks differ
                                                  (False, (2, 5), (6, 2))])  # another in_features
def test_factors_that_do_not_fit_the_weight_are_found_by_check(tmp_path: Path, fifo: bool,
                                                               a_shape: tuple, b_shape: tuple) -> None:
    ad = adapter(tmp_path / "ad", cfg={"fan_in_fan_out": fifo}, a_shape=a_shape, b_shape=b_shape)
    (tmp_path / "r.mrg").write_text(recipe(base_model(tmp_path / "base"), ad))
    res = cli("check", tmp_path / "r.mrg", expect=1)
    assert "E327" in res.output and "r.mrg:2:" in res.output


# --- rmm / rmm-rebuild: malformed inputs --------------------------------------------------------


def test_rmm_adapter_without_lora_b(tmp_path: Path) -> None:
    a = adapter(tmp_path / "a", 1)
    b = tmp_path / "b"
    b.mkdir()
    save_file({f"base_model.model.{Q}.lora_A.weight": torch.ones(2, 4)}, str(b / "adapter_model.safetensors"))
    (b / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 4}')
    assert "E325" in cli("rmm", a, b, "-o", tmp_path / "out", "--basis", "2", expect=1).output


def test_rmm_adapter_weights_not_safetensors(tmp_path: Path) -> None:
    a, b = adapter(tmp_path / "a", 1), adapter(tmp_path / "b", 2)
    (b / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}  ")
    assert "E325" in cli("rmm", a, b, "-o", tmp_path / "out", "--basis", "2", expect=1).output


def _rmm(tmp_path: Path) -> Path:
    a, b = adapter(tmp_path / "a", 1), adapter(tmp_path / "b", 2)
    cli("rmm", a, b, "-o", tmp_path / "rmm", "--basis", "2", expect=0)
    return tmp_path / "rmm"


def _rewrite_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "rmm_config.json").read_text())
    cfg.update(changes)
    (folder / "rmm_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes", [{"tasks": "a"}, {"tasks": [1, 2]}, {"tasks": ["a", "a"]},
                                     {"tasks": []}, {"adapter_configs": None},
                                     {"adapter_configs": [{}]},
                                     {"adapter_configs": [{"lora_alpha": "x"}, {}]},
                                     {"adapter_configs": [[], []]}])
def test_rmm_rebuild_malformed_config(tmp_path: Path, changes: dict) -> None:
    folder = _rmm(tmp_path)
    _rewrite_config(folder, **changes)
    res = cli("rmm-rebuild", folder, "--task", "0", "-o", tmp_path / "re", expect=1)
    assert "E325" in res.output or "E327" in res.output


@pytest.mark.parametrize("text", ["[]", "nope", "{}"])
def test_rmm_rebuild_config_not_an_object(tmp_path: Path, text: str) -> None:
    folder = _rmm(tmp_path)
    (folder / "rmm_config.json").write_text(text)
    assert "E325" in cli("rmm-rebuild", folder, "--task", "0", "-o", tmp_path / "re", expect=1).output


@pytest.mark.parametrize("drop", ["lora_A.coef", "lora_B.basis"])
def test_rmm_rebuild_missing_coefficient_tensors(tmp_path: Path, drop: str) -> None:
    folder = _rmm(tmp_path)
    t = load_file(str(folder / "rmm_model.safetensors"))
    t = {k: v for k, v in t.items() if not k.endswith(drop)}
    save_file(t, str(folder / "rmm_model.safetensors"))
    assert "E325" in cli("rmm-rebuild", folder, "--task", "0", "-o", tmp_path / "re", expect=1).output


def test_rmm_rebuild_files_linking_out_of_the_folder(tmp_path: Path) -> None:
    folder = _rmm(tmp_path)
    other = tmp_path / "elsewhere.json"
    other.write_text((folder / "rmm_config.json").read_text())
    (folder / "rmm_config.json").unlink()
    (folder / "rmm_config.json").symlink_to(other)
    assert "E314" in cli("rmm-rebuild", folder, "--task", "0", "-o", tmp_path / "re", expect=1).output


# --- item 7: tokenizer files read by `option tokenizer_source` stay inside their model folders ----


@pytest.mark.parametrize("source", ["union", "base", "b"])
def test_tokenizer_json_linking_out_of_its_folder(tmp_path: Path, source: str) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sources"))
    from tokenizer_models import BASE_TOKENS, write_model

    write_model(tmp_path / "a", BASE_TOKENS, ["<s>"], 40, 0)
    write_model(tmp_path / "b", BASE_TOKENS + ["extra"], ["<s>"], 41, 1)
    write_model(tmp_path / "secret", BASE_TOKENS + ["private"], ["<s>"], 41, 2)
    (tmp_path / "b" / "tokenizer.json").unlink()
    (tmp_path / "b" / "tokenizer.json").symlink_to(tmp_path / "secret" / "tokenizer.json")
    text = (f'model a = "{tmp_path / "a"}"\nmodel b = "{tmp_path / "b"}"\n'
            f'option tokenizer_source = "{source}"\nmerge from a {{ "*" => linear([a, b]) }}\n')
    with pytest.raises(MergelangError) as exc:
        ml.compile(text)
    assert exc.value.codes == ["E314"], exc.value.render()
    ml.compile(text, follow_symlinks=True).close()  # the user's opt-in


# --- item 8: a Hugging Face cache ref must name a snapshot of its own repository ---------------


def hf_repo(hub: Path, repo: str, commit: str) -> Path:
    root = hub / ("models--" + repo.replace("/", "--"))
    base_model(root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return root


@pytest.mark.parametrize("content", ["../../../../outside", "../../models--org--other/snapshots/" + "b" * 40,
                                     "/etc", "", "main"])
def test_hf_ref_pointing_outside_its_repository(tmp_path: Path, monkeypatch, content: str) -> None:
    hub = tmp_path / "hub"
    root = hf_repo(hub, "org/m", "a" * 40)
    hf_repo(hub, "org/other", "b" * 40)
    base_model(tmp_path / "outside")
    base_model(root / "outside")  # where ../../../../outside lands relative to snapshots/
    (root / "refs" / "evil").write_text(content)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    with pytest.raises(MergelangError) as exc:
        ml.compile('model m = "hf:org/m@evil"\nmerge from m { "*" => m }\n')
    assert exc.value.codes == ["E328"], exc.value.render()
    ml.compile('model m = "hf:org/m@main"\nmerge from m { "*" => m }\n').close()
    ml.compile(f'model m = "hf:org/m@{"a" * 40}"\nmerge from m {{ "*" => m }}\n').close()


@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_hf_ref_that_is_a_fifo_or_a_link_out(tmp_path: Path, monkeypatch, kind: str) -> None:
    import os

    hub = tmp_path / "hub"
    root = hf_repo(hub, "org/m", "a" * 40)
    if kind == "fifo":
        os.mkfifo(root / "refs" / "evil")
    else:
        (tmp_path / "ref").write_text("a" * 40)
        (root / "refs" / "evil").symlink_to(tmp_path / "ref")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    with pytest.raises(MergelangError) as exc:
        ml.compile('model m = "hf:org/m@evil"\nmerge from m { "*" => m }\n')
    assert exc.value.codes == (["E328"] if kind == "fifo" else ["E314"]), exc.value.render()


def test_lora_given_the_weights_file_confines_its_config(tmp_path: Path) -> None:
    ad = adapter(tmp_path / "ad")
    secret = adapter(tmp_path / "secret", cfg={"lora_alpha": 400})
    (ad / "adapter_config.json").unlink()
    (ad / "adapter_config.json").symlink_to(secret / "adapter_config.json")
    with pytest.raises(MergelangError) as exc:
        ml.compile(recipe(base_model(tmp_path / "base"), ad / "adapter_model.safetensors"))
    assert exc.value.codes == ["E314"]


@pytest.mark.parametrize("given", ["folder", "file"])
def test_config_of_a_non_reference_model_linking_out(tmp_path: Path, given: str) -> None:
    """config.json is read for every model (not only copied from the reference): a link out of
    the folder is E314 for each of them (the secret's fields would steer the merge)."""
    a, b = base_model(tmp_path / "a"), base_model(tmp_path / "b")
    (tmp_path / "secret.json").write_text('{"model_type": "llama", "vocab_size": 7}')
    (b / "config.json").unlink()
    (b / "config.json").symlink_to(tmp_path / "secret.json")
    bp = b if given == "folder" else b / "model.safetensors"
    text = f'model a = "{a}"\nmodel b = "{bp}"\nmerge from a {{ "*" => linear([a, b]) }}\n'
    with pytest.raises(MergelangError) as exc:
        ml.compile(text)
    assert exc.value.codes == ["E314"] and "config" in exc.value.render()
    ml.compile(text, follow_symlinks=True).close()


@pytest.mark.parametrize("task", ["9" * 5000, "\u0663", "-1", "2"])
def test_rmm_rebuild_unknown_task(tmp_path: Path, task: str) -> None:
    folder = _rmm(tmp_path)
    assert "E325" in cli("rmm-rebuild", folder, "--task", task, "-o", tmp_path / "re", expect=1).output
