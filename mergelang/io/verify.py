"""Verification of a finished output folder before it is moved into place: every planned shard
has its planned size and a header (re-read from disk with the reader's own validating parser)
naming exactly its planned tensors at their planned offsets, and the index names every tensor,
in the shard that holds it, with the right total size."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from mergelang.io.checkpoint import CheckpointError, read_header
from mergelang.io.textfile import read_json

INDEX_NAME = "model.safetensors.index.json"


def verify_output(folder: Path, layout: Any) -> str | None:
    """None when `folder` holds exactly what `layout` (a writer.ShardLayout) planned, else the
    first problem found, as a sentence."""
    planned = {s.filename: s for s in layout.shards}
    for shard in layout.shards:
        path = folder / shard.filename
        try:
            size = os.path.getsize(path)
        except OSError as e:
            return f"shard {shard.filename} cannot be read: {e.strerror or e}"
        if size != shard.size:
            return f"shard {shard.filename} is {size} bytes, expected {shard.size}"
        try:
            infos = read_header(path)
        except CheckpointError as e:
            return f"shard {shard.filename} does not parse back: {e}"
        if set(infos) != set(shard.offsets):
            return f"shard {shard.filename} holds other tensors than planned"
        for t in shard.tensors:
            info = infos[t.name]
            if (info.begin, info.end) != shard.offsets[t.name] or info.shape != t.shape \
                    or info.dtype != t.dtype:
                return f"tensor {t.name!r} in {shard.filename} differs from the plan"
    stray = [p.name for p in folder.glob("*.safetensors") if p.name not in planned]
    if stray:
        return f"unexpected weight file {sorted(stray)[0]}"
    if not getattr(layout, "indexed", True):
        return None
    try:
        index = read_json(folder / INDEX_NAME)
        weight_map = index["weight_map"]
        total = index["metadata"]["total_size"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        return f"the index {INDEX_NAME} is unreadable ({e})"
    if not isinstance(weight_map, dict) or set(weight_map) != set(layout.tensors):
        return f"the index {INDEX_NAME} does not name exactly the planned tensors"
    for name, fname in weight_map.items():
        shard = planned.get(fname)
        if shard is None or name not in shard.offsets:
            return f"the index puts {name!r} in {fname!r}, which does not hold it"
    if total != sum(t.nbytes for t in layout.tensors.values()):
        return f"the index's total_size {total} is wrong"
    return None


# --------------------------------------------------------------------------- `mergelang verify`

def file_digest(path: str | Path, names: Iterable[str] | None = None) -> str:
    """The digest of the safetensors file at `path`, recomputed from disk (reads it once): over
    all its tensors, or only those in `names`. OSError / ValueError when it cannot be read."""
    from mergelang.io.digests import crc, header_bytes, tensor_digest

    head = header_bytes(path)
    infos = sorted(read_header(path).values(), key=lambda i: i.begin)
    keep = None if names is None else set(names)
    out: list[tuple[str, int]] = []
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        for info in infos:
            if keep is not None and info.name not in keep:
                continue
            c, pos = 0, info.begin
            while pos < info.end:
                chunk = os.pread(fd, min(info.end - pos, 64 << 20), pos)
                if not chunk:
                    raise OSError(f"{path}: shorter than its header says")
                c = crc(chunk, c)
                pos += len(chunk)
            out.append((info.name, c))
    finally:
        os.close(fd)
    return tensor_digest(head, out)


def _digest_of(path: Path, recorded: str) -> str:
    """`path`'s digest, computed the way `recorded` was (io/digests.py)."""
    from mergelang.io.digests import TENSOR_DIGEST, sha256_file

    if recorded.startswith(TENSOR_DIGEST + ":"):
        return file_digest(path)
    return sha256_file(path)


