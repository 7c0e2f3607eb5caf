"""What an output path may be: mergelang deletes or overwrites only what it created.

* An output path that is, contains, or lies inside any input (a model folder or file, its Hugging
  Face cache repository, the recipe, an imported recipe) is refused (E404), ``--force`` or not.
* An existing non-empty folder is replaced only with ``--force`` and only when it is a previous
  mergelang output: it holds the manifest ``mergelang_manifest.json`` that every output gets, and
  nothing besides the files that manifest lists. Any other non-empty folder is refused (E403) with
  a hint to remove it by hand. A multi-output folder's sub-folders are compared with their own
  manifests, recursively: a file added to ``OUT/NAME/`` makes the folder foreign too.
* An output inside a mergelang output folder (a folder above it holds a manifest) is refused
  (E403): it would make that folder fail `mergelang verify`. The one exception: with
  ``--force``, an existing report folder there (`inspect -o`, manifest kind "inspect") is
  replaced (the enclosing folder is foreign to its manifest already).
* A single-file output (`compile -o`, `explain -o`, `import-mergekit -o`, `tune --plot`) is
  never a symbolic link, a folder or a special file (`/dev/null`, a FIFO); an existing file is
  replaced only with ``--force`` (E403 without), and never when it is an input (E404). Its
  folder must exist (E502). It is written to a temporary file beside it and renamed into place,
  so a failure leaves the old file whole.
* A study storage (`tune --storage sqlite:///PATH`) may be an input's neighbour but not an input
  or inside one (E404); an existing file there must be an optuna study database (its tables
  are all optuna's), else E403, ``--force`` or not: mergelang never adds tables to a foreign
  database. Other storage URLs (a database server) name no local path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from mergelang.errors import CodedError
from mergelang.io import interrupt
from mergelang.io.textfile import read_json

MANIFEST_NAME = "mergelang_manifest.json"
MANIFEST_FORMAT = "mergelang-output"


class OutputError(CodedError):
    """An output path mergelang will not write: E403 (exists) or E404 (overlaps an input)."""

    default_code = "E403"


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _forms(p: Path) -> set[Path]:
    """The path as written (absolute) and with every symbolic link resolved."""
    out = {Path(os.path.abspath(p))}
    try:
        out.add(p.resolve())
    except (OSError, RuntimeError):  # a link loop: the written form is all there is
        pass
    return out


def check_not_input(out: Path, inputs: Iterable[Path]) -> None:
    """E404 when `out` is, contains, or lies inside one of `inputs`."""
    outs = _forms(out)
    for p in inputs:
        for q in _forms(Path(p)):
            for o in outs:
                if o == q or _within(q, o) or _within(o, q):
                    what = ("is" if o == q else "contains" if _within(q, o) else "lies inside")
                    raise OutputError(
                        f"output path {out} {what} the input {p}",
                        "mergelang never writes over its inputs (models, the recipe, imported "
                        "files), --force or not: choose an output folder elsewhere", "E404")


def manifest_files(folder: Path) -> set[str] | None:
    """The names a mergelang output folder's manifest lists (itself included), or None when
    `folder` is not a mergelang output."""
    path = folder / MANIFEST_NAME
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 16 * 1024 * 1024:
            return None
        data = read_json(path, 16 * 1024 * 1024)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return None
    files = data.get("files")
    outputs = data.get("outputs", [])
    if not isinstance(files, list) or not isinstance(outputs, list) \
            or not all(isinstance(f, str) for f in [*files, *outputs]):
        return None
    return {*files, *outputs, MANIFEST_NAME}


def _foreign(folder: Path, known: set[str], depth: int = 0) -> list[str]:
    """What in `folder` its manifest (`known`) does not account for: unlisted entries, a listed
    file that is a folder or a link, and (recursively) what a listed sub-output's own manifest
    does not account for."""
    sub_outputs = _manifest_outputs(folder)
    unknown = []
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if p.name not in known:
            unknown.append(p.name)
        elif p.is_symlink():
            unknown.append(f"{p.name} (a link)")
        elif p.is_dir():
            sub = manifest_files(p) if p.name in sub_outputs and depth < 8 else None
            if sub is None:
                unknown.append(f"{p.name}/ (not a mergelang output)")
            else:
                unknown += [f"{p.name}/{n}" for n in _foreign(p, sub, depth + 1)]
    return unknown


def _manifest_outputs(folder: Path) -> set[str]:
    try:
        from mergelang.io.textfile import read_json

        data = read_json(folder / MANIFEST_NAME, 16 * 1024 * 1024)
        return {o for o in data.get("outputs", []) if isinstance(o, str) and "/" not in o}
    except (OSError, ValueError, RecursionError, AttributeError, TypeError):
        return set()


def check_replaceable(out: Path, force: bool) -> None:
    """E403 unless `out` is absent, an empty folder, or (with `force`) a previous mergelang
    output holding nothing but what its manifest lists."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        kind = "a symbolic link" if out.is_symlink() else "a file, not a folder"
        raise OutputError(f"output path {out} exists and is {kind}",
                          "choose another -o; mergelang does not replace it")
    if not out.is_dir():
        return
    try:
        entries = {p.name for p in out.iterdir()}
    except OSError as e:
        raise OutputError(f"cannot list the output folder {out}: {e.strerror or e}", None, "E502") from None
    if not entries:
        return
    known = manifest_files(out)
    if known is None:
        raise OutputError(f"output folder {out} exists, is not empty and is not a mergelang output",
                          "mergelang replaces only an empty folder or its own earlier output: "
                          "remove the folder by hand, or choose another -o")
    try:
        unknown = _foreign(out, known)
    except OSError as e:
        raise OutputError(f"cannot list the output folder {out}: {e.strerror or e}", None, "E502") from None
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise OutputError(f"output folder {out} holds an earlier mergelang output and files "
                          f"mergelang did not write ({shown})",
                          "move those files away (or remove the folder by hand), or choose another -o")
    if not force:
        raise OutputError(f"output folder {out} holds an earlier mergelang output",
                          "pass --force to replace it, or choose another -o")


