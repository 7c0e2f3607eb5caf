"""Checks on a mergekit config before and while it is translated.

- `check_structure`: the shapes of the YAML (a mapping; `models`/`slices`/`experts` lists of
  mappings; `parameters` mappings; `merge_method` a name), so a malformed config is a coded
  diagnostic (E702/E703/E705), never an internal error.
- `KNOWN_PARAMS`: the parameters each mergekit 0.1.5 method reads (its `ParameterSpec`s);
  others are dropped at import with W101 (mergekit ignores them).
- `finite`: numbers a recipe can hold (`1e999` is E705, not `inf`).
- `layer_count`: a local model's number of layers, from its tensor names or config.json (headers
  only), to check `layer_range`s against.
- `architectures`: the `architectures` of a local model's config.json (the architecture check).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from mergelang.diagnostics import Diagnostic, error
from mergelang.interop.mergekit_yaml import short

_GTA = ("int8_mask", "normalize", "rescale", "lambda", "weight", "density")
#: mergekit 0.1.5's parameters per method (mergekit/merge_methods/registry.py, printed from its specs)
KNOWN_PARAMS: dict[str, tuple[str, ...]] = {
    "linear": ("weight", "normalize"),
    "slerp": ("t",),
    "nearswap": ("t",),
    "nuslerp": ("weight", "nuslerp_row_wise", "nuslerp_flatten"),
    "multislerp": ("weight", "normalize_weights", "eps"),
    "karcher": ("max_iter", "tol"),
    "model_stock": ("filter_wise",),
    "passthrough": ("scale",),
    "ram": ("epsilon",),
    "ramplus_tl": ("r", "alpha", "epsilon"),
    "arcee_fusion": (),
    "sce": ("int8_mask", "select_topk"),
    "task_arithmetic": _GTA,
    "ties": _GTA,
    "dare_ties": _GTA,
    "dare_linear": _GTA,
    "breadcrumbs": _GTA + ("gamma",),
    "breadcrumbs_ties": _GTA + ("gamma",),
    "della": _GTA + ("epsilon",),
    "della_linear": _GTA + ("epsilon",),
}


def _mapping_or_none(v: Any) -> bool:
    return v is None or isinstance(v, dict)


def _model_ref(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("path", v.get("model")), str))


def check_structure(cfg: Any) -> Diagnostic | None:
    """The first structural problem of a config (or of each document of a multi file)."""
    if isinstance(cfg, list):
        for k, doc in enumerate(cfg):
            problem = check_structure(doc) if isinstance(doc, dict) else error(
                "E702", f"document {k + 1}: every document of a mergekit-multi file must be a config (a YAML mapping)")
            if problem is not None:
                return problem
        return None if cfg else error("E702", "the file holds no config")
    if not isinstance(cfg, dict):
        return error("E702", f"a mergekit config must be a YAML mapping, got {short(cfg)}")
    for key in ("dtype", "out_dtype"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            return error("E705", f"`{key}` must be a dtype's name (e.g. bfloat16), got {short(cfg[key])}")
    if "experts" in cfg and "merge_method" not in cfg:
        return _check_moe(cfg)
    method = cfg.get("merge_method")
    if method is not None and not isinstance(method, str):
        return error("E703", f"merge_method must be a method's name, got {short(method)}")
    if not _mapping_or_none(cfg.get("parameters")):
        return error("E702", f"`parameters` must be a mapping of names to values, got "
                     f"{short(cfg['parameters'])}")
    if cfg.get("base_model") is not None and not _model_ref(cfg["base_model"]):
        return error("E702", f"base_model: expected a model path or id, got {short(cfg['base_model'])}")
    models = cfg.get("models")
    if models is not None:
        if not isinstance(models, list):
            return error("E702", f"`models` must be a list, got {short(models)}")
        for k, m in enumerate(models):
            if not (isinstance(m, str) or (isinstance(m, dict) and _mapping_or_none(m.get("parameters")))):
                return error("E702", f"models[{k}]: expected `model: ...` with optional "
                             f"`parameters:` (a mapping), got {short(m)}")
    slices = cfg.get("slices")
    if slices is not None:
        if not isinstance(slices, list):
            return error("E702", f"`slices` must be a list, got {short(slices)}")
        for k, s in enumerate(slices):
            if not isinstance(s, dict) or not isinstance(s.get("sources"), list) or not s["sources"]:
                return error("E702", f"slices[{k}]: expected a mapping with a non-empty `sources` list")
            if not _mapping_or_none(s.get("parameters")):
                return error("E702", f"slices[{k}].parameters must be a mapping")
            for j, src in enumerate(s["sources"]):
                if not isinstance(src, dict) or not _mapping_or_none(src.get("parameters")):
                    return error("E702", f"slices[{k}].sources[{j}]: expected a mapping with "
                                 "`model`, `layer_range` and optional `parameters` (a mapping)")
    return None


def _check_moe(cfg: dict) -> Diagnostic | None:
    experts = cfg.get("experts")
    if not isinstance(experts, list) or not experts or not all(isinstance(e, dict) for e in experts):
        return error("E702", "`experts` must be a non-empty list of {source_model: ..., "
                     "positive_prompts: [...]}")
    k = cfg.get("experts_per_token", 2)
    if isinstance(k, str) and re.fullmatch(r"\s*[+-]?\d+\s*", k) and len(k) < 20:
        k = int(k)  # mergekit's pydantic model reads "2" as 2
    if isinstance(k, float) and k.is_integer():
        k = int(k)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 1024:
        return error("E705", f"experts_per_token must be a whole number from 1 to the number of "
                     f"experts, got {short(cfg.get('experts_per_token'))}")
    shared = cfg.get("shared_experts") or []
    if not isinstance(shared, list) or not all(isinstance(e, dict) for e in shared):
        return error("E702", "`shared_experts` must be a list of mappings like `experts`")
    for i, e in enumerate(experts + shared):
        rs = e.get("residual_scale")
        if rs is not None and finite(rs) is None:
            return error("E705", f"experts[{i}].residual_scale must be a finite number, got {short(rs)}")
        for key in ("positive_prompts", "negative_prompts"):
            p = e.get(key)
            if p is not None and not (isinstance(p, list) and all(isinstance(x, str) for x in p)):
                return error("E702", f"experts[{i}].{key} must be a list of strings, got {short(p)}")
    return None


_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


def finite(v: Any) -> float | None:
    """v as a finite float (numbers and numeric strings, as mergekit's pydantic models read
    them), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        if len(v) > 400 or not _NUMBER.fullmatch(v):
            return None
        v = float(v)
    if isinstance(v, int):
        try:
            v = float(v)
        except OverflowError:
            return None
    if isinstance(v, float) and math.isfinite(v):
        return v
    return None


