"""The closing line of a test run names the skipped groups and how to enable them
(tests/skip_summary.py, called by conftest's pytest_terminal_summary)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from skip_summary import group_of, summary

REPO = Path(__file__).resolve().parents[1]


def test_groups_and_hints() -> None:
    reasons = ["no mergekit venv ($MERGEKIT_PYTHON or $MERGEKIT)"] * 21 + ["needs CUDA"] * 5 + \
        ["could not import 'ray': No module named 'ray'", "something else"]
    line = summary(reasons)
    assert line.startswith("skipped: side by side with mergekit (21 tests: set MERGEKIT_PYTHON")
    assert "CUDA (5 tests: run on a machine with a GPU" in line
    assert "optional packages (1 test: " in line and "other (1 test: see `pytest -rs`)" in line
    assert "\n" not in line
    assert summary([]) is None
    assert group_of("needs a mergekit venv (MERGEKIT_PYTHON)") == "side by side with mergekit"


def test_a_run_ends_with_the_line(tmp_path: Path) -> None:
    """A real pytest run (this conftest) over a file with one skipped side-by-side test."""
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\n@pytest.mark.skipif(True, reason='no mergekit venv ($MERGEKIT_PYTHON)')\n"
        "def test_a():\n    pass\n\ndef test_b():\n    pass\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--confcutdir", str(tmp_path), "-c", "/dev/null", "--rootdir", str(tmp_path),
                          "-p", "conftest", str(tmp_path / "test_x.py")],
                         capture_output=True, text=True, cwd=REPO / "tests", timeout=120)
    last = [ln for ln in out.stdout.splitlines() if ln.startswith("skipped: ")]
    assert last == ["skipped: side by side with mergekit (1 test: set MERGEKIT_PYTHON to the python "
                    "of a venv with mergekit==0.1.5 (python -m venv /tmp/mk && /tmp/mk/bin/pip "
                    "install torch==2.13.0 mergekit==0.1.5))"], out.stdout + out.stderr
