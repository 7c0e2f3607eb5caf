"""The on-disk cache folder (`MERGELANG_CACHE_DIR`, default `~/.cache/mergelang`): generated fused
kernels (`fused/`, with numba's own cache) and the parser's LALR tables (`lark/`)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path | None:
    """The writable folder `kind` inside the cache folder, created if needed; None when it
    cannot be created or written (callers then work without a disk cache)."""
    base = os.environ.get("MERGELANG_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mergelang")
    path = Path(base) / kind
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError:
        return None
    return path