def layer_count(path: Path, layer_prefix: str) -> int | None:
    """The number of numbered blocks of a local model: from its tensor names (`PREFIX.N.`),
    else config.json's `num_hidden_layers`; None when neither can be read."""
    from mergelang.io.checkpoint import CheckpointError
    from mergelang.io.locate import open_model

    try:
        src = open_model(path.name, path)
    except (OSError, CheckpointError, ValueError):
        return None
    try:
        rx = re.compile(re.escape(layer_prefix) + r"\.(\d+)\.")
        idx = {int(m.group(1)) for n in src.tensors() if (m := rx.match(n))}
        if idx:
            return max(idx) + 1
    except (OSError, CheckpointError, ValueError):
        pass
    finally:
        src.close()
    n = _config(path).get("num_hidden_layers")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _config(path: Path) -> dict:
    cfg = path / "config.json"
    try:
        if cfg.is_file():
            from mergelang.io.textfile import read_json

            data = read_json(cfg, 4 * 1024 * 1024)
            return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        pass
    return {}


def architectures(path: Path) -> tuple[str, ...] | None:
    """config.json's `architectures` of a local model folder (None when it has none)."""
    if not path.is_dir():
        return None
    arch = _config(path).get("architectures")
    if isinstance(arch, list) and arch and all(isinstance(a, str) for a in arch):
        return tuple(arch)
    return None


_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*/[A-Za-z0-9][A-Za-z0-9._\-]*")


def hf_id(ref: str) -> tuple[str, str] | None:
    """(ORG/NAME, revision or "") when `ref` reads as a Hugging Face id (`org/name[@rev]`)."""
    repo, _, rev = ref.partition("@")
    if _REPO.fullmatch(repo) and ".." not in repo and (not rev or re.fullmatch(r"[A-Za-z0-9._\-/]+", rev)):
        return repo, rev
    return None


def hf_cached(ref: str) -> Path | None:
    """The local snapshot of Hugging Face id `ref` (never downloads), None when not cached."""
    if hf_id(ref) is None:
        return None
    from mergelang.errors import CheckpointError
    from mergelang.io.inputs import hf_snapshot

    try:
        return hf_snapshot("hf:" + ref)
    except CheckpointError:
        return None


def download_command() -> str:
    """The download command of the installed huggingface_hub: `hf download` (0.34 and later),
    else `huggingface-cli download`."""
    try:
        from importlib.metadata import version

        major, minor = (int(x) for x in re.findall(r"\d+", version("huggingface_hub"))[:2])
    except Exception:  # noqa: BLE001 - not installed, or an odd version string
        return "hf download"
    return "hf download" if (major, minor) >= (0, 34) else "huggingface-cli download"
