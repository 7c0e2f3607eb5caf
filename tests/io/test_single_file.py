"""`run -o FILE.safetensors` (io/singlefile.py): one safetensors file with the recipe and the
manifest in its metadata, equal tensor for tensor to the folder output, through the output
guard's rules (E404 for an input, E403 for a file mergelang did not write, --force or not), with
nothing left behind on success or failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

import mergelang as ml
from helpers import make_sd, write_model
from mergelang.cli import main
from mergelang.diagnostics import MergelangError

SHAPES = {"model.layers.0.w": (16, 8), "model.layers.1.w": (16, 8), "model.norm.weight": (8,)}
RECIPE = ('model base = "base"\nmodel a = "a"\nmodel b = "b"\n'
          'merge from base {\n    "*norm*" => base\n    "*" => ties(base, [a, b], density = 0.5)\n}\n')


@pytest.fixture()
def root(tmp_path):
    for seed, name in enumerate(("base", "a", "b")):
        write_model(tmp_path / name, make_sd(seed, SHAPES), {"model_type": "test"})
    (tmp_path / "r.mrg").write_text(RECIPE)
    return tmp_path


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def test_one_file_with_recipe_and_manifest(root):
    out = ml.compile(root / "r.mrg").run(root / "merged.safetensors")
    assert out == root / "merged.safetensors" and out.is_file()
    folder = ml.compile(root / "r.mrg").run(root / "folder")
    single, whole = load_file(out), folder_tensors(folder)
    assert list(single) == list(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    for k in whole:
        assert torch.equal(single[k], whole[k]), k
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and "ties(base, [a, b]" in meta["mergelang_recipe"]
    manifest = json.loads(meta["mergelang_manifest"])
    assert manifest["format"] == "mergelang-output"
    # nothing else was left beside it (the private work folder is gone)
    assert sorted(p.name for p in root.iterdir()) == ["a", "b", "base", "folder", "merged.safetensors", "r.mrg"]


def test_cli_and_replacing_its_own_file(root):
    target = str(root / "m.safetensors")
    res = CliRunner().invoke(main, ["run", str(root / "r.mrg"), "-o", target, "-q"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["run", str(root / "r.mrg"), "-o", target, "-q"])
    assert res.exit_code == 1 and "E403" in res.output  # exists: --force replaces it
    res = CliRunner().invoke(main, ["run", str(root / "r.mrg"), "-o", target, "-q", "--force"])
    assert res.exit_code == 0, res.output


def test_a_foreign_file_is_never_replaced(root):
    mine = root / "mine.safetensors"
    mine.write_bytes(b"my bytes")
    for extra in ([], ["--force"]):
        res = CliRunner().invoke(main, ["run", str(root / "r.mrg"), "-o", str(mine), "-q", *extra])
        assert res.exit_code == 1 and "E403" in res.output, res.output
        assert mine.read_bytes() == b"my bytes"


def test_an_input_file_is_refused(root):
    shard = root / "a" / "model.safetensors"
    before = shard.read_bytes()
    res = CliRunner().invoke(main, ["run", str(root / "r.mrg"), "-o", str(shard), "-q", "--force"])
    assert res.exit_code == 1 and "E404" in res.output, res.output
    assert shard.read_bytes() == before


def test_E423_several_outputs(root):
    (root / "two.mrg").write_text('model base = "base"\nmodel a = "a"\n'
                                  'merge "x" from base { "*" => a }\nmerge "y" from base { "*" => base }\n')
    with pytest.raises(MergelangError) as exc:
        ml.compile(root / "two.mrg").run(root / "two.safetensors")
    assert exc.value.diagnostics[0].code == "E423"
    assert not (root / "two.safetensors").exists()


def test_a_failing_merge_leaves_nothing(root):
    (root / "bad.mrg").write_text('model base = "base"\nmodel a = "a"\n'
                                  'merge from base { "*" => checked(a, sum(a) > 1e9, "too small") }\n')
    with pytest.raises(MergelangError) as exc:
        ml.compile(root / "bad.mrg").run(root / "bad.safetensors")
    assert exc.value.diagnostics[0].code == "E501"
    assert sorted(p.name for p in root.iterdir()) == ["a", "b", "bad.mrg", "base", "r.mrg"]
    with pytest.raises(MergelangError) as exc:
        ml.compile(root / "r.mrg").run(root / "x.safetensors", resume=True)
    assert exc.value.diagnostics[0].code == "E402"


def test_a_killed_runs_private_folder_is_removed_by_the_next_run(root):
    """SIGKILL leaves the private work folder (no cleanup runs); the next run for the same file
    removes it, unless its lock is held (a run still alive), and never touches other folders."""
    import fcntl
    import os

    from mergelang.io.singlefile import LOCK_NAME

    stale = root / ".m.safetensors.dead1234.mergelang-work"
    (stale / "out").mkdir(parents=True)
    (stale / LOCK_NAME).write_text("")
    alive = root / ".m.safetensors.live5678.mergelang-work"
    alive.mkdir()
    (alive / LOCK_NAME).write_text("")
    foreign = root / ".m.safetensors.mine.mergelang-work"  # no lock file: not ours
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    fd = os.open(alive / LOCK_NAME, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        ml.compile(root / "r.mrg").run(root / "m.safetensors")
    finally:
        os.close(fd)
    assert not stale.exists() and alive.is_dir() and (foreign / "notes.txt").read_text() == "mine"
    assert (root / "m.safetensors").is_file()


def test_verify_a_single_file(root):
    """`mergelang verify FILE.safetensors`: the manifest's shard digests recomputed from the file
    (the shard layout is in its metadata); a changed byte is E421, a changed input E422, a file
    without the layout (older mergelang) E955, a safetensors file without a manifest E420."""
    from mergelang.io.checkpoint import read_header
    from safetensors.torch import save_file

    target = root / "m.safetensors"
    ml.compile(root / "r.mrg").run(target)
    run = CliRunner().invoke(main, ["verify", str(target)])
    assert run.exit_code == 0 and "verified: ok" in run.output and "inputs ok" in run.output, run.output
    assert "not carried by a single file" in run.output  # the index and config are not in it
    with safe_open(str(target), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    layout = json.loads(meta["mergelang_shards"])
    assert sorted(n for names in layout.values() for n in names) == sorted(SHAPES)
    # a file without the layout: outputs not checkable (E955), inputs still checked
    old = root / "old.safetensors"
    save_file(tensors, str(old), {k: v for k, v in meta.items() if k != "mergelang_shards"})
    res = CliRunner().invoke(main, ["verify", str(old)])
    assert res.exit_code == 1 and "E955" in res.output and "inputs ok" in res.output, res.output
    plain = root / "plain.safetensors"
    save_file(tensors, str(plain))
    assert "E420" in CliRunner().invoke(main, ["verify", str(plain)]).output
    # one byte of one tensor changed
    info = read_header(target)["model.layers.1.w"]
    data = bytearray(target.read_bytes())
    data[info.begin + 3] ^= 0x40
    target.write_bytes(bytes(data))
    res = CliRunner().invoke(main, ["verify", str(target), "--no-inputs"])
    assert res.exit_code == 1 and "E421" in res.output and "DIFFERS" in res.output, res.output
    data[info.begin + 3] ^= 0x40
    target.write_bytes(bytes(data))
    assert CliRunner().invoke(main, ["verify", str(target)]).exit_code == 0
    a = root / "a" / "model.safetensors"  # an input changed since
    sd = load_file(a)
    sd["model.layers.0.w"] = sd["model.layers.0.w"] + 1
    save_file(sd, str(a))
    res = CliRunner().invoke(main, ["verify", str(target)])
    assert res.exit_code == 1 and "E422" in res.output, res.output
