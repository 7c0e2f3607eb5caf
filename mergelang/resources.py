"""Where the grammar and the standard library live: inside the wheel (`mergelang/_data/`) or, in
a source checkout / editable install, at the repository's top level (`grammar/`, `stdlib/`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

_PKG = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def data_dir(name: str) -> Path:
    for candidate in (_PKG / "_data" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"mergelang installation is incomplete: no `{name}/` folder found")


def grammar_path() -> Path:
    return data_dir("grammar") / "mrg.lark"


def stdlib_files() -> list[Path]:
    return sorted(data_dir("stdlib").glob("*.mrg"))
