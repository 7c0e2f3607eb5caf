"""The one bounded reader (io/textfile.py): every file mergelang reads as text, JSON or YAML is a
regular file of bounded size, read with one bounded read — a device (/dev/zero), a FIFO, a
folder or a huge (sparse) file is refused within a moment, by every command that reads one.

`test_no_other_module_reads_text_files` enumerates the package's raw reads, so a new one fails."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save_file

import mergelang as ml
from mergelang.diagnostics import MergelangError
from mergelang.io.textfile import TextFileError, read_json, read_text

PKG = Path(__file__).resolve().parents[2] / "mergelang"
RAW_READ = re.compile(r"\.read_text\(|\bjson\.loads?\(|\byaml\.\w*load|(?<![\w.])open\(|"
                      r"\.from_file\(|\.read_bytes\(")
#: raw reads that stay, each with its reason (module -> count)
ALLOWED = {
    "mergelang/io/textfile.py": "the reader itself",
    "mergelang/diagnostics.py": "SourceFile.read: the package's own stdlib files (below io in the layering)",
    "mergelang/lang/parser.py": "the package's own grammar file",
    "mergelang/lang/loader.py": "the package's own files hashed, and the stdlib parse cache (a pickle "
                                "in mergelang's cache folder, any error: parse again)",
    "mergelang/runtime/kernels/numba_codegen.py": "mergelang's generated-kernel cache file",
    "mergelang/sources/tokenizer.py": "json.loads/dumps of the tokenizers library's own string",
    "mergelang/io/checkpoint.py": "a safetensors header: binary, read with its declared length "
                                  "bounded (MAX_HEADER)",
    "mergelang/io/journal.py": "the work folder's journal: mergelang's own binary-framed file",
    "mergelang/interop/mergekit_import.py": "yaml parses text read by io/textfile.read_text",
    "mergelang/commands/search.py": "writes pareto.csv (a write, not a read)",
    "mergelang/commands/verify.py": "json.loads of a single-file output's metadata strings (inside a "
                                    "safetensors header read bounded by io/checkpoint)",
    "mergelang/interop/mergekit_yaml.py": "the bounded YAML loader parses text read by io/textfile",
    "mergelang/io/digests.py": "content digests of safetensors files: binary, streamed in blocks",
    "mergelang/io/singlefile.py": "copies the shards mergelang just wrote into one file (binary)",
    "mergelang/io/outguard.py": "the 16-byte SQLite magic of a --storage file (binary)",
}


def test_no_other_module_reads_text_files() -> None:
    found = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = str(p.relative_to(PKG.parent))
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if RAW_READ.search(line.split("#", 1)[0]) and rel not in ALLOWED:
                found.setdefault(rel, []).append(f"{i}: {line.strip()}")
    assert not found, ("read text/JSON/YAML with mergelang.io.textfile (read_text / read_json), "
                       f"not by hand: {json.dumps(found, indent=1)}")


def finishes(fn: Callable[[], Any], seconds: float = 20) -> BaseException | Any:
    """fn()'s exception (or result), failing the test if it does not finish in `seconds`."""
    box: list = []

    def go() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # noqa: BLE001
            box.append(exc)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    assert box, f"still reading after {seconds} s (a device or FIFO read without bound)"
    return box[0]


def hostile(path: Path, kind: str) -> Path:
    """`path` made a FIFO, a link to /dev/zero, a folder, or a sparse 3 GB file."""
    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    else:
        with open(path, "wb") as f:  # sparse: no disk used
            f.truncate(3 << 30)
    return path


KINDS = ["fifo", "zero", "folder", "huge"]


@pytest.mark.parametrize("kind", KINDS)
def test_reader_refuses_what_is_not_a_bounded_regular_file(tmp_path: Path, kind: str) -> None:
    p = hostile(tmp_path / "x.json", kind)
    for fn in (lambda: read_text(p), lambda: read_json(p)):
        got = finishes(fn)
        assert isinstance(got, TextFileError), got


def test_reader_reads_text_and_json(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_bytes(b'{"a": [1, 2.5, "\xc3\xa9"]}\r\n')
    assert read_json(p, obj=True) == {"a": [1, 2.5, "é"]}
    assert read_text(p) == '{"a": [1, 2.5, "é"]}\n'
    p.write_text("[" * 100000)
    with pytest.raises(TextFileError, match="nests too deeply"):
        read_json(p)
    p.write_text("[1]")
    with pytest.raises(TextFileError, match="not a JSON object"):
        read_json(p, obj=True)
    with pytest.raises(TextFileError, match="more than"):
        read_text(p, limit=2)


# --- every reading path, through the public entry points --------------------------------------


def model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.ones(4, 4)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def codes(fn: Callable[[], Any]) -> list[str]:
    got = finishes(fn)
    assert isinstance(got, MergelangError), got
    return got.codes


@pytest.mark.parametrize("kind", KINDS)
def test_mergekit_yaml(tmp_path: Path, kind: str) -> None:
    from mergelang.interop.mergekit_import import import_file

    assert codes(lambda: import_file(hostile(tmp_path / "m.yaml", kind))) == ["E701"]


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_config(tmp_path: Path, kind: str) -> None:
    base = model(tmp_path / "base")
    ad = tmp_path / "ad"
    ad.mkdir()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 4),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(4, 2)},
              str(ad / "adapter_model.safetensors"))
    hostile(ad / "adapter_config.json", kind)
    text = f'model base = "{base}"\nmodel a = lora("{ad}", base = base)\nmerge from base {{ "*" => a }}\n'
    got = codes(lambda: ml.compile(text))
    assert got == (["E314"] if kind == "zero" else ["E327"]), got


@pytest.mark.parametrize("kind", KINDS)
def test_index_json(tmp_path: Path, kind: str) -> None:
    m = model(tmp_path / "m")
    os.rename(m / "model.safetensors", m / "model-00001-of-00001.safetensors")
    hostile(m / "model.safetensors.index.json", kind)
    got = finishes(lambda: ml.compile(f'model m = "{m}"\nmerge from m {{ "*" => m }}\n'))
    if kind != "huge":  # not a regular file: never opened, the shards are found by name
        assert isinstance(got, ml.Recipe), got
    else:  # too big to be an index
        assert isinstance(got, MergelangError) and got.codes == ["E303"], got


@pytest.mark.parametrize("kind", KINDS)
def test_copied_json_and_config(tmp_path: Path, kind: str) -> None:
    m = model(tmp_path / "m")
    hostile(m / "generation_config.json", kind)
    hostile(m / "config.json", "huge" if kind == "folder" else kind)
    got = finishes(lambda: ml.compile(f'model m = "{m}"\nmerge from m {{ "*" => m }}\n'))
    # the config is read as an unusable (absent) one; a copied file that is not a bounded
    # regular file is not copied (or refused: a link leaving the folder)
    assert not isinstance(got, BaseException) or getattr(got, "codes", None) == ["E314"], got


@pytest.mark.parametrize("kind", KINDS)
def test_objective_file(tmp_path: Path, kind: str) -> None:
    from mergelang.search.objectives import load_function as load

    p = hostile(tmp_path / "obj.py", kind)
    got = finishes(lambda: load(f"{p}:score"))
    assert isinstance(got, MergelangError) and got.codes == ["E905"], got
