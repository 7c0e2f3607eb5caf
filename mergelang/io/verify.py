"""Verification of a finished output folder before it is moved into place: every planned shard
has its planned size and a header (re-read from disk with the reader's own validating parser)
naming exactly its planned tensors at their planned offsets, and the index names every tensor,
in the shard that holds it, with the right total size."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
