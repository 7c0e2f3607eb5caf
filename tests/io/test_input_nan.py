"""--nan-check covers the inputs: a NaN/Inf in an input tensor is reported as it is read (E222
with nan_check "error", W125 per model and tensor with "warn", nothing with "off"), even when the
merge masks it out and the output is finite (TIES's top-k drops it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mergelang as ml
from mergelang.cli import main as cli_main

TIES = 'model base = "base"\nmodel a = "a"\nmodel b = "b"\nmerge from base { "*" => ties(base, [a, b], density = 0.3) }\n'


def _project(tmp_path: Path, bad: dict[str, dict[str, tuple[int, float]]],
             dtype: torch.dtype = torch.float32) -> Path:
    """base, a, b with tensors w (8x8) and n (8); `bad[model][tensor] = (flat index, value)`."""
    g = torch.Generator().manual_seed(0)
    for name in ("base", "a", "b"):
        (tmp_path / name).mkdir()
        t = {"w": torch.randn(8, 8, generator=g), "n": torch.randn(8, generator=g)}
        for k, (i, v) in bad.get(name, {}).items():
            t[k].view(-1)[i] = v
        save_file({k: v.to(dtype) for k, v in t.items()}, str(tmp_path / name / "model.safetensors"))
    (tmp_path / "r.mrg").write_text(TIES)
    return tmp_path / "r.mrg"


def _codes(diags) -> list[str]:
    return [d.code for d in diags if d.code != "W004"]  # W004: these folders have no config.json


def test_a_nan_ties_masks_out_still_warns(tmp_path: Path) -> None:
    recipe = _project(tmp_path, {"a": {"w": (0, float("nan"))}})
    r = ml.compile(recipe)
    r.run(tmp_path / "off", device="cpu", nan_check="off")
    out = load_file(str(next((tmp_path / "off").glob("*.safetensors"))))
    assert all(bool(torch.isfinite(v).all()) for v in out.values())  # masked out: finite output
    assert _codes(r.run_warnings) == []
    r.run(tmp_path / "warn", device="cpu", nan_check="warn")
    [w] = [d for d in r.run_warnings if d.code == "W125"]
    assert "`w`" in w.message and "model `a`" in w.message and "1 NaN and 0 infinite" in w.message
    assert w.span is not None and w.span.location().endswith(":2:11")  # model a's declaration
    with pytest.raises(ml.MergelangError) as ei:
        r.run(tmp_path / "err", device="cpu")  # nan_check = "error" is the default
    assert ei.value.codes == ["E222"] and "model `a`" in str(ei.value)
    assert ei.value.diagnostics[0].help and "--nan-check warn" in ei.value.diagnostics[0].help
    assert not (tmp_path / "err").exists()


def test_warn_lists_every_bad_tensor_and_model_once(tmp_path: Path) -> None:
    """Two models, three tensors, Inf and NaN, bf16 inputs, each read by three streaming passes
    (ties_global's two statistics passes and the merge): one W125 each."""
    bad = {"a": {"w": (3, float("inf")), "n": (1, float("nan"))}, "base": {"w": (5, float("-inf"))}}
    recipe = _project(tmp_path, bad, torch.bfloat16)
    recipe.write_text(TIES.replace("ties(base, [a, b], density = 0.3)", "ties_global(base, [a, b])"))
    assert ml.compile(recipe).emit("plan").count("# pass ") == 3
    r = ml.compile(recipe)
    r.run(tmp_path / "o", device="cpu", nan_check="warn")
    found = sorted(d.message for d in r.run_warnings if d.code == "W125")
    assert len(found) == 3, found
    assert any("`n` of model `a` has 1 NaN and 0 infinite" in m for m in found)
    assert any("`w` of model `a` has 0 NaN and 1 infinite" in m for m in found)
    assert any("`w` of model `base` has 0 NaN and 1 infinite" in m for m in found)


def test_row_chunked_reads_are_checked(tmp_path: Path) -> None:
    """Under a memory budget the tensors are read in row chunks: the chunk with the NaN is
    reported (here in the last row)."""
    g = torch.Generator().manual_seed(1)
    for name in ("base", "a", "b"):
        (tmp_path / name).mkdir()
        w = torch.randn(512, 256, generator=g)
        if name == "b":
            w[-1, -1] = float("nan")
        save_file({"w": w}, str(tmp_path / name / "model.safetensors"))
    (tmp_path / "r.mrg").write_text(TIES.replace("ties(base, [a, b], density = 0.3)", "linear([a, b])"))
    r = ml.compile(tmp_path / "r.mrg")
    assert "rows" in r.emit("plan", memory_budget="400KB")  # the plan is chunked
    with pytest.raises(ml.MergelangError) as ei:
        r.run(tmp_path / "o", device="cpu", memory_budget="400KB")
    assert ei.value.codes == ["E222"] and "model `b`" in str(ei.value)


@pytest.mark.parametrize("mode", ["error", "warn", "off"])
def test_cli_nan_check_covers_inputs(tmp_path: Path, mode: str) -> None:
    recipe = _project(tmp_path, {"b": {"n": (2, float("nan"))}})
    res = CliRunner().invoke(cli_main, ["run", str(recipe), "-o", str(tmp_path / "o"), "-q",
                                        "--nan-check", mode])
    assert "Traceback" not in res.output
    if mode == "error":
        assert res.exit_code == 1 and "error[E222]" in res.output and "model `b`" in res.output
    elif mode == "warn":
        assert res.exit_code == 0 and "warning[W125]" in res.output and "`n` of model `b`" in res.output
    else:
        assert res.exit_code == 0 and "W125" not in res.output and "E222" not in res.output
