"""The one reader of every text, JSON and YAML file mergelang reads (recipes, imports, config.json,
adapter and RMM configs, tokenizer files, indexes, manifests, mergekit YAML, objective files):
a regular file only — not a device (``/dev/zero`` never ends), a FIFO (opened without blocking,
then refused), a socket or a folder — of at most a bounded size, read with one bounded ``read``.

Every failure is a ``ValueError`` (``TextFileError``) or an ``OSError`` (no such file, no
permission), ``UnicodeDecodeError`` for text that is not UTF-8 (itself a ``ValueError``): callers
turn them into their own diagnostic code (E002 for recipes, E303 / E315 for model files, E325 for
adapters, E701 for mergekit configs, ...). tests/io/test_textfile.py checks that no other module
of the package reads a file as text or JSON by itself.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

#: the default bound: the largest small file a model folder has (a tokenizer.json of a 256k
#: vocabulary is ~35 MB); io.inputs.MAX_COPY_SIZE is the same
MAX_TEXT_BYTES = 64 * 1024 * 1024
class TextFileError(ValueError):
    """A file that mergelang refuses to read as text: not a regular file, too large, not
    UTF-8, or (read_json) not valid / too deeply nested JSON."""


def _mib(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"


def read_bytes(path: str | Path, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of regular file `path`, at most `limit` of them (TextFileError beyond)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise TextFileError(f"it is {kind}")
        if st.st_size > limit:
            raise TextFileError(f"it is {st.st_size} bytes, more than the {_mib(limit)} "
                                "mergelang reads from such a file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)  # a file growing while read stops here too
    finally:
        os.close(fd)
    if len(data) > limit:
        raise TextFileError(f"it is more than the {_mib(limit)} mergelang reads from such a file")
    return data


def read_text(path: str | Path, limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of regular file `path` (at most `limit` bytes), newlines as `read_text`
    gives them (\\r\\n and \\r become \\n)."""
    text = read_bytes(path, limit).decode("utf-8")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_json(text: str) -> Any:
    """JSON `text` parsed; TextFileError when invalid or nested too deeply (json's scanner
    raises RecursionError there, in C as in Python)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise TextFileError("it nests too deeply") from None
    except ValueError as exc:
        raise TextFileError(f"it is not valid JSON ({exc})") from None


def read_json(path: str | Path, limit: int = MAX_TEXT_BYTES, obj: bool = False) -> Any:
    """The JSON value in regular file `path` (at most `limit` bytes); with `obj`, a JSON object
    (TextFileError otherwise)."""
    data = parse_json(read_text(path, limit))
    if obj and not isinstance(data, dict):
        raise TextFileError(f"it is not a JSON object (it holds a {type(data).__name__})")
    return data


def reason(exc: BaseException) -> str:
    """A short reason for a read failure, for a diagnostic's message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, UnicodeDecodeError):
        return "it is not UTF-8 text"
    return str(exc) or type(exc).__name__
