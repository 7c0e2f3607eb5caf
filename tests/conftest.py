"""Shared test set-up. The tests mirror the package (tests/lang, tests/passes, tests/runtime,
tests/io, tests/sources, tests/interop, tests/methods for the standard library; driver-level
tests at the top). Helper modules live here at the top of tests/ (`helpers`, `reference`,
`reference_more`, `fuzz_strategies`, `align_helpers`): this folder is put on sys.path so that a
test in any sub-folder imports them by name."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# the helper modules, the repository (benchmarks, examples), and every sub-folder: a few tests
# reuse another test module's builders (e.g. `from test_mergekit_import import _tensors`);
# test file names are unique across the sub-folders, so each module has one name
for p in (TESTS, TESTS.parent, *sorted(d for d in TESTS.iterdir() if d.is_dir() and d.name != "golden")):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def pytest_terminal_summary(terminalreporter) -> None:
    """One closing line naming the groups of skipped tests and how to enable them (e.g. the
    side-by-side tests against mergekit, which need MERGEKIT_PYTHON): tests/skip_summary.py."""
    from skip_summary import reason_of, summary

    line = summary([reason_of(r) for r in terminalreporter.stats.get("skipped", [])])
    if line:
        terminalreporter.write_line(line, yellow=True)


def pytest_sessionfinish(session) -> None:
    """In a pytest-xdist worker, ignore SIGINT from here on. When the controller ends the run,
    execnet gives each worker 5 s to finish and then sends it a SIGINT; a worker still tearing
    down then (pytest's final gc.collect over torch's, numba's and Ray's objects can take that
    long on a loaded machine) raised KeyboardInterrupt inside whatever ran, typically
    hypothesis' gc callback, which pytest reported as a stray PytestUnraisableExceptionWarning
    at the end of the run. The worker's tests are over; Ctrl-C still stops the controller."""
    if hasattr(session.config, "workerinput"):
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
