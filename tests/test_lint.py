"""Pyflakes-class errors (ruff's F rules) anywhere in the code: an undefined name in a rarely
taken branch is otherwise found only when that branch runs (once, a broken import there made a
fast kernel silently fall back to a slow one)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_no_pyflakes_errors():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the test extras)")
    result = subprocess.run([ruff, "check", "--select", "F", "--output-format", "concise",
                             "mergelang", "tests", "benchmarks", "scripts"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
