"""The one line the test run ends with when whole groups of tests were skipped (conftest's
`pytest_terminal_summary`): which groups, how many tests each, and how to enable them. A skip
whose reason matches no group is counted under "other" (its reasons are in `pytest -rs`)."""

from __future__ import annotations

import re
from collections import Counter

#: (group, pattern on the skip reason, how to enable it)
GROUPS: list[tuple[str, str, str]] = [
    ("side by side with mergekit", r"MERGEKIT_PYTHON|mergekit venv",
     "set MERGEKIT_PYTHON to the python of a venv with mergekit==0.1.5 "
     "(python -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit==0.1.5)"),
    ("CUDA", r"needs CUDA|CUDA is not available", "run on a machine with a GPU (benchmarks/gpu_check.sh)"),
    ("optional packages", r"could not import|is not installed|pip install",
     'pip install -e ".[test]" (run `pytest -rs` for the package names)'),
]


def group_of(reason: str) -> str:
    for name, pattern, _ in GROUPS:
        if re.search(pattern, reason):
            return name
    return "other"


def summary(reasons: list[str]) -> str | None:
    """One line for the skip reasons of a run, or None when nothing was skipped."""
    if not reasons:
        return None
    counts = Counter(group_of(r) for r in reasons)
    how = {name: enable for name, _, enable in GROUPS}
    parts = []
    for name, _, _ in [*GROUPS, ("other", "", "")]:
        if counts[name]:
            n = counts[name]
            hint = how.get(name, "see `pytest -rs`")
            parts.append(f"{name} ({n} test{'s' if n != 1 else ''}: {hint})")
    return "skipped: " + "; ".join(parts)


def reason_of(report) -> str:
    """The reason of a skipped test report (a (file, line, reason) tuple for skips)."""
    longrepr = getattr(report, "longrepr", None)
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr or "")
