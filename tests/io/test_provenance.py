"""What an output folder records about how it was made (issue 31 items 1-3, issue 27 item 25):
the model card (parsed by huggingface_hub), the manifest's provenance and digests (checked
against a straightforward recomputation here), `mergelang verify`, and the recipe copy, which
reruns from another folder to a byte-identical output."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from crc32c import crc32c
from safetensors.torch import save_file

import mergelang as ml
from mergelang.cli import main as cli_main

REV = "0123abcd" * 5


def make_model(folder: Path, seed: int, n: int = 2) -> Path:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {f"model.layers.{i}.w": torch.randn(4, 3, generator=g) for i in range(n)}
    sd["lm_head.weight"] = torch.randn(5, 3, generator=g)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": n}))
    (folder / "README.md").write_text("the base model's own card\n")
    return folder


def make_hf_cache(hub: Path, repo: str, seed: int) -> Path:
    """hub/models--ORG--NAME/{blobs, snapshots/REV/<file> -> ../../blobs/<hash>, refs/main}."""
    src = make_model(hub.parent / f"src-{seed}", seed)
    root = hub / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / REV
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REV)
    for f in src.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        (root / "blobs" / digest).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snap


def cli(*args, expect: int = 0, cwd: Path | None = None):
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        res = CliRunner().invoke(cli_main, [str(a) for a in args])
    finally:
        os.chdir(old)
    assert res.exit_code == expect, res.output
    assert "Traceback" not in res.output
    return res


def manifest(out: Path) -> dict:
    return json.loads((out / "mergelang_manifest.json").read_text())


def independent_digest(path: Path, skip: frozenset[str] = frozenset()) -> str:
    """The documented digest (io/digests.py), computed here from the raw file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[:8 + n]
    entries = sorted((v["data_offsets"][0], k) for k, v in json.loads(raw[8:8 + n]).items()
                     if k != "__metadata__")
    meta = json.loads(raw[8:8 + n])
    h = hashlib.sha256(b"mergelang-tensor-crc32c-v1\0")
    h.update(len(header).to_bytes(8, "little") + header)
    for _, name in entries:
        if name in skip:
            continue
        b, e = meta[name]["data_offsets"]
        h.update(len(name.encode()).to_bytes(8, "little") + name.encode())
        h.update(crc32c(raw[8 + n + b:8 + n + e]).to_bytes(4, "little"))
    return "tcrc1:" + h.hexdigest()


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    make_model(root / "a", 0)
    make_model(root / "models" / "b", 1)
    (root / "lib.mrg").write_text("fn mix(x, y, t) { return (1 - t) * x + t * y }\n")
    (root / "recipe.mrg").write_text(
        'import "lib.mrg"\nmodel a = "a"\nmodel b = "./models/b"\nparam t = 0.5\nparam s = 0.6\n'
        'merge from a {\n    "model.layers.{i}.w" if i >= 1 => mix(a, b, t)\n'
        '    "model.layers.{i}.w" => linear([a, b], weights = [1 - s, s])\n    "*" => a\n}\n')
    return root


# --------------------------------------------------------------------------- the model card

