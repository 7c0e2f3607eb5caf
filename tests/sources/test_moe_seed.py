"""`moe(..., seed = S)` (issue 27, internal errors): a seed that is not a whole number in
0..2**63-1 (10**29, -1, 1.5, inf, a string, a bool) is E324 at compile time, never a RuntimeError
from torch's generator in `run`; a float with an integer value is accepted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import mergelang as ml
from mergelang.diagnostics import MergelangError

sys.path.insert(0, str(Path(__file__).resolve().parent))
pytest.importorskip("transformers")
from test_moe import _src, dense  # noqa: E402,F401  (dense: the module's fixture)


@pytest.mark.parametrize("seed", ["10 ** 29", "2 ** 63", "-1", "1.5", "1e300", '"x"', "true", "none"])
def test_bad_seed_is_E324(dense, seed: str) -> None:  # noqa: F811
    with pytest.raises(MergelangError) as exc:
        ml.compile(_src(dense, f'moe(base, [base, base], gate = "random", seed = {seed})', ("base",)))
    assert exc.value.codes == ["E324"] and "seed" in exc.value.render()


@pytest.mark.parametrize("seed", ["3", "3.0", "2 ** 63 - 1"])
def test_good_seed(dense, seed: str) -> None:  # noqa: F811
    ml.compile(_src(dense, f'moe(base, [base, base], gate = "random", seed = {seed})', ("base",))).close()
