"""PEFT LoRA adapter folders: written by `merge adapter` blocks (one `adapter_model.safetensors`,
no index, and `adapter_config.json` derived from the output tensors' names and shapes), and read
by `lora("dir")` and `mergelang rmm` with one rule (adapter_paths: files confined to the folder;
read_adapter_config: bounded read, PEFT's types, RE2 patterns)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from mergelang.errors import CheckpointError
from mergelang.io.layout import OutputTensor, ShardLayout, single_file
from mergelang.io.textfile import TextFileError, read_json

ADAPTER_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapter_layout(outputs: Iterable[OutputTensor]) -> ShardLayout:
    return single_file(list(outputs), ADAPTER_FILE)


def adapter_config(outputs: Iterable[OutputTensor], base_path: str) -> dict:
    """PEFT's LoraConfig as mergekit-extract-lora writes it: `r` = `lora_alpha` = the largest
    rank (so scale * B @ A is the stored product), other ranks in rank_pattern / alpha_pattern,
    target_modules the decomposed modules' last name parts, modules_to_save those of the
    full-rank tensors."""
    ranks: dict[str, int] = {}
    save: list[str] = []
    for t in outputs:
        name = t.name.removeprefix(PREFIX)
        for tail in (".lora_A.weight", ".lora_embedding_A"):
            if name.endswith(tail):
                ranks[name[: -len(tail)]] = t.shape[0]
                break
        else:
            if ".lora_B" in name or ".lora_embedding_B" in name:
                continue
            key = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
            if key not in save:
                save.append(key)
    top = max(ranks.values(), default=0)
    other = {k: v for k, v in ranks.items() if v != top}
    return {"base_model_name_or_path": base_path, "peft_type": "LORA", "use_rslora": False,
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
            "modules_to_save": save, "task_type": "CAUSAL_LM", "r": top, "lora_alpha": top,
            "rank_pattern": other, "alpha_pattern": other, "lora_dropout": 0.0,
            "fan_in_fan_out": False, "inference_mode": True}


# --- reading adapters (lora("dir") inputs, `mergelang rmm`): one rule for both -------------------

CONFIG_FILE = "adapter_config.json"
#: an adapter_config.json is a few kilobytes
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: a pattern key longer than this is refused (PEFT's are module names)
MAX_PATTERN = 1000
CONFIG_HELP = ("adapter_config.json is PEFT's LoraConfig: `r` and `lora_alpha` numbers, "
               "`alpha_pattern` / `rank_pattern` objects of regex -> number, `use_rslora` and "
               "`fan_in_fan_out` booleans")


def adapter_paths(folder: Path, follow: bool = False) -> tuple[Path, Path]:
    """(weights, config) of PEFT adapter folder `folder`, each resolved and lying inside the
    folder after symbolic links (io/inputs.py's rule, E314 otherwise; `follow` allows them)."""
    from mergelang.io.inputs import confined, model_root

    root = model_root(folder)
    return (confined(folder / ADAPTER_FILE, root, follow, "adapter file"),
            confined(folder / CONFIG_FILE, root, follow, "adapter config"))


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}", CONFIG_HELP, "E327")


def _number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return 0 < abs(v) <= 1e12  # False for NaN; a huge int compares without overflowing


def read_adapter_config(path: Path) -> dict:
    """adapter_config.json read with the bounded reader (io/textfile.py) and checked: every
    value the merge uses has PEFT's type, every pattern key compiles as RE2 (linear-time
    matching, as the recipe's rules). Raises CheckpointError (E327; OSError for no file)."""
    try:
        cfg = read_json(path, MAX_CONFIG_BYTES, obj=True)
    except TextFileError as exc:
        raise _bad(path, str(exc)) from None
    except UnicodeDecodeError:
        raise _bad(path, "it is not UTF-8 text") from None
    return check_adapter_config(cfg, path)


def check_adapter_config(cfg: Any, path: Path | str) -> dict:
    """`cfg` when it is an adapter config whose values the merge uses have PEFT's types (see
    read_adapter_config); CheckpointError E327 naming `path` otherwise."""
    path = Path(path)
    if not isinstance(cfg, dict):
        raise _bad(path, f"the adapter config is {_show(cfg)}, not a JSON object")
    for key in ("r", "lora_alpha"):
        if key in cfg and not _number(cfg[key]):
            raise _bad(path, f"`{key}` is {_show(cfg[key])}, not a finite number in (0, 1e12]")
    for key in ("use_rslora", "fan_in_fan_out"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise _bad(path, f"`{key}` is {_show(cfg[key])}, not true or false")
    for key in ("alpha_pattern", "rank_pattern"):
        pats = cfg.get(key)
        if pats is None:
            continue
        if not isinstance(pats, dict):
            raise _bad(path, f"`{key}` is {_show(pats)}, not an object of pattern -> number")
        for pat, value in pats.items():
            if not _number(value):
                raise _bad(path, f"`{key}`[{_show(pat)}] is {_show(value)}, not a finite number "
                                 "in (0, 1e12]")
            problem = _compile(pat)
            if isinstance(problem, str):
                raise _bad(path, f"`{key}` key {_show(pat)}: {problem}")
    return cfg


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


_PATTERNS: dict[str, Any] = {}


def _compile(pat: str) -> Any:
    """PEFT's pattern match `(.*\\.)?KEY$` compiled with RE2; a str says why it cannot be."""
    got = _PATTERNS.get(pat)
    if got is not None:
        return got
    if len(pat) > MAX_PATTERN:
        return f"longer than {MAX_PATTERN} characters"
    import re2

    opts = re2.Options()
    opts.log_errors = False
    try:
        got = re2.compile(rf"(.*\.)?{pat}$", opts)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        return f"not a regular expression RE2 (linear-time matching) runs: {reason}"
    _PATTERNS[pat] = got
    return got


def pattern_value(patterns: dict | None, module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the value of the first key of `patterns` matching `module` as
    `re.match(rf"(.*\\.)?{key}$", module)` does (run on RE2), else `default`. The config was
    checked by read_adapter_config."""
    for pat, value in (patterns or {}).items():
        rx = _compile(pat)
        if not isinstance(rx, str) and rx.match(module):
            return value
    return default


def lora_scale(cfg: dict, module: str, r: int) -> float:
    """PEFT's scaling of `module` with rank `r`: lora_alpha (alpha_pattern first) / r, or / sqrt(r)
    with use_rslora."""
    alpha = pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", r))
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
