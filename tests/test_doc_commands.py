"""Every fenced code block of README.md and docs/*.md is either run by a test or marked as not run.

THE CONVENTION (also in docs/design.md, "Docs that are tested"). A block's info string is
`KIND [MODIFIER]`; a block without one, or with an unknown kind or modifier, fails
`test_every_block_is_tagged`:

    ```mrg        a recipe: parsed and compiled against tiny models (tests/test_docs.py)
    ```bash       shell commands, run by `bash -e` in the sandbox (below); must exit 0
    ```python     run by python in the sandbox; must not raise
    ```yaml       a mergekit config: `import-mergekit`'s translator must accept it (no errors)
    ```text       not code: program output, diagrams
    ```text synopsis
                  the CLI synopsis: must equal `python scripts/cli_synopsis.py` (generated from
                  the click group, so a new command or option fails until the docs are updated)
    ```KIND illustrative
                  shown, not run: it needs what a test cannot have (a GPU, a cluster, a fresh
                  venv, hours, a download) or is a fragment. Still checked: every `mergelang`
                  command in it names a real command and real options, every repository path
                  it names exists, python compiles.

The sandbox (tests/doc_sandbox/README.md) is a scratch folder laid out like a clone after
`scripts/quickstart.sh`: a copy of examples/ with examples/models/{base,math,code} (tiny Llamas),
the same tiny models as models/{base,a,b,math,code} and llama-{base,math,code}, and the files of
tests/doc_sandbox/ (the evaluation code the docs' commands name without showing it). On PATH,
`mergelang` and `python` are this checkout's (`source .venv/bin/activate` works). A block whose
first line is `# NAME.mrg` (`.py`, `.yml`) *is* that file: it is written into the sandbox for
the other blocks of the same document; if NAME is a file of the repository, the block must
show the same code (comments and spacing aside). Each block runs in a fresh copy.

To add a runnable block: write it, tag it ```bash or ```python, give any file it needs a
`# NAME` block before it (or, for files the docs should not show, put them in
tests/doc_sandbox/), and run `pytest tests/test_doc_commands.py`.

Besides the blocks: every `mergelang.x.y` module path and every repository path (`tests/...py`,
`benchmarks/...`, `docs/...md`, links) named anywhere in README.md and docs/*.md must exist.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SANDBOX_FILES = REPO / "tests" / "doc_sandbox"
sys.path.insert(0, str(REPO / "scripts"))

from cli_synopsis import synopsis  # noqa: E402

KINDS = {"mrg", "bash", "python", "yaml", "text"}
MODIFIERS = {"illustrative", "synopsis"}
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
FILE_HEADER = re.compile(r"^#\s*([\w./-]+\.(?:mrg|py|yml|yaml))\b")
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    doc: str       # README.md, docs/guide.md
    index: int     # 1-based, per document
    line: int      # of the opening fence
    kind: str
    modifiers: tuple[str, ...]
    text: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def file_name(self) -> str | None:
        m = FILE_HEADER.match(self.text)
        return m.group(1) if m and self.kind in ("mrg", "python", "yaml") else None

    @property
    def runs(self) -> bool:
        return "illustrative" not in self.modifiers


def _blocks() -> list[Block]:
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for k, m in enumerate(FENCE.finditer(text)):
            info = m.group(1).split()
            out.append(Block(str(path.relative_to(REPO)), k + 1, text.count("\n", 0, m.start()) + 1,
                             info[0] if info else "", tuple(info[1:]), m.group(2)))
    return out


BLOCKS = _blocks()


def _of(kind: str, runs: bool = True) -> list[Block]:
    return [b for b in BLOCKS if b.kind == kind and b.runs == runs and "synopsis" not in b.modifiers]


# ------------------------------------------------------------------------------ the convention
def test_every_block_is_tagged() -> None:
    bad = [f"{b.id}: ```{' '.join((b.kind, *b.modifiers))}" for b in BLOCKS
           if b.kind not in KINDS or not set(b.modifiers) <= MODIFIERS]
    assert not bad, ("untagged or unknown code blocks (tag them: see the top of "
                     "tests/test_doc_commands.py):\n" + "\n".join(bad))


def test_the_docs_have_runnable_blocks() -> None:
    """The runnable kinds are used (a parser that found nothing would pass every test below)."""
    assert len(_of("bash")) >= 4 and len(_of("python")) >= 4 and _of("yaml")
    assert sum(1 for b in BLOCKS if "synopsis" in b.modifiers) == 2


# ------------------------------------------------------------------------------ the sandbox
@pytest.fixture(scope="session")
def sandbox_template(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("make_tiny_models", REPO / "examples" / "make_tiny_models.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    root = tmp_path_factory.mktemp("doc_sandbox")
    shutil.copytree(REPO / "examples", root / "examples",
                    ignore=shutil.ignore_patterns("models", "merged-*", "__pycache__"))
    made = tiny.make_models(root / "examples" / "models", seed=0)
    for name, src in [("base", "base"), ("a", "math"), ("b", "code"), ("math", "math"), ("code", "code")]:
        shutil.copytree(made[src], root / "models" / name)
    for name in ("base", "math", "code"):
        shutil.copytree(made[name], root / f"llama-{name}")
    for f in SANDBOX_FILES.iterdir():
        if f.is_file() and f.name != "README.md":
            shutil.copy(f, root / f.name)
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "mergelang").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mergelang "$@"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for f in ("mergelang", "python"):
        (bin_dir / f).chmod(0o755)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    return root


def _sandbox(template: Path, dest: Path, block: Block) -> Path:
    """A fresh copy of the template with the file blocks before `block` (same document) written."""
    shutil.copytree(template, dest, symlinks=True)
    for b in BLOCKS:  # every file block of the document (a later section may show the file)
        if b.doc == block.doc and b is not block and b.file_name:
            target = dest / b.file_name
            if (REPO / b.file_name).is_file():
                continue  # a quoted repository file: the copy is already there (checked below)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(b.text)
    return dest


def _env(sandbox: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{sandbox / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(sandbox)])
    env.pop("MERGELANG_DEBUG", None)
    return env


def _run(argv: list[str], sandbox: Path, block: Block) -> None:
    proc = subprocess.run(argv, cwd=sandbox, env=_env(sandbox), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (f"{block.id}: exit {proc.returncode}\n--- block\n{block.text}"
                                  f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")


# ------------------------------------------------------------------------------ running blocks
@pytest.mark.parametrize("block", _of("bash"), ids=lambda b: b.id)
def test_bash_block(block: Block, sandbox_template: Path, tmp_path: Path) -> None:
    box = _sandbox(sandbox_template, tmp_path / "box", block)
    (tmp_path / "block.sh").write_text(block.text)
    _run(["bash", "-e", "-o", "pipefail", str(tmp_path / "block.sh")], box, block)


@pytest.mark.parametrize("block", _of("python"), ids=lambda b: b.id)
def test_python_block(block: Block, sandbox_template: Path, tmp_path: Path) -> None:
    box = _sandbox(sandbox_template, tmp_path / "box", block)
    if block.file_name:  # a file other blocks use: it is written (above) and must compile
        compile(block.text, block.file_name, "exec")
        return
    script = tmp_path / "block.py"
    script.write_text("from doc_preamble import sd0, sd1, sd2  # noqa\n" + block.text)
    _run([sys.executable, str(script)], box, block)


@pytest.mark.parametrize("block", _of("yaml"), ids=lambda b: b.id)
def test_yaml_block(block: Block) -> None:
    from mergelang.interop.mergekit_import import translate

    result = translate(block.text)
    errors = [d.render() for d in result.diagnostics if d.is_error]
    assert not errors and "merge from" in result.text, "\n".join(errors)


def test_quoted_repository_files_match() -> None:
    """A block headed `# examples/ties.mrg` shows that file's code (comments and spacing aside)."""
    def code(text: str) -> list[str]:
        lines = (re.sub(r"\s+#.*$|^\s*#.*$", "", ln) for ln in text.splitlines())
        return [" ".join(ln.split()) for ln in lines if ln.strip()]

    quoted = [b for b in BLOCKS if b.file_name and (REPO / b.file_name).is_file()]
    assert quoted, "README.md quotes examples/ties.mrg"
    for b in quoted:
        assert code(b.text) == code((REPO / b.file_name).read_text()), b.id


