"""Hostile block-scaled FP8 checkpoints (issue 27, item 14): `weight_block_size` checked in
`check` (E330: not two whole numbers in 1..65536; 128.0 is 128), blocks larger than the weight
bounded in every path (one block covers it), 1-D / 0-D FP8 weights with a scale (E321), and
NaN / inf in an FP8 output counted by --nan-check (torch has no isinf for FP8)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelang as ml
from mergelang.diagnostics import MergelangError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_fp8 import QCFG, write_fp8  # noqa: E402


def _with_block(tmp_path: Path, block) -> Path:
    return write_fp8(tmp_path / "a", 0, 1.0, config={"model_type": "deepseek_v3",
                                                      "quantization_config": {**QCFG, "weight_block_size": block}})


def _recipe(a: Path, rule: str = "a", extra: str = "") -> str:
    return f'model a = "{a}"\n{extra}merge from a {{ "*" => {rule} }}\n'


@pytest.mark.parametrize("block", [[1e9, 1e9], [10 ** 9, 10 ** 9], [128.5, 128], [0, 128], [-128, 128],
                                   [128], "128", [True, 128], [None, 128], [128, 128, 128]])
def test_invalid_block_size_is_E330(tmp_path: Path, block) -> None:
    a = _with_block(tmp_path, block)
    with pytest.raises(MergelangError) as ei:
        ml.compile(_recipe(a))
    assert ei.value.codes == ["E330"], ei.value.render()


def test_float_block_size_counts_as_int(tmp_path: Path) -> None:
    a = _with_block(tmp_path, [128.0, 128.0])
    b = write_fp8(tmp_path / "b", 0, 1.0)  # the same weights with [128, 128]
    ra, rb = ml.compile(_recipe(a)), ml.compile(_recipe(b))
    got, want = ra.evaluate(), rb.evaluate()
    ra.close(), rb.close()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def _big_block_model(folder: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(6, 4, generator=g) * 100).to(torch.float8_e4m3fn)
    s = torch.tensor([[0.25]])
    save_file({"w": q, "w_scale_inv": s, "n": torch.ones(4)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "deepseek_v3", "quantization_config": {**QCFG, "weight_block_size": [65536, 65536]}}))
    return folder, q, s


def test_block_larger_than_the_weight_is_one_block(tmp_path: Path) -> None:
    """A [65536, 65536] block over a [6, 4] weight with a [1, 1] scale: read as q * s (never a
    65536-row repeat), and written back re-quantized with one scale."""
    a, q, s = _big_block_model(tmp_path / "a")
    r = ml.compile(_recipe(a, "a * 2.0", 'option dtype = "float32"\n'))
    got = r.evaluate()
    r.close()
    want = q.to(torch.float32) * 0.25 * 2.0
    torch.testing.assert_close(got["w"], want)
    r = ml.compile(_recipe(a, "a * 2.0"))
    r.run(tmp_path / "out", device="cpu")
    r.close()
    out = load_file(str(tmp_path / "out" / "model-00001-of-00001.safetensors"))
    assert out["w_scale_inv"].shape == (1, 1) and out["w"].dtype == torch.float8_e4m3fn
    amax = want.abs().max() / 448.0  # independent: one block, amax / 448
    torch.testing.assert_close(out["w_scale_inv"], amax.reshape(1, 1))


@pytest.mark.parametrize("shape", [(8,), ()])
def test_fp8_weight_that_is_not_2d_with_a_scale_is_E321(tmp_path: Path, shape) -> None:
    a = write_fp8(tmp_path / "a", 0, 1.0)
    sd = load_file(str(a / "model.safetensors"))
    sd["odd.weight"] = torch.ones(shape).to(torch.float8_e4m3fn)
    sd["odd.weight_scale_inv"] = torch.ones(1, 1)
    save_file(sd, str(a / "model.safetensors"))
    with pytest.raises(MergelangError) as ei:
        ml.compile(_recipe(a))
    assert ei.value.codes == ["E321"] and "odd.weight" in ei.value.render()


@pytest.mark.parametrize("mode", ["warn", "error"])
def test_nan_check_of_an_fp8_output(tmp_path: Path, mode: str) -> None:
    """inf in the float32 result: the FP8 output holds NaN (the block's scale is inf); counted,
    not NotImplementedError."""
    a = write_fp8(tmp_path / "a", 0, 1.0)
    r = ml.compile(_recipe(a, "a * 1e38 * 100.0", f'option nan_check = "{mode}"\n'))
    if mode == "error":
        with pytest.raises(MergelangError) as ei:
            r.run(tmp_path / "out", device="cpu")
        assert ei.value.codes == ["E503"]
    else:
        r.run(tmp_path / "out", device="cpu")
        bad = [d for d in r.run_warnings if d.code == "E503" and "q_proj.weight`" in d.message]
        assert bad and "NaN" in bad[0].message
    r.close()
