"""Fuzzing (issue 5): random and mutated recipes through parse + check give diagnostics only,
never another exception; random and mutated files through the safetensors header reader give
CheckpointError only. Small and derandomized here, so CI stays fast and stable; scripts/fuzz.py
runs the same targets for longer (MERGELANG_FUZZ_EXAMPLES, random seeds)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import fuzz_strategies as fz  # noqa: E402

LONG = "MERGELANG_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(max_examples=int(os.environ.get("MERGELANG_FUZZ_EXAMPLES", "40")), deadline=None,
                derandomize=not LONG, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return fz.make_models(tmp_path_factory.mktemp("fuzz"))


def test_seeds_compile(root: Path) -> None:
    from mergelang.compiler import compile_recipe
    from mergelang.diagnostics import SourceFile

    for text in fz.SEEDS:
        compile_recipe(SourceFile("<seed>", text), root).close()


@FUZZ
@given(text=fz.recipe_text)
def test_random_recipes(root: Path, text: str) -> None:
    fz.check_recipe(text, root)


@FUZZ
@given(text=fz.mutated_recipe())
def test_mutated_recipes(root: Path, text: str) -> None:
    fz.check_recipe(text, root)


@FUZZ
@given(data=fz.mutated_header_file())
def test_header_reader(root: Path, data: bytes) -> None:
    fz.check_header(data, root / "fuzz.safetensors")


@FUZZ
@given(text=fz.mutated_recipe())
def test_mutated_recipes_run(root: Path, text: str) -> None:
    """Past the parser: mutated recipes that compile also run on the tiny models."""
    fz.check_run(text, root)


@FUZZ
@given(text=fz.hostile_recipe())
def test_hostile_recipes(root: Path, text: str) -> None:
    """Deep nesting, long literals and huge arithmetic: diagnostics, never RecursionError."""
    fz.check_run(text, root)


@FUZZ
@given(data=fz.odd_shape_model())
def test_odd_shapes_check_and_run(root: Path, data: bytes) -> None:
    fz.check_odd_model(data, root)