def check_output(out: Path, inputs: Iterable[Path], force: bool, report: bool = False) -> None:
    """`report`: the writer is inspect's report folder (the only one that may replace a report
    folder inside an output)."""
    check_not_input(out, inputs)
    check_not_inside_output(out, force, report=report)
    check_replaceable(out, force)


def enclosing_output(out: Path) -> Path | None:
    """The nearest folder above `out` (as written, or with links resolved) that is a mergelang
    output (it has a manifest), or None."""
    for form in sorted(_forms(out)):
        for parent in form.parents:
            if manifest_files(parent) is not None:
                return parent
    return None


def check_not_inside_output(out: Path, force: bool, option: str = "-o", report: bool = False) -> None:
    """E403 when `out` lies inside a mergelang output folder: a file added there makes that
    folder fail `mergelang verify` (and refuse `--force`). Allowed only with `force` for an
    existing report folder there by the report writer itself (`inspect -o`, `report`), whose
    replacing changes nothing more; any other output there is E403."""
    outer = enclosing_output(out)
    if outer is None:
        return
    if force and report and _is_report_folder(out):
        return
    raise OutputError(f"{option} {out} lies inside the mergelang output {outer}",
                      "writing there would make that output fail `mergelang verify`: choose a path "
                      "outside it")


def _is_report_folder(folder: Path) -> bool:
    if folder.is_symlink() or manifest_files(folder) is None:
        return False
    try:
        return read_json(folder / MANIFEST_NAME, 16 * 1024 * 1024).get("kind") == "inspect"
    except (OSError, ValueError, RecursionError, AttributeError):
        return False


# --------------------------------------------------------------------------- single files

def check_file_output(out: str | Path, inputs: Iterable[Path], force: bool,
                      option: str = "-o", parents: bool = False) -> Path:
    """The rules for a single-file output (module docstring); returns its absolute path.
    `parents`: a missing folder is created when the file is written (import-mergekit)."""
    path = Path(os.path.abspath(out))
    check_not_input(path, inputs)
    check_not_inside_output(path, False, option)
    if path.is_symlink():
        raise OutputError(f"{option} {out} is a symbolic link", "mergelang does not write through "
                          "links: choose another path")
    if path.is_dir():
        raise OutputError(f"{option} {out} is a folder, not a file", "give a file name")
    if path.exists() and not path.is_file():  # a device, a FIFO, a socket: never replaced
        raise OutputError(f"{option} {out} is not a regular file", "give the path of a file")
    if path.exists() and not force:
        raise OutputError(f"{option} {out} exists", "pass --force to replace it, or choose another path")
    if parents and not path.parent.exists():
        return path
    if not path.parent.is_dir():
        raise OutputError(f"{option} {out}: no folder {path.parent}", "create the folder first, "
                          "or choose another path", "E502")
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"{option} {out}: the folder {path.parent} is not writable", None, "E502")
    return path


