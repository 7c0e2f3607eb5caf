"""Finding a model's files: an HF folder (sharded or not, its index checked), a Hugging Face
cache snapshot or `hf:` id, a single file; and the diagnostics for a model that cannot be
opened. `open_model` picks the source class (`checkpoint.SafetensorsSource`,
`pickles.PickleSource`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from mergelang.diagnostics import CompileError, Span, did_you_mean, error
from mergelang.errors import CheckpointError
from mergelang.io.checkpoint import (INDEX_NAME, PICKLE_HELP, PICKLE_INDEX_NAME, PICKLE_SUFFIXES,
                                     ModelSource, SafetensorsSource)
from mergelang.io.inputs import confined, hf_snapshot, is_hf_id, model_root
from mergelang.io.pickles import PickleSource
from mergelang.io.textfile import read_json


def _index_files(folder: Path, index: Path, root: Path, follow: bool = False) -> list[Path]:
    """The shard files an index names, each inside `folder` (E308), present (E307) and, after
    symbolic links, inside `root` (E314, see inputs.py), resolved."""
    try:
        data = read_json(index)
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{index}: not a valid index (needs a `weight_map` of file names)") from None
    files: list[Path] = []
    for fname in dict.fromkeys(weight_map.values()):
        if "\0" in fname or Path(fname).is_absolute() or ".." in Path(fname).parts:
            raise CheckpointError(f"{index}: refers to {fname!r}, outside the model folder",
                                  "index files may only name shards inside their folder", "E308")
        p = folder / fname
        if not p.is_file():
            raise CheckpointError(f"{index}: shard {fname!r} is missing",
                                  "the download may be incomplete", "E307")
        files.append(confined(p, root, follow, "shard"))
    return files


def _weight_files(folder: Path, root: Path, follow: bool) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        return _index_files(folder, confined(index, root, follow, "index"), root, follow)
    single = folder / "model.safetensors"
    if single.is_file():
        return [confined(single, root, follow, "shard")]
    return [confined(p, root, follow, "shard") for p in sorted(folder.glob("*.safetensors")) if p.is_file()]


def _config_inside(folder: Path, root: Path, follow: bool) -> None:
    """config.json is read for every model (architecture, FP8 blocks, vocabulary size), not only
    copied from the reference: it too must lie inside the model folder (E314)."""
    cfg = folder / "config.json"
    if cfg.is_symlink() or cfg.exists():
        confined(cfg, root, follow, "config")


def open_model(label: str, path: str | Path, allow_pickle: bool = False,
               follow_symlinks: bool = False) -> ModelSource:
    """Open an HF folder, a Hugging Face cache snapshot (a folder, or ``hf:ORG/NAME``: local
    cache only) or a `.safetensors` file (headers only); raises CheckpointError. Pickle
    checkpoints are refused (E306) unless `allow_pickle`; files whose symbolic links leave the
    model folder (or its cache repository) are refused (E314) unless `follow_symlinks`. Inputs
    are only ever opened for reading; no code from a model folder is ever run."""
    if isinstance(path, str) and is_hf_id(path):
        path = hf_snapshot(path)
    p = Path(path)
    follow = follow_symlinks
    if p.is_file():
        folder = p.resolve().parent if (p.parent / "config.json").is_file() else None
        if folder is not None:
            _config_inside(p.parent, model_root(p.parent), follow)
        if p.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise CheckpointError(f"{p} is a pickle-based checkpoint; mergelang reads safetensors",
                                      PICKLE_HELP, "E306")
            return PickleSource(label, [p.resolve()], folder)
        if p.suffix != ".safetensors":
            raise CheckpointError(f"{p} is not a .safetensors file or a model folder",
                                  "supported: safetensors (and, with --allow-pickle, .bin/.pt)")
        return SafetensorsSource(label, [p.resolve()], folder)
    if p.is_dir():
        root = model_root(p)
        _config_inside(p, root, follow)
        files = _weight_files(p, root, follow)
        if not files:
            index = p / PICKLE_INDEX_NAME
            pickles = _index_files(p, index, root, follow) if index.is_file() else [
                confined(f, root, follow, "checkpoint") for f in sorted(p.iterdir())
                if f.suffix in PICKLE_SUFFIXES and f.is_file()]
            if pickles and not allow_pickle:
                names = ", ".join(f.name for f in pickles[:3])
                raise CheckpointError(f"{p} holds only pickle checkpoints ({names})", PICKLE_HELP, "E306")
            if pickles:
                return PickleSource(label, pickles, p.resolve())
            raise CheckpointError(f"{p} has no .safetensors weights")
        return SafetensorsSource(label, files, p.resolve())
    raise FileNotFoundError(str(p))


def missing_path_help(path: Path) -> str | None:
    parent = path.parent if str(path.parent) else Path(".")
    if parent.is_dir():
        names = [c.name for c in parent.iterdir()]
        hint = did_you_mean(path.name, names)
        if hint:
            return hint
    if not parent.exists():
        return f"the folder {parent} does not exist either"
    return None


def model_error(label: str, path: str, exc: Exception, span: Span | None) -> CompileError:
    if isinstance(exc, FileNotFoundError):
        return CompileError(error("E301", f"model `{label}`: path {path} does not exist", span,
                                  missing_path_help(Path(path))))
    if isinstance(exc, CheckpointError):
        return CompileError(error(exc.code, f"model `{label}`: {exc}", span, exc.help))
    return CompileError(error("E303", f"model `{label}`: cannot open {path}: {exc}", span))


def names_like(name: str, names: Iterable[str]) -> str | None:
    return did_you_mean(name, names)
