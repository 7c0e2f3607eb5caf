"""The CPU block-quantization kernels (runtime/kernels/numba_fp8.py) against torch: the FP8
conversions against torch's cast, code for code, and the kernels against the torch
BLOCK_QUANT kernel followed by the OUTPUT's cast."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from numba import njit

from mergelang.runtime.kernels import numba_fp8
from mergelang.runtime.kernels.linalg import _block_quant

FORMATS = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}


@njit
def _convert(a, out, e4m3):
    for i in range(a.shape[0]):
        out[i] = numba_fp8.to_e4m3(a[i]) if e4m3 else numba_fp8.to_e5m2(a[i])


def _probe_values() -> np.ndarray:
    """Every float32 exponent, both signs, with the mantissas around both formats' rounding
    points (kept bit, guard bit, sticky bits), plus random bit patterns, NaN and infinities."""
    mants = set()
    for shift in (20, 21):  # e4m3 keeps 3 mantissa bits, e5m2 2
        for k in range(1 << (23 - shift)):
            base = k << shift
            half = 1 << (shift - 1)
            mants |= {base, base + 1, base + half - 1, base + half, base + half + 1,
                      base + (1 << shift) - 1}
    mants = np.array(sorted(m for m in mants if m < (1 << 23)), np.uint32)
    exps = np.arange(256, dtype=np.uint32) << np.uint32(23)
    grid = (exps[:, None] | mants[None, :]).reshape(-1)
    rand = np.random.default_rng(0).integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
    bits = np.concatenate([grid, grid | np.uint32(0x80000000), rand])
    return bits.view(np.float32)


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_conversion_matches_torch_cast(dtype) -> None:
    x = _probe_values()
    got = np.empty(x.shape, np.uint8)
    _convert(x, got, dtype == "float8_e4m3fn")
    want = torch.from_numpy(x).to(getattr(torch, dtype)).view(torch.uint8).numpy()
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, [(hex(int(x.view(np.uint32)[i])), hex(got[i]), hex(want[i])) for i in bad[:5]]


def _node(part: str, block, fmax, codes=None):
    attrs = {"block": block, "fmax": fmax, "part": part, "numba": True}
    if codes:
        attrs["codes"] = codes
    return SimpleNamespace(attrs=attrs)


def _bits_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    nx, ny = torch.isnan(x), torch.isnan(y)
    return torch.equal(nx, ny) and torch.equal(x.view(torch.int32)[~nx], y.view(torch.int32)[~ny])


@pytest.mark.parametrize("dtype", list(FORMATS))
@pytest.mark.parametrize("shape,block", [((300, 260), (128, 128)), ((129, 1000), (64, 32)),
                                         ((7, 5), (128, 128)), ((256, 384), (128, 128))])
def test_kernels_match_the_torch_kernel(dtype, shape, block) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * torch.logspace(-30, 30, shape[1]).to(torch.float32)
    x[: block[0], : block[1]] = 0.0  # an all-zero block: scale 0, codes 0
    x[0, -1] = -0.0
    if shape[0] > block[0]:
        x[block[0], 0] = float("nan")  # a NaN block
        x[-1, -1] = float("inf")
    fmax = FORMATS[dtype]
    for part in ("scale_inv", "values"):
        want = _block_quant(_node(part, block, fmax), [x])
        got = numba_fp8.run(_node(part, block, fmax, dtype if part == "values" else None), [x])
        if part == "values":
            want = want.to(getattr(torch, dtype))
            assert got.dtype == want.dtype
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        else:
            assert _bits_equal(got, want)


def test_threads_split_block_rows(monkeypatch) -> None:
    from mergelang.runtime.kernels import numba_codegen

    monkeypatch.setattr(numba_codegen, "PARALLEL_ELEMENTS", 1)
    monkeypatch.setattr(numba_codegen, "THREADS", 3)
    x = torch.randn(1000, 300, generator=torch.Generator().manual_seed(2))
    node = _node("values", (128, 128), 448.0, "float8_e4m3fn")
    want = _block_quant(node, [x]).to(torch.float8_e4m3fn)
    assert torch.equal(numba_fp8.run(node, [x]).view(torch.uint8), want.view(torch.uint8))


def test_without_the_numba_kernels_torch_gives_the_same_bytes(monkeypatch) -> None:
    """A marked BLOCK_QUANT where numba_fp8 cannot load (e.g. no writable cache): torch's kernel
    and the cast, the same codes."""
    import sys

    from mergelang.ir.ops import Op
    from mergelang.runtime.kernels.registry import DEVICE_KERNELS

    x = torch.randn(300, 260, generator=torch.Generator().manual_seed(3))
    node = _node("values", (128, 128), 448.0, "float8_e4m3fn")
    want = numba_fp8.run(node, [x])
    monkeypatch.setitem(sys.modules, "mergelang.runtime.kernels.numba_fp8", None)  # import fails
    got = DEVICE_KERNELS[(Op.BLOCK_QUANT, "cpu")](node, [x])
    assert got.dtype == torch.float8_e4m3fn and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
