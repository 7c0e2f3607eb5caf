"""The provenance an output's manifest records (``mergelang_manifest.json``, key
``provenance``): the mergelang, torch and Python versions, the device, the command, every param's
value and where it came from, and per input model the path as written, the path it resolved to,
its Hugging Face revision, and per file its size, modification time, header digest and content
digest (io/digests.py: computed by the reader on the bytes the merge read)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Mapping

from mergelang.io.checkpoint import DictSource, ModelSource, SafetensorsSource
from mergelang.io.digests import covered, header_bytes, sha256_text, stat_of, tensor_digest
from mergelang.io.inputs import hf_repo_id, hf_revision
from mergelang.lang.ast import names_in
from mergelang.lang.provenance import used_params
from mergelang.record import command_text

PROVENANCE_VERSION = 1


def param_origins(c: Any, origins: Mapping[str, str] | None = None) -> dict[str, str]:
    """Param -> where its value came from: `origins` (tune, learn), else "--set" (or "keyword
    argument" from Python) for an overridden one, else "default" (the recipe's value)."""
    origins = origins or {}
    out = {}
    for d in c.unit.params:
        if d.name in origins:
            out[d.name] = origins[d.name]
        elif d.name in c.overridden:
            out[d.name] = "--set" if command_text() else "keyword argument"
        elif names_in(d.value) & set(out) - {n for n, o in out.items() if o == "default"}:
            changed = sorted(n for n in names_in(d.value) if out.get(n, "default") != "default")
            out[d.name] = f"derived from {', '.join(changed)} (the recipe's expression)"
        else:
            out[d.name] = "default"
    return out


def provenance(c: Any, device: str, origins: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything but the inputs' digests (`inputs`, once the merge has read them)."""
    import torch

    from mergelang._version import __version__

    src = c.source
    recipe = {"path": None if src.path.startswith("<") else os.path.abspath(src.path),
              "sha256": sha256_text(src.text)}
    return {"version": PROVENANCE_VERSION, "mergelang": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "device": device, "command": command_text(),
            "recipe": recipe, "imports": [str(p) for p in c.unit.imports],
            "params": used_params(c), "param_origins": param_origins(c, origins)}


def _readers(src: ModelSource | None) -> list[SafetensorsSource]:
    """The safetensors readers behind a model source (itself, or those it wraps)."""
    out: list[SafetensorsSource] = []
    seen: set[int] = set()
    stack: list[Any] = [src]
    while stack:
        x = stack.pop()
        if id(x) in seen or not isinstance(x, ModelSource):
            continue
        seen.add(id(x))
        if isinstance(x, SafetensorsSource):
            out.append(x)
            continue
        for v in vars(x).values():
            if isinstance(v, ModelSource):
                stack.append(v)
            elif isinstance(v, (list, tuple)):
                stack.extend(i for i in v if isinstance(i, ModelSource))
            elif isinstance(v, dict):
                stack.extend(i for i in v.values() if isinstance(i, ModelSource))
    return out


def _kind(src: ModelSource | None) -> str:
    if src is None:
        return "none"
    if isinstance(src, DictSource):
        return "memory"
    return "safetensors" if _readers(src) else type(src).__name__


def inputs_record(c: Any) -> list[dict[str, Any]]:
    """Per model: as written, resolved, revision, files with digests (after the merge ran)."""
    text = c.source.text
    written = {d.name: text[d.value.span.start:d.value.span.end]
               if d.value.span.source is c.source else None for d in c.unit.models}
    return sources_record({d.name: c.models.get(d.name) for d in c.unit.models}, written,
                          c.overridden)


def sources_record(models: Mapping[str, ModelSource | None], written: Mapping[str, str | None],
                   overridden: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The inputs' record for models by name (`written`: how each was given)."""
    overridden = overridden or {}
    out = []
    by_file: dict[str, dict[str, int]] = {}
    tables: dict[str, list[Any]] = {}  # file -> its tensors (TensorInfo), in file order
    for src in models.values():
        for r in _readers(src):
            for f in r.files:
                by_file.setdefault(str(f), {}).update(r.reads.crcs)
            if not all(str(f) in tables for f in r.files):
                for f in r.files:
                    tables[str(f)] = []
                for info in r.tensors().values():
                    tables.setdefault(info.file, []).append(info)
    for name, src in models.items():
        folder = getattr(src, "folder", None)
        entry: dict[str, Any] = {"name": name, "written": written.get(name), "kind": _kind(src)}
        if name in overridden:
            v = overridden[name]
            entry["set"] = v if isinstance(v, str) else f"<{type(v).__name__}>"
        files = [str(f) for r in _readers(src) for f in r.files]
        entry["resolved"] = str(folder) if folder is not None else (files[0] if len(files) == 1 else None)
        if folder is not None and hf_revision(Path(folder)):
            entry["hf"] = {"repo": hf_repo_id(Path(folder)), "revision": hf_revision(Path(folder))}
        if src is not None and not files and not isinstance(src, DictSource):
            entry["note"] = "no per-file digest for this kind of input"
        entry["files"] = [_file_record(f, tables[f], by_file.get(f, {})) for f in dict.fromkeys(files)]
        out.append(entry)
    return out


def _file_record(path: str, infos: list[Any], crcs: Mapping[str, int]) -> dict[str, Any]:
    rec: dict[str, Any] = {"path": path}
    try:
        rec.update(stat_of(path))
        head = header_bytes(path)
    except OSError as e:
        rec["error"] = str(e)
        return rec
    rec["header_sha256"] = sha256_text(head)
    done, missing = covered(infos, crcs)
    rec["digest"] = tensor_digest(head, done)
    rec["tensors_read"] = len(done)
    if missing:  # the digest covers the tensors read; these were not (e.g. no rule reads them)
        rec["unread"] = missing
    return rec
