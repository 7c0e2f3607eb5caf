"""The benchmark, example and helper scripts import only names mergelang still has: a rename in
the package (e.g. `api` no longer re-exporting `SourceFile`) must not break a script that no test
runs (benchmarks/bench_trials.py, run by benchmarks/gpu_check.sh, did)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports() -> dict[str, set[tuple[str, str]]]:
    """module -> {(name, script)} for every `from mergelang... import name` in the scripts."""
    found: dict[str, set[tuple[str, str]]] = {}
    for folder in ("benchmarks", "examples", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                        node.module.split(".")[0] == "mergelang":
                    for alias in node.names:
                        found.setdefault(node.module, set()).add(
                            (alias.name, str(path.relative_to(ROOT))))
    return found


def test_scripts_import_existing_names() -> None:
    missing = []
    for module, names in sorted(_imports().items()):
        mod = importlib.import_module(module)
        for name, script in sorted(names):
            if name != "*" and not hasattr(mod, name):
                try:  # a submodule imported by name
                    importlib.import_module(f"{module}.{name}")
                except ImportError:
                    missing.append(f"{script}: from {module} import {name}")
    assert not missing, "scripts import names mergelang does not have:\n" + "\n".join(missing)
