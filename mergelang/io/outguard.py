"""What an output path may be: mergelang deletes or overwrites only what it created.

* An output path that is, contains, or lies inside any input (a model folder or file, its Hugging
  Face cache repository, the recipe, an imported recipe) is refused (E404), ``--force`` or not.
* An existing non-empty folder is replaced only with ``--force`` and only when it is a previous
  mergelang output: it holds the manifest ``mergelang_manifest.json`` that every output gets, and
  nothing besides the files that manifest lists. Any other non-empty folder is refused (E403) with
  a hint to remove it by hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from mergelang.errors import CodedError
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
    unknown = sorted(entries - known)
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise OutputError(f"output folder {out} holds an earlier mergelang output and files "
                          f"mergelang did not write ({shown})",
                          "move those files away (or remove the folder by hand), or choose another -o")
    if not force:
        raise OutputError(f"output folder {out} holds an earlier mergelang output",
                          "pass --force to replace it, or choose another -o")


def check_output(out: Path, inputs: Iterable[Path], force: bool) -> None:
    check_not_input(out, inputs)
    check_replaceable(out, force)


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