# ------------------------------------------------------------------------------ the CLI
def _cli():
    from mergelang.cli import main

    return main


def test_synopsis_blocks_are_generated_from_the_cli() -> None:
    expected = synopsis(_cli()).strip()
    for b in BLOCKS:
        if "synopsis" in b.modifiers:
            assert b.text.strip() == expected, (
                f"{b.id}: the synopsis differs from the CLI: replace the block with the output of "
                f"`python scripts/cli_synopsis.py`")


def test_debug_is_a_documented_option() -> None:
    """The docs tell users to rerun with --debug: every command shows it in --help."""
    from click.testing import CliRunner

    main = _cli()
    for name, cmd in main.commands.items():
        if not cmd.hidden:
            out = CliRunner().invoke(main, [name, "--help"]).output
            assert "--debug" in out, name


def _commands(text: str) -> list[list[str]]:
    """The `mergelang ...` command lines of a shell block (continuations joined, comments cut)."""
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        if words[:3] == ["python", "-m", "mergelang"]:
            words = ["mergelang", *words[3:]]
        if words[:1] == ["mergelang"]:
            out.append(words)
    return out


def _check_command(words: list[str]) -> list[str]:
    main = _cli()
    if len(words) < 2:
        return []
    cmd = main.commands.get(words[1])
    if cmd is None:
        return [f"no command `{words[1]}`"]
    known = {o for p in cmd.params for o in (*p.opts, *getattr(p, "secondary_opts", ()))} | {"-h"}
    bad = []
    for w in words[2:]:
        if w.startswith("-") and len(w) > 1 and not re.match(r"^-\d", w):
            if w.split("=")[0] not in known:
                bad.append(f"`mergelang {words[1]}` has no option `{w}`")
    return bad


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "bash"], ids=lambda b: b.id)
def test_shell_commands_name_real_options(block: Block) -> None:
    """Also for illustrative blocks: the commands and options they show exist."""
    bad = [msg for words in _commands(block.text) for msg in _check_command(words)]
    assert not bad, f"{block.id}: " + "; ".join(bad)


