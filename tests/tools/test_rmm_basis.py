"""Issue 27 item 12: `rmm --basis` above what the adapters can use is clamped (W111), not
written as gigabytes of zeros; the rebuilt adapters are still exact (checked against the
original B @ A products, computed here from the input files)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergelang.cli import main

M = "base_model.model.layers.0.q_proj"


def _adapter(folder: Path, seed: int, rank: int = 4) -> Path:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    save_file({f"{M}.lora_A.weight": torch.randn(rank, 16, generator=g),
               f"{M}.lora_B.weight": torch.randn(12, rank, generator=g)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["q_proj"]}))
    return folder


def test_huge_basis_is_clamped_with_w111(tmp_path: Path) -> None:
    ads = [_adapter(tmp_path / f"t{i}", i) for i in range(2)]
    res = CliRunner().invoke(main, ["rmm", *map(str, ads), "-o", str(tmp_path / "rmm"),
                                    "--basis", "100000"])
    assert res.exit_code == 0, res.output
    assert "W111" in res.output and "clamped to 2" in res.output
    size = sum(p.stat().st_size for p in (tmp_path / "rmm").iterdir())
    assert size < 100_000, size  # not 100000 x (16 + 12) x 4 floats of zeros
    cfg = json.loads((tmp_path / "rmm" / "rmm_config.json").read_text())
    assert cfg["basis"] == 2
    for i, ad in enumerate(ads):
        out = tmp_path / f"re{i}"
        r = CliRunner().invoke(main, ["rmm-rebuild", str(tmp_path / "rmm"), "--task", str(i), "-o", str(out)])
        assert r.exit_code == 0, r.output
        got, want = load_file(str(out / "adapter_model.safetensors")), load_file(str(ad / "adapter_model.safetensors"))
        assert torch.allclose(got[f"{M}.lora_B.weight"] @ got[f"{M}.lora_A.weight"],
                              want[f"{M}.lora_B.weight"] @ want[f"{M}.lora_A.weight"], atol=1e-4)
