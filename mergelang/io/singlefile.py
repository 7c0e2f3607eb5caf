"""Single-file outputs: `mergelang run R.mrg -o model.safetensors` writes ONE safetensors file (what
Stable Diffusion UIs and sd-mecha write) with the recipe and the manifest in its metadata
(`mergelang_recipe`, `mergelang_manifest`, and `mergelang_shards` for `mergelang verify FILE`:
strings, as safetensors metadata must be).

The merge runs as usual — the same atomic writer, journal, checks and manifest — into a private
temporary folder beside the target (hidden, created here, removed on every exit path); its shards
are then copied into one file (one more write of the output bytes, measured in
benchmarks/bench_single_file.py), written beside the target and renamed into place. The target
follows the output guard's single-file rules (io/outguard.py: E404 for an input, never a link or a
folder) and one more: an existing file is replaced (with `--force`) only when it is itself a
mergelang single-file output; any other file is refused, `--force` or not (E403).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from dataclasses import replace
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Callable, Iterable

from mergelang.diagnostics import MergelangError, error
from mergelang.errors import CodedError, to_diagnostic
from mergelang.io.checkpoint import TensorInfo, read_header
from mergelang.io.layout import OutputTensor, build_header
from mergelang.io.outguard import MANIFEST_NAME, OutputError, check_file_output, replace_file
from mergelang.io.textfile import read_json, read_text

#: the metadata keys of a single-file output
RECIPE_KEY = "mergelang_recipe"
MANIFEST_KEY = "mergelang_manifest"
#: the shards of the merge's folder, each with its tensor names in file order (JSON): what
#: `mergelang verify FILE` needs to recompute the manifest's shard digests from this one file
SHARDS_KEY = "mergelang_shards"
_CHUNK = 64 << 20


def is_single_file(out: str | Path) -> bool:
    return str(out).lower().endswith(".safetensors")


def metadata_of(path: Path) -> dict[str, str] | None:
    """The `__metadata__` of a safetensors file (None when it is not one)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - not a safetensors file: not ours
        return None


def check_single_file(out: str | Path, inputs: Iterable[Path], force: bool) -> Path:
    """The rules for `-o FILE.safetensors` (module docstring); its absolute path."""
    path = check_file_output(out, inputs, force)
    if path.exists() and MANIFEST_KEY not in (metadata_of(path) or {}):
        raise OutputError(f"-o {out} exists and is not a mergelang single-file output",
                          "mergelang replaces only a file it wrote: remove it by hand, or choose "
                          "another path")
    return path


def run_single_file(recipe: Any, out: str | Path, force: bool, resume: bool, kw: dict[str, Any]) -> Path:
    """`Recipe.run(out)` for `out` ending in .safetensors: checks, then `write_single_file` with
    the recipe's own folder run (no model card: the file carries the recipe and manifest)."""
    if kw.pop("report", False):
        raise MergelangError(error("E402", "--report writes beside the output: it needs an output "
                                   "folder, not a single file", None, "give -o a folder"))
    if resume:
        raise MergelangError(error("E402", "--resume does not apply to a single-file output", None,
                                   "a single-file output is assembled after the merge: rerun "
                                   "without --resume, or write a folder"))
    if recipe.output_names or recipe.adapter_outputs():
        what = "named outputs (one folder each)" if recipe.output_names else "a LoRA adapter"
        raise MergelangError(error("E423", f"-o {out}: a single safetensors file holds one model, and "
                                   f"this recipe writes {what}", None, "give an output folder instead"))
    durable = kw.pop("fsync", True)  # the private folder is never kept: only the file is synced
    try:
        return write_single_file(out, recipe.compilation.inputs, force,
                                 lambda folder: recipe.run(folder, model_card=False, fsync=False, **kw),
                                 durable)
    except CodedError as exc:
        raise MergelangError(to_diagnostic(exc)) from None
    except MergelangError as exc:  # the private folder is gone: no --resume advice
        raise MergelangError([replace(d, notes=tuple(n for n in d.notes if "--resume" not in n[0]))
                              for d in exc.diagnostics]) from None


def write_single_file(out: str | Path, inputs: Iterable[Path], force: bool,
                      run_folder: Callable[[Path], Path], fsync: bool = True) -> Path:
    """Check `out`, run the merge into a private folder (`run_folder(path) -> folder`), then
    write its tensors, recipe and manifest as one safetensors file at `out`."""
    path = check_single_file(out, inputs, force)
    _remove_stale(path)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".mergelang-work", dir=path.parent))
    lock = os.open(work / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held while the run lives (a kill releases it)
        folder = run_folder(work / "out")
        tensors, metadata = _collect(folder)
        return replace_file(path, lambda tmp: _assemble(tmp, tensors, metadata, fsync))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(lock)


#: the lock file inside a private work folder: held (flock) while its run is alive
LOCK_NAME = ".mergelang-lock"


def _remove_stale(path: Path) -> None:
    """Private work folders of earlier single-file runs for `path` that were killed (SIGKILL, a
    power loss: no `finally` ran): folders named by this module's pattern, holding its lock file,
    whose lock nobody holds. A run still alive holds its lock, and its folder stays."""
    for cand in path.parent.glob(f".{glob_escape(path.name)}.*.mergelang-work"):
        lock_path = cand / LOCK_NAME
        if cand.is_symlink() or not cand.is_dir() or lock_path.is_symlink() or not lock_path.is_file():
            continue  # not one of ours
        try:
            fd = os.open(lock_path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live run
            os.close(fd)
            continue
        try:
            shutil.rmtree(cand, ignore_errors=True)
        finally:
            os.close(fd)


def _collect(folder: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Every tensor of a merged folder in index order (with its shard and byte range), and the
    metadata of the single file."""
    index = read_json(folder / "model.safetensors.index.json", obj=True)
    shards: dict[str, dict[str, TensorInfo]] = {}
    out = []
    for name, shard in index["weight_map"].items():
        if shard not in shards:
            shards[shard] = read_header(folder / shard)
        out.append(shards[shard][name])
    import json

    layout = {shard: [i.name for i in sorted(infos.values(), key=lambda i: i.begin)]
              for shard, infos in shards.items()}
    metadata = {RECIPE_KEY: read_text(folder / "mergelang_recipe.mrg"),
                MANIFEST_KEY: read_text(folder / MANIFEST_NAME),
                SHARDS_KEY: json.dumps(layout, separators=(",", ":"))}
    return out, metadata


def _copy(src: int, dst: int, offset: int, n: int) -> None:
    """`n` bytes of `src` from `offset` appended to `dst`: in the kernel where it can
    (copy_file_range; a reflink on filesystems that share extents), else through a buffer."""
    while n:
        try:
            done = os.copy_file_range(src, dst, min(n, _CHUNK), offset)
        except (AttributeError, OSError):  # no copy_file_range here, or not between these files
            done = 0
        if done <= 0:
            chunk = os.pread(src, min(n, _CHUNK), offset)
            if not chunk:
                raise OSError("a shard ended early")
            done = os.write(dst, chunk)
        offset += done
        n -= done


def _assemble(tmp: Path, tensors: list[TensorInfo], metadata: dict[str, str], fsync: bool = True) -> None:
    header, _ = build_header(tuple(OutputTensor(t.name, t.shape, t.dtype) for t in tensors), metadata)
    with open(tmp, "xb") as dst:
        dst.write(header)
        dst.flush()
        for t in tensors:
            with open(t.file, "rb") as src:
                _copy(src.fileno(), dst.fileno(), t.begin, t.end - t.begin)
        dst.flush()
        if fsync:
            os.fsync(dst.fileno())
