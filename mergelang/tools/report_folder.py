"""A small output folder of report files (`mergelang inspect -o REPORT`), written as every
mergelang output is: the destination checked first (io/outguard.py: never an input, E404; an
existing folder replaced only when it is an earlier mergelang output and with `force`, E403),
the files written into a fresh folder beside it with a manifest listing them, then moved into
place in one rename (io/workfolder.py). Nothing is left behind on failure."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from mergelang.diagnostics import MergelangError
from mergelang.errors import CodedError, to_diagnostic
from mergelang.io.outguard import MANIFEST_NAME, manifest_text
from mergelang.io.workfolder import WorkFolder, os_error
from mergelang.tools.inspect_stats import json_safe


class ReportFolder(WorkFolder):
    report_ok = True  # replacing its own earlier report inside an output (outguard.py)

    def __init__(self, out_dir: str | os.PathLike, *, force: bool = False,
                 protected: Iterable[Path] = ()):
        self.out_dir = Path(os.path.abspath(out_dir))
        self.force = force
        self.protected = tuple(protected)
        self._coded(self._check_target)  # before any tensor is read

    @staticmethod
    def _coded(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except CodedError as e:
            raise MergelangError(to_diagnostic(e)) from None

    def write_files(self, files: dict[str, str | bytes], extra: dict[str, Any] | None = None) -> Path:
        """Write `files` (name -> text or bytes) and the manifest, then move them into place."""
        return self._coded(self._write, files, extra)

    def _write(self, files: dict[str, str | bytes], extra: dict[str, Any] | None) -> Path:
        self._check_target()
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self.tmp_dir = self._fresh_name("tmp")
            self.tmp_dir.mkdir()
        except OSError as e:
            raise os_error(self.out_dir.parent, e, "cannot create a folder in") from e
        try:
            for name, content in files.items():
                if not name or "/" in name or name == MANIFEST_NAME:
                    raise ValueError(f"internal: bad report file name {name!r}")
                path = self.tmp_dir / name
                try:
                    if isinstance(content, bytes):
                        path.write_bytes(content)
                    else:
                        path.write_text(content, encoding="utf-8")
                except OSError as e:
                    raise os_error(path, e) from e
            try:
                (self.tmp_dir / MANIFEST_NAME).write_text(manifest_text(files, extra=extra), encoding="utf-8")
            except OSError as e:
                raise os_error(self.tmp_dir / MANIFEST_NAME, e) from e
            self._sync_dir(self.tmp_dir)
            self._move_into_place()
        finally:
            if self.tmp_dir.exists():
                shutil.rmtree(self.tmp_dir, ignore_errors=True)
        return self.out_dir

    def write(self, report: dict[str, Any], fmt: str) -> Path:
        """report.json, and with "html" report.html, with "png" one image per plot."""
        files: dict[str, str | bytes] = {"report.json": dumps(report)}
        if fmt == "html":
            from mergelang.tools.inspect_plots import html_page

            files["report.html"] = html_page(report)
        elif fmt == "png":
            from mergelang.tools.inspect_plots import png_files

            files.update(png_files(report))
        return self.write_files(files, {"kind": "inspect"})


def dumps(report: dict[str, Any]) -> str:
    """report.json's text (NaN never occurs: undefined ratios are null). Written as is when
    every float is finite (json refuses NaN/Inf: then written from json_safe's copy, non-finite
    values as null; a copy of a 90k-tensor report took seconds and a few hundred MB)."""
    compact = len(report.get("tensors", ())) > 2000  # ~1 kB per tensor less
    kw: dict[str, Any] = {"separators": (",", ":")} if compact else {"indent": 1}
    try:
        return json.dumps(report, allow_nan=False, **kw) + "\n"
    except ValueError:
        return json.dumps(json_safe(report), allow_nan=False, **kw) + "\n"