def check_outputs(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems with the files of the output `folder` against its manifest (none: it is as
    written): each listed file present with its recorded digest, and no file it does not list.
    Reads every file once."""
    from mergelang.io.outguard import MANIFEST_NAME

    digests = manifest.get("digests")
    files = manifest.get("files")
    if not isinstance(digests, dict) or not isinstance(files, list):
        return ["the manifest records no file digests (written by an older mergelang?)"]
    problems = []
    try:
        present = {p.name for p in folder.iterdir()}
    except OSError as e:
        return [f"cannot list {folder}: {e.strerror or e}"]
    for name in sorted(present - {*map(str, files), *manifest.get("outputs", [])}):
        problems.append(f"{name}: not written by mergelang (the manifest does not list it)")
    for name in sorted(str(f) for f in files):
        if name == MANIFEST_NAME:
            continue
        want = digests.get(name)
        if name not in present:
            problems.append(f"{name}: missing")
        elif not isinstance(want, str):
            problems.append(f"{name}: the manifest records no digest for it")
        else:
            try:
                got = _digest_of(folder / name, want)
            except (OSError, CheckpointError, ValueError) as e:
                problems.append(f"{name}: cannot be read back ({e})")
                continue
            if got != want:
                problems.append(f"{name}: its content differs from what was written")
    return problems


def check_inputs(provenance: dict[str, Any], quick: bool = False) -> tuple[list[str], list[str]]:
    """(differences, notes) between the inputs recorded in a manifest's provenance and the files
    on this machine now: each file present with the same size and header, and (unless `quick`)
    the same content digest over the tensors the merge read (reads them once). A file whose
    modification time alone changed is reported as a note."""
    from mergelang.io.digests import header_bytes, sha256_text

    diffs: list[str] = []
    notes: list[str] = []
    inputs = provenance.get("inputs")
    if not isinstance(inputs, list):
        return ["the manifest records no inputs"], notes
    for model in inputs:
        name = model.get("name", "?")
        if not model.get("files"):
            notes.append(f"model `{name}` ({model.get('kind', '?')}): no file digests recorded")
        for rec in model.get("files") or []:
            path = Path(str(rec.get("path")))
            if "error" in rec:
                notes.append(f"model `{name}`: {path} could not be recorded ({rec['error']})")
                continue
            try:
                st = path.stat()
                head = header_bytes(path)
            except OSError as e:
                diffs.append(f"model `{name}`: {path} is gone or unreadable ({e.strerror or e})")
                continue
            if st.st_size != rec.get("size") or sha256_text(head) != rec.get("header_sha256"):
                diffs.append(f"model `{name}`: {path} changed (size or tensor table differ)")
                continue
            if quick:
                if st.st_mtime_ns != rec.get("mtime_ns"):
                    diffs.append(f"model `{name}`: {path} was modified since (same size and "
                                 "header; verify without --quick compares the content)")
                continue
            if st.st_mtime_ns != rec.get("mtime_ns"):
                notes.append(f"model `{name}`: {path} has a new modification time")
            try:
                infos = read_header(path)
                unread = set(rec.get("unread") or ())
                got = file_digest(path, [n for n in infos if n not in unread])
            except (OSError, CheckpointError, ValueError) as e:
                diffs.append(f"model `{name}`: {path} cannot be read ({e})")
                continue
            if got != rec.get("digest"):
                diffs.append(f"model `{name}`: {path} holds other tensor data than the merge read")
            elif unread:
                notes.append(f"model `{name}`: {path}: {len(unread)} tensors the merge did not "
                             "read are not covered by its digest")
    return diffs, notes


def check_single_file(path: Path, manifest: dict[str, Any], layout: dict[str, Any]
                      ) -> tuple[list[str], list[str]]:
    """(problems, notes) of a single-file output (io/singlefile.py) against the manifest of the
    folder it was assembled from: each shard's digest recomputed from this file's bytes (its
    tensors, in the shard's order under the header the writer built for them: `layout` gives
    the shard's tensor names), the recipe against the metadata's copy; the folder's other files
    (index, config) are not carried by a single file: a note."""
    from mergelang.io.digests import sha256_text, tensor_digest
    from mergelang.io.layout import OutputTensor, build_header
    from mergelang.io.singlefile import RECIPE_KEY, metadata_of

    digests, files = manifest.get("digests"), manifest.get("files")
    if not isinstance(digests, dict) or not isinstance(files, list):
        return ["the manifest records no file digests"], []
    try:
        infos = read_header(path)
    except (OSError, CheckpointError) as e:
        return [f"{path.name}: cannot be read back ({e})"], []
    problems: list[str] = []
    notes: list[str] = []
    seen: set[str] = set()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        for shard, names in sorted(layout.items()):
            want = digests.get(shard)
            if shard not in files or not isinstance(want, str) or not isinstance(names, list) \
                    or any(n not in infos for n in names):
                problems.append(f"{shard}: the file does not hold the tensors the manifest lists")
                continue
            seen.update(names)
            head, _ = build_header(tuple(OutputTensor(n, infos[n].shape, infos[n].dtype) for n in names))
            crcs = [(n, _range_crc(fd, infos[n].begin, infos[n].end)) for n in names]
            if tensor_digest(head, crcs) != want:
                problems.append(f"{shard}: its tensors differ from what was written")
    finally:
        os.close(fd)
    if set(infos) - seen:
        problems.append(f"{len(set(infos) - seen)} tensors not written by mergelang (e.g. "
                        f"{sorted(set(infos) - seen)[0]!r})")
    recipe = (metadata_of(path) or {}).get(RECIPE_KEY)
    if "mergelang_recipe.mrg" in files and (recipe is None or sha256_text(recipe)
                                            != digests.get("mergelang_recipe.mrg")):
        problems.append("mergelang_recipe.mrg: the recipe in the metadata differs from the one merged")
    rest = sorted(str(f) for f in files if str(f) not in layout and f != "mergelang_recipe.mrg"
                  and not str(f).startswith("mergelang_manifest"))
    if rest:
        notes.append(f"not carried by a single file (not checked): {', '.join(rest)}")
    return problems, notes


def _range_crc(fd: int, pos: int, end: int) -> int:
    from mergelang.io.digests import crc

    c = 0
    while pos < end:
        chunk = os.pread(fd, min(end - pos, 64 << 20), pos)
        if not chunk:
            raise OSError("the file is shorter than its header says")
        c = crc(chunk, c)
        pos += len(chunk)
    return c
