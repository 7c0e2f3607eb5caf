"""Shared test set-up. The tests mirror the package (tests/lang, tests/passes, tests/runtime,
tests/io, tests/sources, tests/interop, tests/methods for the standard library; driver-level
tests at the top). Helper modules live here at the top of tests/ (`helpers`, `reference`,
`reference_more`, `fuzz_strategies`, `align_helpers`): this folder is put on sys.path so that a
test in any sub-folder imports them by name."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
for p in (TESTS, TESTS.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
