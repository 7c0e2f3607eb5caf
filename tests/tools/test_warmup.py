"""`mergelang warmup` compiles the generated loops a real merge of the common methods uses: after
it, a file-based TIES merge finds every loop it needs in the cache (no new generated module)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mergelang as ml
from helpers import write_model


def test_warmup_covers_a_real_ties_merge(tmp_path: Path, monkeypatch) -> None:
    from mergelang.runtime.kernels import cpu_exact
    from mergelang.tools.warmup import warmup

    if not cpu_exact.ENABLED:
        pytest.skip("fast CPU paths are off (MERGELANG_FAST=0)")
    pytest.importorskip("numba")
    monkeypatch.setenv("MERGELANG_CACHE_DIR", str(tmp_path / "cache"))
    warmup(models=(2,), dtypes=("bfloat16",))
    fused = tmp_path / "cache" / "fused"
    before = {p.name for p in fused.glob("fused_*.py")}
    assert before and all(list((fused / "__pycache__").glob(p[:-3] + ".*.nbi")) for p in before)
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.w": torch.randn(300, 400, generator=g).to(torch.bfloat16) for i in range(2)}
    paths = {"base": write_model(tmp_path / "base", base)}
    for k, name in enumerate(("a", "b")):
        paths[name] = write_model(tmp_path / name, {n: (t.float() + 0.1 * torch.randn(t.shape, generator=g)).to(
            torch.bfloat16) for n, t in base.items()})
    r = ml.compile("".join(f'model {k} = "{v}"\n' for k, v in paths.items()) +
                   'merge from base { "*" => ties(base, [a, b], density = 0.5) }\n')
    r.run(tmp_path / "out", device="cpu")
    assert {p.name for p in fused.glob("fused_*.py")} == before
