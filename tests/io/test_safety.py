"""Never harm the user's files: outputs that overlap inputs, --force, symbolic links leaving a
model folder, the Hugging Face cache layout, and what an output records (manifest, recipe copy).

Each test builds a small HF folder in tmp_path and checks the inputs byte for byte afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mergelang as ml
from mergelang.cli import main as cli_main
from mergelang.diagnostics import MergelangError


def make_model(folder: Path, seed: int, config: bool = True) -> Path:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)},
              str(folder / "model.safetensors"))
    if config:
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    return folder


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (following nothing) -> its content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    """tmp/proj/{a,b}/ models, tmp/proj/recipe.mrg (relative paths), tmp/proj/notes.txt."""
    root = tmp_path / "proj"
    make_model(root / "a", 0)
    make_model(root / "b", 1)
    (root / "notes.txt").write_text("the user's own file")
    (root / "recipe.mrg").write_text('model a = "a"\nmodel b = "b"\nparam t = 0.5\n'
                                     'merge from a { "*" => linear([a, b], weights = [1 - t, t]) }\n')
    return root


def cli(*args, expect: int = 0, cwd: Path | None = None):
    old = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        res = CliRunner().invoke(cli_main, [str(a) for a in args])
    finally:
        os.chdir(old)
    assert res.exit_code == expect, res.output
    return res


# ---------------------------------------------------------------------------------------------
# outputs never overlap inputs (E404), --force replaces only mergelang's own outputs (E403)


@pytest.mark.parametrize("target", ["a", ".", "a/sub", "recipe.mrg", "..", "a/model.safetensors"])
def test_output_overlapping_an_input_is_refused_even_with_force(proj: Path, target: str) -> None:
    before = snapshot(proj.parent)
    res = cli("run", proj / "recipe.mrg", "-o", proj / target, "--force", expect=1)
    assert "E404" in res.output or "E403" in res.output, res.output
    if target != "a/model.safetensors":  # a file: E403 (not a folder) or E404, both refuse
        assert "E404" in res.output
    assert snapshot(proj.parent) == before


def test_output_overlapping_an_input_through_a_link_is_refused(proj: Path, tmp_path: Path) -> None:
    (tmp_path / "alias").symlink_to(proj / "a")
    before = snapshot(proj)
    res = cli("run", proj / "recipe.mrg", "-o", tmp_path / "alias" / "out", "--force", expect=1)
    assert "E404" in res.output and snapshot(proj) == before


def test_output_inside_an_imported_recipe_folder_is_refused(proj: Path, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "fns.mrg").write_text("fn half(x) { return 0.5 * x }\n")
    (proj / "r2.mrg").write_text(f'import "{lib / "fns.mrg"}"\nmodel a = "a"\n'
                                 'merge from a { "*" => half(a) }\n')
    res = cli("run", proj / "r2.mrg", "-o", lib, "--force", expect=1)
    assert "E404" in res.output and (lib / "fns.mrg").is_file()


def test_force_replaces_only_an_earlier_mergelang_output(proj: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    res = cli("run", proj / "recipe.mrg", "-o", out, "--force", expect=1)
    assert "E403" in res.output and "by hand" in res.output and "--force" not in res.output.split("help:")[1]
    (out / "mine.txt").unlink()
    cli("run", proj / "recipe.mrg", "-o", out)
    manifest = json.loads((out / "mergelang_manifest.json").read_text())
    assert manifest["format"] == "mergelang-output"
    assert set(manifest["files"]) == {p.name for p in out.iterdir()}
    res = cli("run", proj / "recipe.mrg", "-o", out, expect=1)  # without --force
    assert "E403" in res.output and "--force" in res.output
    (out / "added-later.txt").write_text("the user's")
    res = cli("run", proj / "recipe.mrg", "-o", out, "--force", expect=1)
    assert "E403" in res.output and "added-later.txt" in res.output
    assert (out / "added-later.txt").read_text() == "the user's"
    (out / "added-later.txt").unlink()
    cli("run", proj / "recipe.mrg", "-o", out, "--force", "--set", "t=1.0")
    assert torch.equal(load_file(str(out / "model-00001-of-00001.safetensors"))["w"],
                       load_file(str(proj / "b" / "model.safetensors"))["w"])


def test_output_that_is_a_file_is_a_diagnostic_not_a_usage_error(proj: Path, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    res = cli("run", proj / "recipe.mrg", "-o", f, "--force", expect=1)
    assert "E403" in res.output and f.read_text() == "x"


def test_forged_manifest_does_not_cover_unlisted_files(proj: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mergelang_manifest.json").write_text(json.dumps({"format": "mergelang-output", "files": []}))
    (out / "data.csv").write_text("1,2")
    cli("run", proj / "recipe.mrg", "-o", out, "--force", expect=1)
    assert (out / "data.csv").read_text() == "1,2"


# ---------------------------------------------------------------------------------------------
# symbolic links leaving a model folder (E314), files that must parse (E315)


def test_tokenizer_linked_to_a_secret_is_refused_at_check(proj: Path, tmp_path: Path) -> None:
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY-----")
    (proj / "a" / "tokenizer.json").symlink_to(secret)
    res = cli("check", proj / "recipe.mrg", expect=1)
    assert "E314" in res.output and "recipe.mrg:1:" in res.output
    out = tmp_path / "out"
    cli("run", proj / "recipe.mrg", "-o", out, expect=1)
    assert not out.exists()
    # an explicit opt-in copies it
    secret.write_text(json.dumps({"version": "1.0"}))
    cli("run", proj / "recipe.mrg", "-o", out, "--follow-symlinks")
    assert not (out / "tokenizer.json").is_symlink()
    assert json.loads((out / "tokenizer.json").read_text()) == {"version": "1.0"}


def test_shard_linked_outside_the_folder_is_not_read(proj: Path, tmp_path: Path) -> None:
    elsewhere = make_model(tmp_path / "elsewhere", 5)
    (proj / "a" / "model.safetensors").unlink()
    (proj / "a" / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    res = cli("check", proj / "recipe.mrg", expect=1)
    assert "E314" in res.output
    cli("check", proj / "recipe.mrg", "--follow-symlinks")


def test_links_inside_the_folder_are_fine(proj: Path) -> None:
    (proj / "a" / "real").mkdir()
    (proj / "a" / "model.safetensors").rename(proj / "a" / "real" / "w.safetensors")
    (proj / "a" / "model.safetensors").symlink_to("real/w.safetensors")
    cli("check", proj / "recipe.mrg")


@pytest.mark.parametrize("content", ['{"a": ', "[1, 2]", "\xff\xfe"])
def test_unparsable_config_is_a_check_time_diagnostic(proj: Path, content: str) -> None:
    (proj / "a" / "config.json").write_bytes(content.encode("latin-1"))
    res = cli("check", proj / "recipe.mrg", expect=1)
    assert "E315" in res.output and "config.json" in res.output


def test_copy_files_off_skips_the_check(proj: Path, tmp_path: Path) -> None:
    (proj / "a" / "config.json").write_text("{")
    text = (proj / "recipe.mrg").read_text()
    (proj / "recipe.mrg").write_text("option copy_files = false\n" + text)
    cli("run", proj / "recipe.mrg", "-o", tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_reference_without_config_warns_at_run(proj: Path, tmp_path: Path) -> None:
    (proj / "a" / "config.json").unlink()
    res = cli("run", proj / "recipe.mrg", "-o", tmp_path / "out")
    assert "warning[W004]" in res.output
    r = ml.compile(proj / "recipe.mrg")
    r.run(tmp_path / "out2", device="cpu")
    assert [d.code for d in r.run_warnings] == ["W004"]


# ---------------------------------------------------------------------------------------------
# the Hugging Face cache layout and hf: model ids


def make_hf_cache(hub: Path, repo: str, seed: int, revision: str = "0123abcd" * 5) -> Path:
    """hub/models--ORG--NAME/{blobs/<hash>, snapshots/<rev>/<file> -> ../../blobs/<hash>,
    refs/main}, as huggingface_hub lays it out; returns the snapshot folder."""
    src = make_model(hub.parent / f"src-{seed}", seed)
    root = hub / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / revision
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    for f in src.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        (root / "blobs" / digest).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snap


def test_hf_cache_snapshot_folder_and_model_id(tmp_path: Path, monkeypatch) -> None:
    hub = tmp_path / "hub"
    snap_a = make_hf_cache(hub, "org/model-a", 0)
    make_hf_cache(hub, "org/model-b", 1)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    recipe = tmp_path / "r.mrg"
    recipe.write_text(f'model a = "{snap_a}"\nmodel b = "hf:org/model-b"\n'
                      'merge from a { "*" => linear([a, b]) }\n')
    before = snapshot(hub)
    out = tmp_path / "out"
    cli("run", recipe, "-o", out)
    assert snapshot(hub) == before
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert not (out / "config.json").is_symlink()
    got = load_file(str(out / "model-00001-of-00001.safetensors"))["w"]
    wa = load_file(str(snap_a / "model.safetensors"))["w"]
    wb = load_file(str(hub / "models--org--model-b" / "snapshots" / ("0123abcd" * 5) / "model.safetensors"))["w"]
    torch.testing.assert_close(got, (wa + wb) / 2)
    # an output inside the cache repository is refused
    res = cli("run", recipe, "-o", hub / "models--org--model-a" / "merged", expect=1)
    assert "E404" in res.output


def test_hf_id_with_revision_and_not_cached(tmp_path: Path, monkeypatch) -> None:
    hub = tmp_path / "hub"
    make_hf_cache(hub, "org/m", 0, revision="f" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    recipe = tmp_path / "r.mrg"
    recipe.write_text(f'model a = "hf:org/m@{"f" * 40}"\nmerge from a {{ "*" => a }}\n')
    cli("check", recipe)
    recipe.write_text('model a = "hf:org/not-here"\nmerge from a { "*" => a }\n')
    res = cli("check", recipe, expect=1)
    assert "E301" in res.output and "never downloads" in res.output and "r.mrg:1:" in res.output
    recipe.write_text('model a = "hf:../../etc"\nmerge from a { "*" => a }\n')
    assert "E301" in cli("check", recipe, expect=1).output


def test_blob_link_leaving_the_cache_repository_is_refused(tmp_path: Path, monkeypatch) -> None:
    hub = tmp_path / "hub"
    snap = make_hf_cache(hub, "org/m", 0)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (snap / "tokenizer_config.json").unlink()
    (snap / "tokenizer_config.json").symlink_to(secret)
    recipe = tmp_path / "r.mrg"
    recipe.write_text(f'model a = "{snap}"\nmerge from a {{ "*" => a }}\n')
    assert "E314" in cli("check", recipe, expect=1).output


# ---------------------------------------------------------------------------------------------
# provenance: the recipe copy and manifest record the values used; CLI paths resolve from cwd


def test_recipe_copy_records_set_values_and_reproduces(proj: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cli("run", proj / "recipe.mrg", "-o", out, "--set", "t=0.25")
    copy = (out / "mergelang_recipe.mrg").read_text()
    assert "param t = 0.25" in copy and "the recipe said: 0.5" in copy
    assert json.loads((out / "mergelang_manifest.json").read_text())["params"] == {"t": 0.25}
    # the copy, placed beside the models, reproduces the output byte for byte
    (proj / "again.mrg").write_text(copy)
    cli("run", proj / "again.mrg", "-o", tmp_path / "again")
    for f in ("model-00001-of-00001.safetensors",):
        assert (out / f).read_bytes() == (tmp_path / "again" / f).read_bytes()


def test_set_model_path_resolves_against_the_current_directory(proj: Path, tmp_path: Path) -> None:
    other = make_model(tmp_path / "cwd" / "other", 7)
    out = tmp_path / "out"
    cli("run", proj / "recipe.mrg", "-o", out, "--set", "b=other", "--set", "t=1", cwd=tmp_path / "cwd")
    assert torch.equal(load_file(str(out / "model-00001-of-00001.safetensors"))["w"],
                       load_file(str(other / "model.safetensors"))["w"])
    assert f'model b = "{other}"' in (out / "mergelang_recipe.mrg").read_text()


def test_python_errors_keep_the_inputs(proj: Path) -> None:
    before = snapshot(proj)
    with pytest.raises(MergelangError) as ei:
        ml.compile(proj / "recipe.mrg").run(proj, force=True)
    assert ei.value.codes == ["E404"]
    assert snapshot(proj) == before


def test_a_folder_linked_from_outside_is_not_read_or_refused(proj: Path, tmp_path: Path) -> None:
    """Only files are copied: a sub-folder link leaving the model folder is simply not used."""
    (tmp_path / "elsewhere").mkdir()
    (proj / "a" / "original").symlink_to(tmp_path / "elsewhere")
    cli("run", proj / "recipe.mrg", "-o", tmp_path / "out")
    assert not (tmp_path / "out" / "original").exists()
