"""`mergelang extract-lora` on hostile inputs (issue 27, item 21 and its internal errors): an
inf / NaN in the fine-tune is E331 with no adapter written (never a NaN adapter with exit 0, nor
LinAlgError); int / bool 2-D tensors are saved at full rank, not factorised; a base lacking the
fine-tune's bias or with another bias shape is E302; a bad --include / --exclude regex is E109."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergelang.cli import main

Q = "model.layers.0.self_attn.q_proj"


def write(folder: Path, sd: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return str(folder)


def models(tmp_path: Path, ft_extra: dict | None = None, base_extra: dict | None = None,
           poison: float | None = None) -> tuple[str, str]:
    g = torch.Generator().manual_seed(0)
    base = {f"{Q}.weight": torch.randn(8, 6, generator=g), f"{Q}.bias": torch.randn(8, generator=g),
            "model.norm.weight": torch.ones(6)}
    ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    if poison is not None:
        ft[f"{Q}.weight"][2, 3] = poison
    base.update(base_extra or {})
    ft.update(ft_extra or {})
    return write(tmp_path / "base", base), write(tmp_path / "ft", ft)


def run(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["extract-lora", *map(str, args)])
    return res.exit_code, res.output


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_fine_tune_is_E331(tmp_path: Path, value: float) -> None:
    b, f = models(tmp_path, poison=value)
    code, out = run(b, f, "-o", tmp_path / "out", "--rank", "2")
    assert code == 1 and "E331" in out and "Traceback" not in out, out
    assert not (tmp_path / "out").exists()


def test_non_finite_full_rank_tensor_is_E331(tmp_path: Path) -> None:
    b, f = models(tmp_path, ft_extra={"model.norm.weight": torch.tensor([1.0, float("nan")] * 3)})
    code, out = run(b, f, "-o", tmp_path / "out", "--rank", "2")
    assert code == 1 and "E331" in out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int8])
def test_integer_and_bool_2d_tensors_are_not_factorised(tmp_path: Path, dtype) -> None:
    table = (torch.arange(12).reshape(3, 4) % 2).to(dtype)
    b, f = models(tmp_path, ft_extra={"model.mask.weight": table}, base_extra={"model.mask.weight": table})
    code, out = run(b, f, "-o", tmp_path / "out", "--rank", "2")
    assert code == 0, out
    sd = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert not any("mask" in k and "lora_" in k for k in sd)
    assert torch.equal(sd["base_model.model.model.mask.weight"], table)  # full rank, its dtype
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "mask" in cfg["modules_to_save"] and "q_proj" in cfg["target_modules"]


def test_base_without_the_bias_is_E302(tmp_path: Path) -> None:
    b, f = models(tmp_path)
    sd = load_file(str(Path(b) / "model.safetensors"))
    del sd[f"{Q}.bias"]
    save_file(sd, str(Path(b) / "model.safetensors"))
    code, out = run(b, f, "-o", tmp_path / "out", "--rank", "2")
    assert code == 1 and "E302" in out and "bias" in out and "Traceback" not in out


def test_bias_of_another_shape_is_E302(tmp_path: Path) -> None:
    b, f = models(tmp_path, base_extra={f"{Q}.bias": torch.ones(5)})
    code, out = run(b, f, "-o", tmp_path / "out", "--rank", "2")
    assert code == 1 and "E302" in out and "[5]" in out


@pytest.mark.parametrize("opt,regex", [("--include", "("), ("--exclude", "[a-"), ("--include", "(?=q)q")])
def test_bad_include_regex_is_E109(tmp_path: Path, opt: str, regex: str) -> None:
    b, f = models(tmp_path)
    code, out = run(b, f, "-o", tmp_path / "out", "--rank", "2", opt, regex)
    assert code == 1 and "E109" in out and "Traceback" not in out, out
