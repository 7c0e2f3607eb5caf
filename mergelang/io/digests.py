"""Content digests of safetensors files, as recorded in an output's manifest and checked by
`mergelang verify`.

The digest of a safetensors file is a SHA-256 over its header bytes (the 8-byte length and the
JSON) and, for each tensor in file order, its name and the CRC-32C of its bytes:
``tcrc1:<hex>``. The CRC-32C of a tensor is computed where the bytes already are: an input's by
the reader (`checkpoint.SafetensorsSource`) on the bytes it maps or reads for the merge (no
separate pass over the file; it does read those bytes from memory once more, measured in
notes/issue-31-outputs.md), an output's by the writer on the bytes it writes (the journal's
checksum). `mergelang verify` recomputes it from disk (one full read of each file).

CRC-32C detects accidental changes (a different download, a file edited or truncated); it is not
a defence against someone forging a file to match. Other files (config.json, the recipe, ...)
get a plain SHA-256 (``sha256:<hex>``).
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

from crc32c import crc32c

TENSOR_DIGEST = "tcrc1"
_TAG = b"mergelang-tensor-crc32c-v1\0"


def crc(data: object, seed: int = 0) -> int:
    return crc32c(data, seed) & 0xFFFFFFFF  # type: ignore[arg-type]


def tensor_digest(header: bytes, crcs: Iterable[tuple[str, int]]) -> str:
    """The digest of a safetensors file from its header bytes and (name, CRC-32C) of its
    tensors in file order (all of them, or the subset a manifest names)."""
    h = hashlib.sha256(_TAG)
    h.update(len(header).to_bytes(8, "little"))
    h.update(header)
    for name, c in crcs:
        b = name.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
        h.update(int(c).to_bytes(4, "little"))
    return f"{TENSOR_DIGEST}:{h.hexdigest()}"


def header_bytes(path: str | Path) -> bytes:
    """The first 8 + N bytes of a safetensors file (N: the header length it declares)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise OSError(f"{path}: too short to be safetensors")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 1024 * 1024:
            raise OSError(f"{path}: bad header length")
        return head + f.read(n)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def sha256_text(text: str | bytes) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8") if isinstance(text, str) else text).hexdigest()


def stat_of(path: str | Path) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class ReadLog:
    """The CRC-32C of every tensor a reader read, by name, computed on the bytes it read. A
    tensor read by rows is covered when its rows were read from first to last in order (the
    CRC continues across them); rows read out of order leave it uncovered (a reader never reads
    a byte twice for the digest)."""

    def __init__(self) -> None:
        self.crcs: dict[str, int] = {}
        self._rows: dict[str, tuple[int, int]] = {}  # name -> (next byte, CRC so far)
        self._lock = threading.Lock()

    def seed(self, name: str, first: int, begin: int) -> int | None:
        """The CRC to continue from for bytes starting at `begin` of a tensor starting at
        `first` (0 at its start); None when they do not continue the rows read so far."""
        if begin == first:
            return 0
        with self._lock:
            st = self._rows.get(name)
        return st[1] if st is not None and st[0] == begin else None

    def note(self, name: str, end: int, last: int, c: int) -> None:
        """Bytes up to `end` of a tensor ending at `last` have CRC `c` (from its start)."""
        with self._lock:
            if end >= last:
                self.crcs[name] = c
                self._rows.pop(name, None)
            else:
                self._rows[name] = (end, c)


def covered(infos: Iterable[Any], crcs: Mapping[str, int]) -> tuple[list[tuple[str, int]], list[str]]:
    """For the tensors of one file (TensorInfo): (name, CRC) of those read, in file order, and
    the names of those not read."""
    ordered = sorted(infos, key=lambda i: i.begin)
    done = [(i.name, crcs[i.name]) for i in ordered if i.name in crcs]
    missing = [i.name for i in ordered if i.name not in crcs]
    return done, missing