def write_file_output(out: str | Path, data: str | bytes, inputs: Iterable[Path], force: bool,
                      option: str = "-o", parents: bool = False) -> Path:
    """Check `out` (:func:`check_file_output`) and write `data` there atomically."""
    path = check_file_output(out, inputs, force, option, parents)
    if parents:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the folder {path.parent}: {e.strerror or e}", None,
                              "E502") from None
    return replace_file(path, lambda tmp: tmp.write_bytes(data.encode() if isinstance(data, str) else data),
                        option)


def replace_file(path: Path, write: Any, option: str = "-o") -> Path:
    """`write(tmp)` a temporary file beside `path` (same suffix), then rename it to `path`."""
    import secrets

    tmp = path.with_name(f".{path.stem}.mergelang-{secrets.token_hex(4)}{path.suffix}")
    try:
        write(tmp)
        if path.is_symlink() or path.is_dir():  # appeared since the check
            raise OutputError(f"{option} {path} is a link or a folder", "choose another path")
        interrupt.check()  # io/interrupt: a Ctrl-C whose exception was lost
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}",
                          "check the folder exists and is writable", "E502") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# --------------------------------------------------------------------------- study storage

#: the tables of an optuna RDB storage (any version since 2.0)
OPTUNA_TABLES = frozenset({"studies", "version_info", "alembic_version", "trials"})
SQLITE_MAGIC = b"SQLite format 3\x00"


def storage_path(url: str) -> Path | None:
    """The local file an SQLAlchemy URL `sqlite:///PATH` names (None: in memory, or a server)."""
    if not url.startswith("sqlite://"):
        return None
    rest = url[len("sqlite://"):].split("?", 1)[0]
    if not rest.startswith("/") or rest in ("/", "/:memory:"):
        return None
    return Path(os.path.abspath(rest[1:]))


def check_storage(url: str, inputs: Iterable[Path]) -> None:
    """`tune --storage`: E404 for a database file that is or lies inside an input, E403 for an
    existing file that is not an optuna study database (a link, a folder, another SQLite
    database or any other file), E502 for a missing folder."""
    path = storage_path(url)
    if path is None:
        return
    check_not_input(path, inputs)
    if path.is_symlink() or path.is_dir():
        raise OutputError(f"--storage {url}: {path} is a {'link' if path.is_symlink() else 'folder'}",
                          "give the path of an optuna study database, or of a new file")
    if not path.parent.is_dir():
        raise OutputError(f"--storage {url}: no folder {path.parent}", "create it first", "E502")
    if path.exists() and not is_study_database(path):
        raise OutputError(f"--storage {url}: {path} exists and is not an optuna study database",
                          "mergelang adds study tables only to a new file or an optuna storage: "
                          "choose another path", "E403")


def is_study_database(path: Path) -> bool:
    """Is `path` an SQLite file holding only optuna's tables (read-only look)?"""
    import sqlite3

    try:
        with open(path, "rb") as f:
            if f.read(16) != SQLITE_MAGIC:
                return False
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            names = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
        finally:
            con.close()
    except (OSError, sqlite3.Error):
        return False
    ours = {n for n in names if n in OPTUNA_TABLES or n.startswith(("study_", "trial_"))}
    return "studies" in names and "trials" in names and names == ours


def manifest_text(files: Iterable[str], outputs: Iterable[str] = (), extra: dict[str, Any] | None = None) -> str:
    """The manifest of an output folder holding `files` (and, for several outputs, the
    sub-folders `outputs`)."""
    from mergelang._version import __version__

    data: dict[str, Any] = {"format": MANIFEST_FORMAT, "mergelang": __version__}
    data.update(extra or {})
    data["files"] = sorted({*files, MANIFEST_NAME})
    if outputs:
        data["outputs"] = sorted(outputs)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
