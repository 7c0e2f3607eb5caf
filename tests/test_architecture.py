"""The package's architecture, checked from the source (every `import`, also those inside
functions): no import cycles between modules, imports run from lower compiler stages to higher
ones only (a short, listed set of exceptions), and no module over 500 lines.

Stages, lowest first (docs/design.md, "Layout"):

    base      mergelang._version, errors, diagnostics, cachedir, resources
    ir        mergelang.ir.*          (the typed graph and its vocabulary)
    io        mergelang.io.*          (checkpoint readers, writers, journal, output rules)
    lang      mergelang.lang.*        (text -> checked, elaborated recipe; intrinsics)
    sources   mergelang.sources.*     (derived model sources: lora, stacking, vocab, align)
    passes    mergelang.passes.*      (graph passes, lowering, plan passes)
    runtime   mergelang.runtime.*     (executors, buffers, workers, kernels)
    interop   mergelang.interop.*     (mergekit)
    driver    compiler, options, api, cli, explain, progress, the package itself

Importing a submodule (`from mergelang.x import member`) runs the parent package's `__init__`;
that is package initialisation, not a dependency, so it is not an edge here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PKG = Path(__file__).resolve().parents[1] / "mergelang"
STAGES = ["base", "ir", "io", "lang", "sources", "passes", "runtime", "interop", "driver"]
BASE = {"mergelang._version", "mergelang.errors", "mergelang.diagnostics", "mergelang.cachedir",
        "mergelang.resources"}
#: upward imports that are allowed (at most 3; each with its reason)
ALLOWED_UP: dict[tuple[str, str], str] = {
    ("mergelang.passes.optimize", "mergelang.runtime.interpret"):
        "constant folding runs the runtime's plan interpreter and, through it, the runtime's own "
        "torch kernels, so a folded value has exactly the bits the runtime would compute",
}
MAX_LINES = 500


def modname(p: Path) -> str:
    parts = list(p.with_suffix("").relative_to(PKG.parent).parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def stage(mod: str) -> int:
    if mod in BASE:
        return 0
    parts = mod.split(".")
    if len(parts) > 1 and parts[1] in STAGES:
        return STAGES.index(parts[1])
    return STAGES.index("driver")


def import_graph() -> nx.DiGraph:
    mods = {modname(p): p for p in PKG.rglob("*.py")}
    g = nx.DiGraph()
    for m, p in mods.items():
        g.add_node(m)
        tree = ast.parse(p.read_text(encoding="utf-8"))
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    if node.level > 1:
                        base = base[: -(node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                targets = subs if subs else [target]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in mods and t != m:
                    g.add_edge(m, t)
    return g


def test_no_import_cycles() -> None:
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_imports_run_from_lower_stages_to_higher_ones() -> None:
    g = import_graph()
    up = [(a, b) for a, b in g.edges if stage(a) < stage(b) and (a, b) not in ALLOWED_UP]
    assert not up, "imports from a lower stage to a higher one:\n" + "\n".join(f"  {a} -> {b}" for a, b in up)
    assert len(ALLOWED_UP) <= 3


def test_modules_are_small() -> None:
    big = {modname(p): n for p in PKG.rglob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_few_modules_at_the_top() -> None:
    top = [p.name for p in PKG.glob("*.py")]
    assert len(top) <= 14, top


def test_every_op_has_an_entry_in_the_op_table_and_its_kernels() -> None:
    """ir/ops.OP_INFO is the one table of ops: every Op has an OpInfo, every device an op claims
    has a kernel (runtime/kernels), and the passes' views agree with the table."""
    from mergelang.ir.ops import ELEMENTWISE, FOLDABLE, OP_INFO, Op
    from mergelang.passes.fuse import OPCODES
    from mergelang.runtime.kernels import DEVICE_KERNELS, KERNELS

    assert set(OP_INFO) == set(Op), set(Op) - set(OP_INFO)
    for op, info in OP_INFO.items():
        assert info.row_local in ("yes", "scoped", "elementwise", "no"), op
        assert info.rule is not None and (info.arity is None or info.arity >= 0), op
        for dev in info.devices:
            assert op in KERNELS if dev == "any" else (op, dev) in DEVICE_KERNELS, (op, dev)
        if info.elementwise:
            assert info.row_local == "yes" and info.foldable, op
    assert ELEMENTWISE <= FOLDABLE
    assert set(OPCODES) == {op for op, i in OP_INFO.items() if i.opcode}


#: file names comments use as examples of a user's file, not as pointers into the package
PLACEHOLDERS = {"file.py", "methods.py", "eval.py", "setup.py", "conftest.py"}


def test_comments_name_only_files_that_exist() -> None:
    """A comment or docstring naming a `.py` file of the package names one that exists (renamed
    modules leave stale pointers otherwise)."""
    import re

    names = {p.name for p in PKG.rglob("*.py")}
    paths = {str(p.relative_to(PKG)) for p in PKG.rglob("*.py")}
    stale = []
    for p in PKG.rglob("*.py"):
        for m in re.finditer(r"(?<![\w/.])((?:[a-z_]+/)*[a-z_][a-z0-9_]*\.py)\b(?!\()", p.read_text(encoding="utf-8")):
            ref = m.group(1)
            if ref in names or ref in paths or any(q.endswith("/" + ref) for q in paths):
                continue
            if ref.startswith(("tests/", "examples/", "benchmarks/", "scripts/", "mergekit/")) or (
                    "/" not in ref and (ref.startswith("test_") or ref in PLACEHOLDERS)):
                continue
            stale.append(f"{modname(p)}: {ref}")
    assert not stale, "comments name files that do not exist:\n" + "\n".join(sorted(set(stale)))


def test_no_private_imports_across_modules() -> None:
    """A module does not import another module's private (`_name`) names: what it shares is
    public."""
    found = set()
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mergelang"):
                found |= {(node.module, a.name) for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")}
    assert not found, f"private imports across modules: {sorted(found)}"


MAX_FUNCTION_LINES = 80


def test_functions_are_short() -> None:
    """No function (method, nested function) is longer than 80 lines, `def` to last line."""
    long = {}
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[(modname(p), node.name)] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {long}"