def test_card_parses_and_names_hub_inputs(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import ModelCard

    hub = tmp_path / "hub"
    make_hf_cache(hub, "org/model-a", 0)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    make_model(tmp_path / "local", 1)
    recipe = tmp_path / "r.mrg"
    recipe.write_text('model a = "hf:org/model-a"\nmodel b = "local"\nparam t = 0.3\n'
                      'merge from a { "*" => slerp(a, b, t = t) }\n')
    out = tmp_path / "out"
    cli("run", recipe, "-o", out, "--set", "t=0.25")
    card = ModelCard.load(out / "README.md")  # a local file: no network
    assert card.data.base_model == ["org/model-a"]
    assert card.data.tags == ["merge", "mergelang"]
    assert card.data.library_name == "transformers"
    assert "the base model's own card" not in card.text  # replaced, as mergekit does
    assert "`slerp`" in card.text and "`t` = `0.25` (--set)" in card.text
    assert f"mergelang run {recipe} -o {out} --set t=0.25" in card.text
    assert "README.md" in manifest(out)["files"]  # listed: --force may replace it
    cli("run", recipe, "-o", out, "--force")
    # the manifest's provenance: the hub input's revision and resolved snapshot
    prov = manifest(out)["provenance"]
    a = next(m for m in prov["inputs"] if m["name"] == "a")
    assert a["written"] == '"hf:org/model-a"'
    assert a["hf"] == {"repo": "org/model-a", "revision": REV}
    assert a["resolved"].endswith(f"snapshots/{REV}")
    # explain names the revision each input resolved to
    assert f"  a: hf:org/model-a at revision {REV}, " in cli("explain", recipe).output
    # the recipe copy pins the revision it used
    assert f'model a = "hf:org/model-a@{REV}"' in (out / "mergelang_recipe.mrg").read_text()


def test_card_escapes_what_it_copies(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    weird = tmp_path / 'we"ird `x` ```\n---\nlibrary_name: evil\n# h'
    make_model(weird, 0)
    make_model(tmp_path / "b", 1)
    recipe = tmp_path / "r.mrg"
    recipe.write_text(f'model a = {json.dumps(str(weird))}\nmodel b = "b"\nparam note = "```\\n---"\n'
                      'merge from a { "*" => linear([a, b]) }\n')
    out = tmp_path / "out"
    cli("run", recipe, "-o", out)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.tags == ["merge", "mergelang"]
    assert "base_model" not in card.data.to_dict()  # local models are listed in the body only
    text = (out / "README.md").read_text()
    body = text.split("\n---\n", 1)[1]
    # no line of the path or the param escapes its code span or fence
    assert "\n---\nlibrary_name: evil" not in body and "\n# h" not in body
    copy = (out / "mergelang_recipe.mrg").read_text()
    fence = "`" * 4  # the recipe holds a run of three backticks: the fence is longer
    assert f"{fence}\n{copy}{fence}\n" in text
    ml.compile(out / "mergelang_recipe.mrg").close()  # and the copy still compiles


def test_no_model_card_and_adapter_card(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    make_model(tmp_path / "a", 0)
    make_model(tmp_path / "b", 1)
    recipe = tmp_path / "r.mrg"
    recipe.write_text('model a = "a"\nmodel b = "b"\nmerge from a { "*" => linear([a, b]) }\n')
    cli("run", recipe, "-o", tmp_path / "plain", "--no-model-card")
    assert (tmp_path / "plain" / "README.md").read_text() == "the base model's own card\n"
    r = ml.compile(recipe)
    r.run(tmp_path / "api", device="cpu")
    card = ModelCard.load(tmp_path / "api" / "README.md")
    assert "Made from Python" in card.text
    assert manifest(tmp_path / "api")["provenance"]["param_origins"] == {}
    r.close()
    # a LoRA adapter output: library_name peft
    recipe.write_text('model a = "a"\nmodel b = "b"\n'
                      'merge adapter from a {\n    "lm_head.weight" => low_rank(b - a, rank = 2)\n'
                      '    "*" => none\n}\n')
    cli("run", recipe, "-o", tmp_path / "adapter")
    assert ModelCard.load(tmp_path / "adapter" / "README.md").data.library_name == "peft"


# --------------------------------------------------------------------------- the manifest

def test_manifest_records_inputs_versions_and_digests(tmp_path: Path) -> None:
    make_model(tmp_path / "a", 0)
    make_model(tmp_path / "b", 1)
    recipe = tmp_path / "r.mrg"
    recipe.write_text('model a = "a"\nmodel b = "b"\nparam w = 0.5\n'
                      'merge from a {\n    "lm_head.weight" => a\n    "*" => linear([a, b], weights = [w, 1 - w])\n}\n')
    out = tmp_path / "out"
    cli("run", recipe, "-o", out, cwd=tmp_path)
    m = manifest(out)
    prov = m["provenance"]
    assert prov["torch"] == torch.__version__ and prov["device"] == "cpu"
    assert prov["mergelang"] == ml.__version__ if hasattr(ml, "__version__") else prov["mergelang"]
    assert prov["params"] == {"w": 0.5} and prov["param_origins"] == {"w": "default"}
    assert prov["command"] == f"mergelang run {recipe} -o {out}"
    ins = {i["name"]: i for i in prov["inputs"]}
    assert ins["b"]["written"] == '"b"' and ins["b"]["resolved"] == str((tmp_path / "b").resolve())
    fa, fb = ins["a"]["files"][0], ins["b"]["files"][0]
    assert fa["path"] == str(tmp_path / "a" / "model.safetensors")
    assert fa["size"] == (tmp_path / "a" / "model.safetensors").stat().st_size
    # every tensor of a was read; b's lm_head was not (the first rule takes a's)
    assert "unread" not in fa and fa["digest"] == independent_digest(tmp_path / "a" / "model.safetensors")
    assert fb["unread"] == ["lm_head.weight"]
    assert fb["digest"] == independent_digest(tmp_path / "b" / "model.safetensors",
                                              frozenset({"lm_head.weight"}))
    # the output files' digests
    for name, digest in m["digests"].items():
        p = out / name
        want = independent_digest(p) if name.endswith(".safetensors") else \
            "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
        assert digest == want, name
    assert set(m["digests"]) == set(m["files"]) - {"mergelang_manifest.json"}


def test_tune_and_learn_label_the_values_they_chose(tmp_path: Path) -> None:
    make_model(tmp_path / "a", 0)
    make_model(tmp_path / "b", 1)
    recipe = tmp_path / "r.mrg"
    recipe.write_text('model a = "a"\nmodel b = "b"\nparam t = 0.5 in [0.0, 1.0]\nparam k = 2\n'
                      'param u = 1 - t\nmerge from a { "*" => linear([a, b], weights = [u, t]) }\n')
    r = ml.compile(recipe, k=3)
    res = r.tune(lambda state: -float(state["lm_head.weight"].sum()) ** 2, trials=3,
                 sampler="random", seed=0, study_name="s1")
    res.run(tmp_path / "tuned", device="cpu")
    best = res.best_trial
    prov = manifest(tmp_path / "tuned")["provenance"]
    label = f"tune: trial {best.number} of study 's1'"
    assert prov["param_origins"] == {"t": label, "k": "keyword argument",
                                     "u": "derived from t (the recipe's expression)"}
    assert prov["params"]["u"] == 1 - best.params["t"]
    copy = (tmp_path / "tuned" / "mergelang_recipe.mrg").read_text()
    assert f"param t = {best.params['t']!r} in [0.0, 1.0]  # chosen by {label}; the recipe said: 0.5" in copy
    assert "param k = 3  # overridden (keyword argument k=...); the recipe said: 2" in copy
    r.close()
    recipe.write_text('model a = "a"\nmodel b = "b"\nparam t = [0.5] learn\n'
                      'merge from a { "*" => task_arithmetic(a, [b], weights = t) }\n')
    r = ml.compile(recipe)
    learned = r.learn(lambda s, batch: s["lm_head.weight"].pow(2).mean(), range(3), lr=0.01)
    learned.run(tmp_path / "learned", device="cpu")
    origin = manifest(tmp_path / "learned")["provenance"]["param_origins"]["t"]
    assert origin.startswith("learn (3 steps, final loss ")
    assert "# chosen by learn (3 steps" in (tmp_path / "learned" / "mergelang_recipe.mrg").read_text()
    r.close()


# --------------------------------------------------------------------------- the recipe copy

def test_recipe_copy_reruns_from_anywhere_to_a_byte_identical_output(proj: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cli("run", proj / "recipe.mrg", "-o", out, "--set", "t=0.25", cwd=tmp_path)
    copy = (out / "mergelang_recipe.mrg").read_text()
    assert f'import {json.dumps(str(proj / "lib.mrg"))}' in copy
    assert f'model b = {json.dumps(str(proj / "models" / "b"))}  # the recipe said: "./models/b"' in copy
    # the copy, moved to an unrelated folder and run from yet another working directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "again.mrg").write_text(copy)
    (tmp_path / "cwd").mkdir()
    cli("run", elsewhere / "again.mrg", "-o", tmp_path / "again", cwd=tmp_path / "cwd")
    # and run in place, from the output folder itself
    cli("run", out / "mergelang_recipe.mrg", "-o", tmp_path / "inplace", cwd=out)
    records = {"README.md", "mergelang_manifest.json"}  # they name the command line
    want = {p.name: p.read_bytes() for p in out.iterdir() if p.name not in records}
    assert any(n.endswith(".safetensors") for n in want)
    for other in (tmp_path / "again", tmp_path / "inplace"):
        got = {p.name: p.read_bytes() for p in other.iterdir() if p.name not in records}
        assert got == want  # the recipe copy too: nothing is left to rewrite in it
        assert manifest(other)["digests"]["model-00001-of-00001.safetensors"] == \
            manifest(out)["digests"]["model-00001-of-00001.safetensors"]
    assert manifest(tmp_path / "again")["provenance"]["param_origins"]["t"] == "default"


# --------------------------------------------------------------------------- verify

def test_verify_reports_outputs_and_inputs(proj: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cli("run", proj / "recipe.mrg", "-o", out)
    res = cli("verify", out)
    assert "outputs ok" in res.output and "inputs ok" in res.output and "verified: ok" in res.output
    # an input file changed after the merge: same size and header, other data
    shard = proj / "models" / "b" / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    res = cli("verify", out, expect=1)
    assert "E422" in res.output and "models/b/model.safetensors holds other tensor data" in res.output
    assert "E422" in cli("verify", out, "--quick", expect=1).output  # its modification time
    cli("verify", out, "--no-inputs")
    # an output file changed, one added
    (out / "config.json").write_text("{}")
    (out / "extra.txt").write_text("x")
    res = cli("verify", out, "--no-inputs", expect=1)
    assert "E421" in res.output and "config.json: its content differs" in res.output
    assert "extra.txt: not written by mergelang" in res.output
    # not an output folder
    res = cli("verify", proj, expect=1)
    assert "E420" in res.output
    for missing in (proj / "nope", proj / "nope.safetensors"):  # a wrong path says so
        res = cli("verify", missing, expect=1)
        assert "E420" in res.output and "does not exist" in res.output, res.output


def test_extract_lora_output_has_a_card_and_provenance(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    base, tuned = tmp_path / "base", tmp_path / "tuned"
    for i, folder in enumerate((base, tuned)):
        folder.mkdir()
        g = torch.Generator().manual_seed(i)
        save_file({"model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=g)},
                  str(folder / "model.safetensors"))
    out = tmp_path / "lora"
    cli("extract-lora", base, tuned, "-o", out, "--rank", "2")
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and card.data.tags == ["merge", "mergelang"]
    assert f"mergelang extract-lora {base} {tuned} -o {out} --rank 2" in card.text
    prov = manifest(out)["provenance"]
    assert prov["tool"] == "extract-lora"
    rec = {i["name"]: i for i in prov["inputs"]}["finetuned"]["files"][0]
    assert rec["digest"] == independent_digest(tuned / "model.safetensors")
    assert "verified: ok" in cli("verify", out).output


def test_recipe_copy_rebases_paths_inside_model_expressions(tmp_path: Path) -> None:
    """`lora("ad", base = base)`: the adapter's relative path is made absolute in the copy too."""
    proj = tmp_path / "proj"
    for i, name in enumerate(("base", "tuned")):
        folder = proj / name
        folder.mkdir(parents=True)
        g = torch.Generator().manual_seed(i)
        save_file({"model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=g)},
                  str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cli("extract-lora", proj / "base", proj / "tuned", "-o", proj / "ad", "--rank", "2")
    (proj / "r.mrg").write_text('model base = "base"\nmodel t = lora("ad", base = base)\n'
                                'merge from base { "*" => linear([base, t]) }\n')
    out = tmp_path / "out"
    cli("run", proj / "r.mrg", "-o", out)
    copy = (out / "mergelang_recipe.mrg").read_text()
    assert f'model t = lora({json.dumps(str(proj / "ad"))}, base = base)  # the recipe said: "ad"' in copy
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "again.mrg").write_text(copy)
    cli("run", tmp_path / "x" / "again.mrg", "-o", tmp_path / "again", cwd=tmp_path / "x")
    records = {"README.md", "mergelang_manifest.json"}  # they name the command line
    got, want = ({p.name: p.read_bytes() for p in d.iterdir() if p.name not in records}
                 for d in (tmp_path / "again", out))
    assert got == want and any(n.endswith(".safetensors") for n in got)


@pytest.mark.parametrize("reader", ["mmap", "pread", "safetensors"])
def test_readers_digest_what_they_read(tmp_path: Path, monkeypatch, reader: str) -> None:
    """Each reader notes the CRC-32C of the bytes it reads (whole tensors, rows in order, empty
    tensors); rows read out of order leave their tensor uncovered (never read twice)."""
    from mergelang.io import checkpoint
    from mergelang.io.digests import covered, header_bytes, tensor_digest

    monkeypatch.setattr(checkpoint, "READER", reader)
    path = tmp_path / "m.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"a": torch.randn(300, 200, generator=g), "b": torch.randn(3, generator=g),
               "c": torch.zeros(0), "d": torch.randn(1000, 100, generator=g),
               "e": torch.randn(64, 64, generator=g)}, str(path))
    src = checkpoint.SafetensorsSource("x", [path], None)
    for n in ("a", "b", "c"):
        src.load_as(n, torch.float32)
    for lo, hi in ((0, 400), (400, 1000)):
        src.load_rows("d", torch.float32, lo, hi)
    src.load_rows("e", torch.float32, 32, 64)  # the second half first: out of order
    src.load_rows("e", torch.float32, 0, 32)
    done, missing = covered(src.tensors().values(), src.reads.crcs)
    want_missing = ["e"] if reader == "mmap" else []  # the other readers read whole tensors
    assert missing == want_missing
    assert tensor_digest(header_bytes(path), done) == independent_digest(path, frozenset(want_missing))
    src.close()


def test_verify_walks_named_outputs(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    make_model(tmp_path / "a", 0)
    make_model(tmp_path / "b", 1)
    recipe = tmp_path / "r.mrg"
    recipe.write_text('model a = "a"\nmodel b = "b"\n'
                      'merge "soup" from a { "*" => linear([a, b]) }\n'
                      'merge "delta" from b { "*" => b - a }\n')
    out = tmp_path / "out"
    cli("run", recipe, "-o", out)
    assert ModelCard.load(out / "delta" / "README.md").text.startswith("# delta")
    res = cli("verify", out)
    assert "2 named outputs" in res.output and res.output.count("outputs ok") == 2
    (out / "soup" / "config.json").write_text("{}")
    res = cli("verify", out, expect=1)
    assert "E421" in res.output and "soup: 1 of its files differ" in res.output
