"""Bad inputs give a diagnostic with the right code, never a traceback (issue 5): corrupt
safetensors, bad index files, unsupported dtypes, pickle checkpoints (refused by default, read
with torch.load(weights_only=True) under --allow-pickle, never running code)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mergelang as ml  # noqa: E402
from mergelang.io.checkpoint import CheckpointError, read_header  # noqa: E402


def st_bytes(header: dict | bytes, data: bytes = b"", n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def valid_bytes(tmp: Path) -> bytes:
    p = tmp / "_valid.safetensors"
    save_file({"w": torch.arange(16.0).reshape(4, 4)}, p)
    return p.read_bytes()


F32_4 = {"dtype": "F32", "shape": [4]}


def _file(content: Callable[[Path], bytes]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        data = content(folder.parent)
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(data)
        return folder
    return make


def _index(names: dict[str, str], create: tuple[str, ...] = ()) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        folder.mkdir()
        for rel in create:
            p = (folder / rel).resolve()
            p.parent.mkdir(parents=True, exist_ok=True)
            save_file({"w": torch.zeros(2)}, p)
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
        return folder
    return make


def _pickle_folder(folder: Path) -> Path:
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    return folder


def _pickle_file(folder: Path) -> Path:
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "weights.pt")
    return folder / "weights.pt"


# name: (builder, expected code, words expected in the message)
CASES: dict[str, tuple[Callable[[Path], Path], str, str]] = {
    "truncated": (_file(lambda t: valid_bytes(t)[:-10]), "E303", "outside the data"),
    "truncated_in_header": (_file(lambda t: valid_bytes(t)[:20]), "E303", "bad header length"),
    "too_short": (_file(lambda t: b"\x01\x02\x03"), "E303", "too short"),
    "empty": (_file(lambda t: b""), "E303", "too short"),
    "bad_header_length": (_file(lambda t: st_bytes({"w": {**F32_4, "data_offsets": [0, 16]}},
                                                   bytes(16), n=2**40)), "E303", "bad header length"),
    "json_garbage": (_file(lambda t: st_bytes(b"{not json at all", bytes(16))), "E303", "not valid JSON"),
    "binary_header": (_file(lambda t: st_bytes(b"\xff\xfe\x00garbage", b"")), "E303", "not valid JSON"),
    "header_not_object": (_file(lambda t: st_bytes(b"[1, 2, 3]")), "E303", "not a JSON object"),
    "malformed_entry": (_file(lambda t: st_bytes({"w": {"dtype": "F32"}})), "E303", "malformed"),
    "offsets_past_eof": (_file(lambda t: st_bytes({"w": {**F32_4, "data_offsets": [0, 16]}}, bytes(8))),
                         "E303", "outside the data"),
    "negative_offsets": (_file(lambda t: st_bytes({"w": {**F32_4, "data_offsets": [-16, 0]}}, bytes(16))),
                         "E303", "outside the data"),
    "overlapping_offsets": (_file(lambda t: st_bytes({"a": {**F32_4, "data_offsets": [0, 16]},
                                                      "b": {**F32_4, "data_offsets": [8, 24]}}, bytes(24))),
                            "E303", "overlap"),
    "gap_between_tensors": (_file(lambda t: st_bytes({"a": {**F32_4, "data_offsets": [0, 16]},
                                                      "b": {**F32_4, "data_offsets": [24, 40]}}, bytes(40))),
                            "E303", "has a gap"),
    "trailing_bytes": (_file(lambda t: st_bytes({"w": {**F32_4, "data_offsets": [0, 16]}}, bytes(20))),
                       "E303", "not covered by the header"),
    "bad_metadata": (_file(lambda t: st_bytes({"__metadata__": {"x": 1}, "w": {**F32_4, "data_offsets": [0, 16]}},
                                              bytes(16))), "E303", "__metadata__"),
    "string_shape": (_file(lambda t: st_bytes({"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}},
                                              bytes(16))), "E303", "malformed"),
    "size_mismatch": (_file(lambda t: st_bytes({"w": {**F32_4, "data_offsets": [0, 12]}}, bytes(16))),
                      "E303", "needs 16"),
    "unsupported_dtype": (_file(lambda t: st_bytes({"w": {"dtype": "C64", "shape": [2],
                                                          "data_offsets": [0, 16]}}, bytes(16))),
                          "E206", "unsupported dtype C64"),
    "index_missing_shard": (_index({"w": "model-00001-of-00002.safetensors",
                                    "v": "model-00002-of-00002.safetensors"},
                                   ("model-00001-of-00002.safetensors",)), "E307", "is missing"),
    "index_traversal": (_index({"w": "../outside.safetensors"}, ("../outside.safetensors",)),
                        "E308", "outside the model folder"),
    "index_absolute_path": (_index({"w": "/etc/passwd"}), "E308", "outside the model folder"),
    "index_garbage": (_index({"w": 5}), "E303", "not a valid index"),  # type: ignore[dict-item]
    "pickle_folder": (_pickle_folder, "E306", "pickle"),
    "pickle_file": (_pickle_file, "E306", "pickle"),
}


def recipe_for(path: Path) -> str:
    return f'model m = "{path}"\nmerge from m {{\n    "*" => m\n}}\n'


@pytest.mark.parametrize("case", sorted(CASES))
def test_api_diagnostic(case: str, tmp_path: Path) -> None:
    build, code, words = CASES[case]
    path = build(tmp_path / case)
    with pytest.raises(ml.MergelangError) as ei:
        ml.compile(recipe_for(path))
    assert ei.value.codes == [code], str(ei.value)
    text = str(ei.value)
    assert words in text and "model `m`" in text
    assert ei.value.diagnostics[0].span is not None  # points at the model's declaration


def test_cli_subprocess_reports_every_fault(tmp_path: Path) -> None:
    """One `mergelang check` over a recipe declaring every bad model: all codes, exit 1, no
    traceback (a real process, as users run it)."""
    lines = []
    for i, case in enumerate(sorted(CASES)):
        lines.append(f'model m{i} = "{CASES[case][0](tmp_path / case)}"')
    recipe = tmp_path / "bad.mrg"
    recipe.write_text("\n".join(lines) + '\nmerge from m0 {\n    "*" => m0\n}\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "mergelang", "check", str(recipe)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    for i, case in enumerate(sorted(CASES)):
        code = CASES[case][1]
        assert f"error[{code}]: model `m{i}`" in proc.stderr, case
    assert f"mergelang: {len(CASES)} errors" in proc.stderr


def test_read_header_raises_only_checkpoint_error(tmp_path: Path) -> None:
    for case, (build, code, _) in CASES.items():
        if case.startswith(("index", "pickle")):
            continue
        with pytest.raises(CheckpointError) as ei:
            read_header(build(tmp_path / case) / "model.safetensors")
        assert ei.value.code == code


def test_input_broken_after_check_is_a_runtime_diagnostic(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w": torch.randn(64, 64), "v": torch.randn(64)}, folder / "model.safetensors")
    recipe = ml.compile(recipe_for(folder))
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # truncated between `check` and `run`
    with pytest.raises(ml.MergelangError) as ei:
        recipe.run(tmp_path / "out", device="cpu")
    assert ei.value.codes == ["E303"]
    assert "cannot read tensor" in str(ei.value) or "cannot map tensor" in str(ei.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- pickle opt-in

class Evil:
    """Unpickling this would run a command (it must never happen)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_allow_pickle_reads_weights_only(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    sd_p = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}
    sd_s = {k: torch.randn(v.shape, generator=g) for k, v in sd_p.items()}
    (tmp_path / "p").mkdir()
    (tmp_path / "s").mkdir()
    # a sharded pickle checkpoint with its index, as transformers writes it
    torch.save({"w": sd_p["w"]}, tmp_path / "p" / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": sd_p["b"]}, tmp_path / "p" / "pytorch_model-00002-of-00002.bin")
    (tmp_path / "p" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "w": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    save_file(sd_s, tmp_path / "s" / "model.safetensors")
    text = (f'model p = "{tmp_path / "p"}"\nmodel s = "{tmp_path / "s"}"\n'
            'merge from s {\n    "*" => linear([p, s])\n}\n')
    with pytest.raises(ml.MergelangError) as ei:
        ml.compile(text)
    assert ei.value.codes == ["E306"] and "--allow-pickle" in str(ei.value)
    out = ml.compile(text, allow_pickle=True).evaluate()
    for k in sd_p:
        torch.testing.assert_close(out[k], (sd_p[k] + sd_s[k]) / 2)

    from click.testing import CliRunner

    from mergelang.cli import main

    recipe = tmp_path / "r.mrg"
    recipe.write_text(text)
    assert CliRunner().invoke(main, ["check", str(recipe)]).exit_code == 1
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out"), "-q",
                                       "--allow-pickle"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_allow_pickle_never_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"w": torch.zeros(2), "x": Evil(marker)}, folder / "pytorch_model.bin")
    recipe = recipe_for(folder)
    with pytest.raises(ml.MergelangError) as ei:
        ml.compile(recipe)
    assert ei.value.codes == ["E306"]
    with pytest.raises(ml.MergelangError) as ei:
        ml.compile(recipe, allow_pickle=True)
    assert ei.value.codes == ["E309"] and "weights_only" in str(ei.value)
    assert not marker.exists()

    torch.save([torch.zeros(2)], folder / "pytorch_model.bin")  # not a state dict
    with pytest.raises(ml.MergelangError) as ei:
        ml.compile(recipe, allow_pickle=True)
    assert ei.value.codes == ["E303"] and "not a state dict" in str(ei.value)


def test_no_code_execution_paths_in_the_package() -> None:
    """No trust_remote_code except an explicit `= False`; every torch.load is weights_only=True."""
    import re

    for py in sorted((REPO / "mergelang").rglob("*.py")):
        text = py.read_text()
        assert not re.search(r"trust_remote_code\s*=(?!\s*False\b)", text), py  # explicitly False is fine
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f"{py}: {m.group(0)}"
