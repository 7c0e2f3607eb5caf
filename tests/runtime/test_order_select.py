"""The radix select (GPU selection without sorting) against torch.kthvalue, on the CPU."""

from __future__ import annotations

import pytest
import torch

from mergelang.runtime.kernels.order import kth_largest_radix


@pytest.mark.parametrize("n,k", [(1, 1), (10, 3), (70_000, 1), (70_000, 70_000), (100_003, 20_001)])
def test_radix_select_equals_kthvalue(n, k):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=g)
    x[0, : n // 2] = x[0, 0]  # many equal values
    if n > 1:
        x[1, 1] = -0.0
    want = torch.kthvalue(x, n - k + 1, dim=-1, keepdim=True).values
    got = kth_largest_radix(x, k)
    assert torch.equal(got, want)


def test_radix_select_extremes():
    x = torch.tensor([[float("inf"), -float("inf"), 3.0, torch.finfo(torch.float32).tiny]])
    for k in range(1, 5):
        assert torch.equal(kth_largest_radix(x, k), torch.kthvalue(x, 5 - k, dim=-1, keepdim=True).values)