def test_illustrative_python_compiles() -> None:
    for block in BLOCKS:
        if block.kind == "python" and not block.runs:
            compile(block.text, block.id, "exec")


# ------------------------------------------------------------------------------ names in prose
def _all_text() -> list[tuple[str, str]]:
    return [(str(p.relative_to(REPO)), p.read_text(encoding="utf-8")) for p in DOCS]


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        mod = ".".join(parts[:k])
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        obj = importlib.import_module(mod)
        for attr in parts[k:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


#: entry-point groups mergelang reads (names, not modules): lang/plugins.ENTRY_POINT_GROUP
ENTRY_POINT_GROUPS = {"mergelang.methods"}


def test_module_paths_exist() -> None:
    """`mergelang.x.y` names in the docs are modules (or attributes of one) of this package."""
    bad, checked = [], 0
    for doc, text in _all_text():
        for m in re.finditer(r"(?<![\w/.-])(mergelang(?:\.[A-Za-z_]\w*)+)", text):
            name = m.group(1)
            if name.endswith((".mrg", ".md", ".json", ".py")) or "mergelang_" in name:
                continue  # file names (mergelang_recipe.mrg, mergelang_manifest.json)
            if name in ENTRY_POINT_GROUPS:
                continue
            checked += 1
            if not _resolves(name):
                bad.append(f"{doc}:{text.count(chr(10), 0, m.start()) + 1}: {name}")
    assert not bad, "names that do not exist:\n" + "\n".join(bad)
    assert checked >= 3  # the pattern finds the docs' module names


TOP = {"mergelang", "tests", "benchmarks", "examples", "scripts", "docs", "notes", "stdlib",
       "grammar", ".ci"}
SUBPACKAGES = {p.name for p in (REPO / "mergelang").iterdir() if p.is_dir() and p.name != "__pycache__"}
#: paths the docs name that a run creates (quickstart, the demo's setup, benchmarks)
FILE_SUFFIXES = {"py", "md", "mrg", "json", "txt", "sh", "lark", "toml", "yml", "yaml", "csv",
                 "png", "safetensors", "jsonl"}
GENERATED = ("examples/models", "examples/merged-ties", "examples/digits/models")


def test_repository_paths_exist() -> None:
    """Every repository path the docs name exists: `benchmarks/x.py`, links to docs/ and notes/,
    and in docs/design.md module paths relative to mergelang/ (`lang/parser.py`)."""
    bad, checked = [], 0
    path_re = re.compile(r"(?<![\w./~-])((?:\.ci|[a-z_]+)(?:/[\w.*{}-]+)+)")
    for doc, text in _all_text():
        for m in path_re.finditer(text):
            path = m.group(1).rstrip(".,:;")
            path = path.split("#")[0]
            first = path.split("/")[0]
            if path.startswith(GENERATED) or "{" in path or "*" in path:
                continue
            if first not in TOP and not (first in SUBPACKAGES and "." in path.rsplit("/", 1)[-1]):
                continue
            root = REPO if first in TOP else REPO / "mergelang"
            head, _, last = path.rpartition("/")
            stem, dot, suffix = last.partition(".")
            candidates = [root / path]
            if dot and suffix not in FILE_SUFFIXES:  # io/locate.open_model: a module's function
                candidates.append(root / head / f"{stem}.py")
            if not dot and first in ("mergelang",):  # mergelang/__init__
                candidates.append(root / f"{path}.py")
            ok = any(c.exists() for c in candidates)
            checked += 1
            if not ok:
                bad.append(f"{doc}:{text.count(chr(10), 0, m.start()) + 1}: {path}")
    assert not bad, "paths that do not exist:\n" + "\n".join(bad)
    assert checked > 50  # the pattern finds the docs' paths


# ------------------------------------------------------------------------------ measured numbers
def flat(text: str) -> str:
    return " ".join(text.split())


DIGITS_RESULTS = REPO / "examples" / "digits" / "RESULTS.md"
WARMUP_RESULTS = REPO / "benchmarks" / "results" / "warmup.md"


def test_readme_quotes_the_recorded_digits_run() -> None:
    """The digits table, its run time and machine, and the numbers of the paragraph under the
    table are the last recorded output of `python examples/digits/run.py --record ...`."""
    rec = DIGITS_RESULTS.read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = [ln for ln in rec.splitlines() if ln.startswith("|")]
    assert len(table) == 18, "the recorded table: header, rule and 16 methods"
    start = readme.index(table[0])
    assert readme[start:].splitlines()[:len(table)] == table, "README's digits table != RESULTS.md"
    run = re.search(r"^Run: (.*?)\. The time column", rec, re.M | re.S).group(1)
    machine = re.search(r"^Machine: (.*?);", rec, re.M).group(1)
    assert flat(run) in flat(readme) and flat(machine) in flat(readme)
    after = readme[start:].split("\n\n")[1]  # the paragraph under the table
    vs_ta = {abs(float(v)) for ln in table[2:] for v in re.findall(r"\| ([+-]\d+\.\d) \(", ln)}
    quoted = {abs(float(v)) for v in re.findall(r"(?<![\w.])[+-]?\d+\.\d(?![\d%])", after)}
    assert quoted and quoted <= vs_ta, f"numbers under the table not in its vs-TA column: {quoted - vs_ta}"


def test_readme_quotes_the_recorded_warmup() -> None:
    line = [ln for ln in WARMUP_RESULTS.read_text(encoding="utf-8").splitlines() if ln.strip()][-1]
    wall = re.search(r"\*\*([\d.]+) s\*\* wall, ([\d.]+) s CPU", line)
    readme = flat((REPO / "README.md").read_text(encoding="utf-8"))
    assert wall and f"{wall.group(1)} s" in readme and f"{wall.group(2)} s CPU" in readme
    assert "benchmarks/results/warmup.md" in readme
    assert "~19 s" not in readme
