"""Loading a recipe: parse the file, follow `import`s, add the standard library.

The result is a :class:`Unit`: every declaration the later stages need, with the function table
already merged (user functions shadow stdlib methods, with a W003 warning).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelang.lang import ast
from mergelang.diagnostics import CompileError, Diagnostics, SourceFile, Span, error, warning
from mergelang.io.textfile import TextFileError, read_text
from mergelang.lang.parser import parse_program
from mergelang.resources import stdlib_files


@dataclass
class Unit:
    source: SourceFile
    program: ast.Program
    base_dir: Path
    fns: dict[str, ast.FnDef] = field(default_factory=dict)
    models: list[ast.ModelDecl] = field(default_factory=list)
    params: list[ast.ParamDecl] = field(default_factory=list)
    options: list[ast.OptionDecl] = field(default_factory=list)
    blocks: list[ast.MergeBlock] = field(default_factory=list)
    imports: list[Path] = field(default_factory=list)  # imported recipe files, resolved
    #: `import "methods.py"`: plugin files (lang/plugins.py), loaded only when allowed
    plugin_files: list[tuple[Path, Span]] = field(default_factory=list)
    plugins: dict[str, Any] = field(default_factory=dict)  # name -> PluginMethod

    @property
    def block(self) -> ast.MergeBlock | None:
        """The first `merge` block (the only one unless the recipe names its outputs)."""
        return self.blocks[0] if self.blocks else None

    @property
    def output_names(self) -> tuple[str, ...]:
        """The named outputs of every block in order; () for one unnamed block."""
        return tuple(n for b in self.blocks for n in b.outputs)


_STDLIB: dict[str, ast.FnDef] | None = None


def stdlib_functions() -> dict[str, ast.FnDef]:
    """Every function defined in `stdlib/*.mrg` (parsed once per process, and the parsed
    functions cached on disk: parsing the library is ~0.2 s of every command, loading ~0.01 s)."""
    global _STDLIB
    if _STDLIB is None:
        files = [(path, SourceFile.read(path, library=True)) for path in stdlib_files()]
        cache = _cache_path(files)
        _STDLIB = _load_cached(cache) or _parse_stdlib(files, cache)
    return _STDLIB


def _parse_stdlib(files: list[tuple[Path, SourceFile]], cache: Path | None) -> dict[str, ast.FnDef]:
    fns: dict[str, ast.FnDef] = {}
    for _, source in files:
        program = parse_program(source)
        for fn in program.of(ast.FnDef):
            if fn.name in fns:  # pragma: no cover - a stdlib bug, caught by the stdlib tests
                raise RuntimeError(f"stdlib defines {fn.name} twice")
            fns[fn.name] = fn
    _save_cached(cache, fns)
    return fns


def _cache_path(files: list[tuple[Path, SourceFile]]) -> Path | None:
    """The cache file for these library sources: named by a hash of their paths and texts, the
    grammar, the code that builds the AST (ast.py, parser.py) and mergelang's version, so any
    change makes a new entry."""
    from mergelang._version import __version__
    from mergelang.cachedir import cache_dir
    from mergelang.resources import grammar_path

    folder = cache_dir("stdlib")
    if folder is None:
        return None
    h = hashlib.sha256(f"{__version__}\0{sys.version}\0".encode())
    h.update(grammar_path().read_bytes())
    for module in (ast, sys.modules[parse_program.__module__]):
        h.update(Path(module.__file__ or "").read_bytes())
    for path, source in files:
        h.update(f"\0{path}\0{source.text}".encode())
    return folder / f"stdlib-{h.hexdigest()[:24]}.pickle"


def _load_cached(path: Path | None) -> dict[str, ast.FnDef] | None:
    try:
        if path is not None and path.is_file():
            with open(path, "rb") as f:
                fns = pickle.load(f)
            if isinstance(fns, dict) and all(isinstance(v, ast.FnDef) for v in fns.values()):
                return fns
    except Exception:  # noqa: BLE001 - a torn or stale cache file: parse again
        pass
    return None


def _save_cached(path: Path | None, fns: dict[str, ast.FnDef]) -> None:
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(pickle.dumps(fns, protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(tmp, path)
    except (OSError, pickle.PicklingError):
        tmp.unlink(missing_ok=True)


def load(source: SourceFile, base_dir: Path, diags: Diagnostics) -> Unit | None:
    """Parse `source` and its imports; syntax errors end loading (returns None)."""
    try:
        program = parse_program(source)
    except CompileError as exc:
        diags.add(exc.diag)
        return None
    unit = Unit(source, program, base_dir)
    user_fns: dict[str, ast.FnDef] = {}
    _collect(unit, program, base_dir, user_fns, diags, stack=[_key(source)], top=True)
    stdlib = stdlib_functions()
    for name, fn in user_fns.items():
        if name in stdlib:
            diags.add(warning("W003", f"function `{name}` shadows the standard library method of the "
                              "same name", fn.name_span, "rename it to use both"))
    unit.fns = {**stdlib, **user_fns}
    return unit


def _key(source: SourceFile) -> str:
    try:
        return str(Path(source.path).resolve())
    except OSError:
        return source.path


def _collect(unit: Unit, program: ast.Program, base_dir: Path, fns: dict[str, ast.FnDef],
             diags: Diagnostics, stack: list[str], top: bool) -> None:
    for item in program.items:
        if isinstance(item, ast.FnDef):
            if item.name in fns:
                prev = fns[item.name]
                diags.add(error("E106", f"function `{item.name}` is defined twice", item.name_span,
                                notes=(("first defined here", prev.name_span),)))
                continue
            fns[item.name] = item
        elif isinstance(item, ast.Import):
            _import(unit, item, base_dir, fns, diags, stack)
        elif not top:
            diags.add(error("E203", "an imported file may only define functions and import others",
                            item.span, "move declarations and the merge block into the main recipe"))
        elif isinstance(item, ast.ModelDecl):
            unit.models.append(item)
        elif isinstance(item, ast.ParamDecl):
            unit.params.append(item)
        elif isinstance(item, ast.OptionDecl):
            unit.options.append(item)
        elif isinstance(item, ast.MergeBlock):
            if _check_block(unit, item, diags):
                unit.blocks.append(item)


#: an output name: a plain folder name (no separators, not hidden, not `.` / `..`)
OUTPUT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def _check_block(unit: Unit, item: ast.MergeBlock, diags: Diagnostics) -> bool:
    """Either one unnamed `merge from` block, or named blocks with distinct, valid names."""
    first = unit.block
    if first is not None and not first.outputs and not item.outputs:
        diags.add(error("E106", "a recipe has one unnamed `merge from` block", item.span,
                        "put all rules in one block (the first matching rule wins), or name each "
                        'block\'s output: merge "NAME" from MODEL { ... }',
                        (("the first block is here", first.span),)))
        return False
    if first is not None and (not first.outputs or not item.outputs):
        unnamed = item if not item.outputs else first
        diags.add(error("E311", "an unnamed `merge from` block cannot be mixed with named ones",
                        unnamed.span, 'name every block\'s output, e.g. merge "main" from '
                        f"{unnamed.source} {{ ... }}; each is written to OUTDIR/NAME/"))
        return False
    seen = {n: b for b in unit.blocks for n in b.outputs}
    mine: set[str] = set()
    for name in item.outputs:
        if not OUTPUT_NAME.fullmatch(name) or name in (".", ".."):
            diags.add(error("E312", f"invalid output name {name!r}", item.outputs_span,
                            "an output name becomes a folder name: letters, digits, `_`, `-` and "
                            "`.`, not starting with `.` (no `/`, `\\`, `..`)"))
        elif name in seen or name in mine:
            prev = seen.get(name, item)
            diags.add(error("E310", f"output {name!r} is named twice", item.outputs_span,
                            "each output needs its own name (it is the folder OUTDIR/NAME/)",
                            (("first named here", prev.outputs_span),)))
        mine.add(name)
    return True  # kept even with bad names: the errors stop the compilation anyway


def _import(unit: Unit, item: ast.Import, base_dir: Path, fns: dict[str, ast.FnDef],
            diags: Diagnostics, stack: list[str]) -> None:
    if "\0" in item.path:
        diags.add(error("E002", "cannot read imported file: the path contains a NUL character",
                        item.span))
        return
    path = Path(item.path)
    if not path.is_absolute():
        path = base_dir / path
    key = str(path.resolve())
    if path.suffix == ".py":  # a plugin file: loaded by the compiler when plugins are allowed
        unit.plugin_files.append((Path(key), item.span))
        unit.imports.append(Path(key))
        return
    if key in stack:
        chain = " -> ".join(Path(k).name for k in stack[stack.index(key):] + [key])
        diags.add(error("E003", f"import cycle: {chain}", item.span, "remove one of the imports"))
        return
    try:
        source = read_recipe_file(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        diags.add(error("E002", f"cannot read imported file {item.path}: {reason}", item.span,
                        f"paths are relative to {base_dir}"))
        return
    unit.imports.append(Path(key))
    try:
        program = parse_program(source)
    except CompileError as exc:
        diags.add(exc.diag)
        return
    _collect(unit, program, path.parent, fns, diags, stack + [key], top=False)


#: the largest recipe or imported file read: real recipes are kilobytes (a mergekit import with
#: hundreds of slices stays far below this), and parsing runs at ~1 MB in 10-15 s
MAX_RECIPE_BYTES = 4 * 1024 * 1024


def read_recipe_file(path: Path) -> SourceFile:
    """A recipe file's text: a regular file (not a device, FIFO or folder: `/dev/zero` would
    never end) of at most MAX_RECIPE_BYTES (io/textfile.py, the one bounded reader). Raises
    OSError / ValueError / UnicodeDecodeError."""
    try:
        return SourceFile(str(path), read_text(path, MAX_RECIPE_BYTES))
    except TextFileError as exc:
        raise ValueError(str(exc).replace("mergelang reads from such a file", "a recipe may have")) from None
