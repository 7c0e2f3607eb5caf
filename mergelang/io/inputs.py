"""Where input files may come from: model folders, the Hugging Face cache, symbolic links.

mergelang reads a model's weights and copies its small files (config.json, tokenizer) only from
inside the model's folder. A symbolic link is followed only when it resolves inside that folder,
or, for a snapshot folder of the Hugging Face cache
(``.../hub/models--ORG--NAME/snapshots/REV/``, whose files are links into ``../../blobs/``), inside
the cache repository folder ``models--ORG--NAME``. Anything else (a ``tokenizer.json`` that links
to ``~/.ssh/id_rsa``, a shard linked from another disk) is refused with E314, unless the user
opts in (``--follow-symlinks``, ``ml.compile(..., follow_symlinks=True)``).

A model may also be named by its hub id, ``"hf:ORG/NAME"`` or ``"hf:ORG/NAME@REVISION"``: it is
looked up in the local Hugging Face cache only (huggingface_hub, ``local_files_only``); mergelang
never downloads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mergelang.errors import CheckpointError
from mergelang.io.textfile import read_json, read_text, reason

HF_PREFIX = "hf:"
#: the recipe's copy in every output folder
RECIPE_FILENAME = "mergelang_recipe.mrg"
#: weight files are never copied from a reference model's folder
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                   ".pkl", ".onnx")
#: files bigger than this are never copied from a reference model's folder
MAX_COPY_SIZE = 64 * 1024 * 1024
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)?")
FOLLOW_HELP = ("mergelang reads only files inside the model folder (or its Hugging Face cache "
               "repository); pass --follow-symlinks (ml.compile(..., follow_symlinks=True)) if "
               "you mean to read this file")


def is_hf_id(text: str) -> bool:
    return text.startswith(HF_PREFIX)


def hf_snapshot(spec: str) -> Path:
    """The local snapshot folder of ``hf:ORG/NAME[@REVISION]`` (never downloads); raises
    CheckpointError (E301) when it is not in the cache."""
    repo, _, revision = spec[len(HF_PREFIX):].partition("@")
    if not _REPO_ID.fullmatch(repo) or (revision and not _REPO_ID.fullmatch(revision.replace("/", "-"))):
        raise CheckpointError(f"{spec!r} is not a model id like hf:ORG/NAME or hf:ORG/NAME@REVISION",
                              code="E301")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"{spec}: huggingface_hub is not installed",
                              "pip install huggingface_hub", "E301") from None
    storage = Path(_cache_dir()).expanduser() / ("models--" + repo.replace("/", "--"))
    if revision:
        revision = _commit_of(spec, storage, revision)
    try:
        folder = snapshot_download(repo, revision=revision or None, local_files_only=True,
                                   cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo}{'@' + revision if revision else ''} is not in the local Hugging Face cache "
            f"({_cache_dir()})",
            f"mergelang never downloads: fetch it first (e.g. `hf download {repo}`), or give "
            "the model folder's path", "E301") from None
    except Exception as exc:  # noqa: BLE001 - any other cache problem: a diagnostic, not a crash
        raise CheckpointError(f"{spec}: cannot look it up in the Hugging Face cache: {exc}",
                              code="E301") from None
    snap = Path(folder)
    if not _COMMIT.fullmatch(snap.name) or snap.resolve().parent != (storage / "snapshots").resolve():
        raise CheckpointError(f"{spec}: the cache gives {snap}, not a snapshot folder of "
                              f"{storage}", REF_HELP, "E328")
    return snap


#: a snapshot folder's name: a commit hash (git's SHA-1, or SHA-256)
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
REF_HELP = ("a cache ref (models--ORG--NAME/refs/REVISION) holds the commit hash of a snapshot "
            "folder; re-download the model (e.g. `hf download ORG/NAME --revision REVISION`)")


def _commit_of(spec: str, storage: Path, revision: str) -> str:
    """The commit hash `revision` names in cache repository `storage`: itself when it is one,
    else the content of refs/REVISION — read with the bounded reader and required to be a
    commit hash (a ref holding `../../..` would lead out of the repository): E328."""
    parts = revision.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CheckpointError(f"{spec!r}: the revision {revision!r} is not a branch, tag or "
                              "commit name", code="E301")
    ref = storage / "refs" / revision
    if not os.path.lexists(ref):
        return revision  # a commit hash, or not cached: huggingface_hub says which
    try:
        content = read_text(confined(ref, storage.resolve(), False, "cache ref"), 1024).strip()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{spec}: cannot read the cache ref {ref}: {reason(exc)}",
                              REF_HELP, "E328") from None
    if not _COMMIT.fullmatch(content):
        raise CheckpointError(f"{spec}: the cache ref {ref} holds {content[:60]!r}, not a commit "
                              "hash", REF_HELP, "E328")
    return content


def hf_revision(folder: Path) -> str | None:
    """The commit hash of a Hugging Face cache snapshot folder (``.../models--ORG--NAME/
    snapshots/COMMIT``), or None when `folder` is not one."""
    for cand in (Path(os.path.abspath(folder)), folder.resolve()):
        if cand.parent.name == "snapshots" and cand.parent.parent.name.startswith("models--") \
                and re.fullmatch(r"[0-9a-f]{40}", cand.name):
            return cand.name
    return None


def hf_repo_id(folder: Path) -> str | None:
    """``ORG/NAME`` of a Hugging Face cache snapshot folder, or None."""
    if hf_revision(folder) is None:
        return None
    for cand in (Path(os.path.abspath(folder)), folder.resolve()):
        repo = cand.parent.parent.name
        if cand.parent.name == "snapshots" and repo.startswith("models--"):
            return repo[len("models--"):].replace("--", "/", 1)
    return None


def _cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001
        return "~/.cache/huggingface/hub"


def model_root(folder: Path) -> Path:
    """The folder whose inside a model's files may resolve to: the model folder itself, or the
    cache repository ``models--ORG--NAME`` for a Hugging Face cache snapshot folder."""
    real = folder.resolve()
    for cand in (Path(os.path.abspath(folder)), real):
        if cand.parent.name == "snapshots" and cand.parent.parent.name.startswith(("models--",
                                                                                  "datasets--")):
            return cand.parent.parent.resolve()
    return real


def inside(path: Path, root: Path) -> bool:
    real = path.resolve()
    return real == root or root in real.parents


def confined(path: Path, root: Path, follow: bool, what: str = "file") -> Path:
    """`path` resolved, when it lies inside `root` (or `follow`); else CheckpointError E314."""
    real = path.resolve()
    if follow or real == root or root in real.parents:
        return real
    raise CheckpointError(f"{what} {path} is a link to {real}, outside the model folder {root}",
                          FOLLOW_HELP, "E314")


def reference_files(src: Path, recipe_filename: str, follow: bool = False) -> dict[str, Path]:
    """The small files of model folder `src` an output copies (config.json, tokenizer files,
    generation config, ...): regular files up to MAX_COPY_SIZE that are not weights, indexes or
    the recipe copy, each resolving inside the model folder (E314), each ``.json`` a JSON
    object (E315). Raises CheckpointError; OSError for an unreadable folder."""
    root = model_root(src)
    out: dict[str, Path] = {}
    for p in sorted(src.iterdir()):
        name = p.name
        if name == recipe_filename or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json") \
                or name.startswith(".") or name.startswith("mergelang_"):
            continue
        if not p.is_file():  # folders (and broken links) are never copied, wherever they point
            continue
        real = confined(p, root, follow, "file")
        if real.stat().st_size > MAX_COPY_SIZE:
            continue
        if name.endswith(".json"):
            check_json(real, p, obj=name in JSON_OBJECTS)
        out[name] = real
    return out


#: files transformers reads as JSON objects (other .json files need only parse)
JSON_OBJECTS = frozenset({"config.json", "tokenizer.json", "tokenizer_config.json",
                          "special_tokens_map.json", "generation_config.json", "added_tokens.json",
                          "vocab.json", "preprocessor_config.json", "processor_config.json"})


def check_json_object(real: Path, shown: Path | None = None) -> dict:
    """The JSON object in file `real`; CheckpointError E315 when it is not one."""
    return check_json(real, shown, obj=True)


def check_json(real: Path, shown: Path | None = None, obj: bool = True) -> Any:
    """The JSON value in file `real` (`obj`: an object); CheckpointError E315 otherwise."""
    shown = shown or real
    try:
        data = read_json(real)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{shown} is not valid JSON ({reason(exc)})",
                              "it is copied into the output and must parse: fix or remove it, "
                              "or set `option copy_files = false`", "E315") from None
    if obj and not isinstance(data, dict):
        raise CheckpointError(f"{shown} is not a JSON object (it holds a {type(data).__name__})",
                              "it is copied into the output and must parse: fix or remove it, "
                              "or set `option copy_files = false`", "E315")
    return data
