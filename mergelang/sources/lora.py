"""LoRA / PEFT adapters as merge inputs: `model a = lora("adapter_dir", base = base)`.

The adapter model has the base model's tensor table (names, shapes, dtypes); loading a tensor
with a LoRA pair gives W + scale · B·A (in float32), scale = lora_alpha / r (lora_alpha / √r with
`use_rslora`), `alpha_pattern` honoured; embeddings use PEFT's `lora_embedding_A/B`
((B·A)ᵀ), `fan_in_fan_out` adapters (GPT-2 Conv1D) transpose the update. Full tensors saved by
PEFT (`modules_to_save`) replace the base tensor. PEFT naming:
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (an adapter name such as `.default`
before `.weight` is accepted). Nothing is materialised on disk: each tensor is built when the
plan loads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch

from mergelang.io.adapter import adapter_paths, lora_scale, read_adapter_config
from mergelang.io.checkpoint import CheckpointError, ModelSource, TensorInfo, read_header
from mergelang.diagnostics import Span
from mergelang.lang.intrinsics.registry import Elab, intrinsic
from mergelang.lang.values import Const, ModelV, Value

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|"
                  r"lora_embedding_B)(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")
_FULL = re.compile(r"^(?:base_model\.model\.)?(?P<name>.+?)$")
ADAPTER_FILES = ("adapter_model.safetensors",)


@dataclass(frozen=True)
class LoraSpec:
    """What `lora(path, base = model)` evaluates to (a model declaration's value)."""

    path: str
    base: str
    scale: float | None  # extra multiplier on top of alpha / r (default 1)

    def open_model(self, decl: Any, models: dict, base_dir: Path, diags: Any,
                   pending: set[str]) -> None:
        open_adapter(decl, self, models, base_dir, diags, pending)


@intrinsic("lora", "path", "base", ("scale", None),
           doc="a model declared as a LoRA/PEFT adapter applied to `base`: W + scale·(alpha/r)·B·A "
               "(use in `model NAME = lora(\"adapter_dir\", base = base)`)")
def _lora(el: Elab, a: dict[str, Value], span: Span) -> Value:
    path, base, scale = a["path"], a["base"], a["scale"]
    if el.tensor:
        raise el.error("E201", "lora(...) declares a model: use it as `model NAME = lora(...)`", span)
    if not (isinstance(path, Const) and isinstance(path.value, str)):
        raise el.error("E201", f"lora's `path` must be a string, got {path.describe()}", span)
    if not isinstance(base, ModelV):
        raise el.error("E201", f"lora's `base` must be a model, got {base.describe()}", span,
                       'e.g. model a = lora("./adapter", base = base)')
    s = None
    if not (isinstance(scale, Const) and scale.value is None):
        if not (isinstance(scale, Const) and isinstance(scale.value, (int, float))
                and not isinstance(scale.value, bool)):
            raise el.error("E201", f"lora's `scale` must be a number, got {scale.describe()}", span)
        s = float(scale.value)
    return Const(LoraSpec(path.value, base.name, s))


class LoraSource(ModelSource):
    def input_paths(self) -> list[Path]:
        return [*self.base.input_paths(), Path(self.adapter_dir), Path(self.file)]

    def __init__(self, label: str, folder: Path, base: ModelSource, scale: float | None = None):
        self.label, self.base = label, base
        self.folder = base.folder  # config.json and tokenizer are the base model's
        self.adapter_dir = folder
        file = folder / ADAPTER_FILES[0] if folder.is_dir() else folder
        cfg_path = (folder if folder.is_dir() else folder.parent) / "adapter_config.json"
        if not file.is_file():
            if folder.is_dir() and (folder / "adapter_model.bin").is_file():
                raise CheckpointError(f"{folder} has only adapter_model.bin (a pickle)",
                                      "convert it to adapter_model.safetensors", code="E306")
            raise CheckpointError(f"no {ADAPTER_FILES[0]} in {folder}", code="E301")
        if folder.is_dir():  # the adapter's files must lie inside its folder (io/adapter.py)
            file, cfg_path = adapter_paths(folder)
        else:  # the weights file named itself: its config must lie in the file's folder
            from mergelang.io.inputs import confined, model_root

            cfg_path = confined(cfg_path, model_root(folder.parent), False, "adapter config")
        try:
            self.cfg = read_adapter_config(cfg_path)
        except OSError as exc:
            raise CheckpointError(f"cannot read {cfg_path}: {exc.strerror or exc}",
                                  "a PEFT adapter folder has adapter_config.json") from None
        self.file = file
        self.extra = 1.0 if scale is None else scale
        header = read_header(file)
        table = base.tensors()
        self.pairs: dict[str, dict[str, str]] = {}  # base tensor -> {A, B, kind}
        self.full: dict[str, str] = {}
        unknown = []
        for key in header:
            m = _KEY.match(key)
            if m:
                target = m.group("module") + ".weight"
                if target not in table:
                    unknown.append(key)
                    continue
                kind = m.group("kind")
                slot = self.pairs.setdefault(target, {"module": m.group("module")})
                slot["A" if kind.endswith("A") else "B"] = key
                slot["embedding"] = "1" if "embedding" in kind else ""
                continue
            name = re.sub(r"\.modules_to_save(\.[A-Za-z0-9_]+)?(?=\.)", "",
                          _FULL.match(key).group("name"))  # type: ignore[union-attr]
            if name in table and tuple(header[key].shape) == tuple(table[name].shape):
                self.full[name] = key
            else:
                unknown.append(key)
        incomplete = [t for t, s in self.pairs.items() if "A" not in s or "B" not in s]
        if unknown or incomplete:
            what = unknown[:3] or incomplete[:3]
            raise CheckpointError(f"adapter {file}: {len(unknown) + len(incomplete)} tensors do not "
                                  f"fit the base model (e.g. {', '.join(map(repr, what))})",
                                  "the adapter must have been trained on this base model")
        for target, slot in self.pairs.items():
            why = _pair_problem(header[slot["A"]].shape, header[slot["B"]].shape,
                                tuple(table[target].shape),
                                bool(slot["embedding"] or self.cfg.get("fan_in_fan_out")))
            if why:
                raise CheckpointError(f"adapter {file}: `{slot['module']}` {why}",
                                      "the adapter must have been trained on this base model "
                                      "(and `fan_in_fan_out` in adapter_config.json must match it)",
                                      "E327")
        self._handle = None

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self.base.tensors()

    def _get(self, key: str) -> torch.Tensor:
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.file), framework="pt")
        return self._handle.get_tensor(key)

    def scale(self, module: str, r: int) -> float:
        return self.extra * lora_scale(self.cfg, module, r)

    def load(self, name: str) -> torch.Tensor:
        import torch

        if name in self.full:
            return self._get(self.full[name])
        w = self.base.load(name)
        pair = self.pairs.get(name)
        if pair is None:
            return w
        a = self._get(pair["A"]).to(torch.float32)
        b = self._get(pair["B"]).to(torch.float32)
        delta = b @ a
        if pair["embedding"] or self.cfg.get("fan_in_fan_out"):
            delta = delta.T
        return w.to(torch.float32) + self.scale(pair["module"], a.shape[0]) * delta

    def close(self) -> None:
        self._handle = None


def _pair_problem(a: tuple, b: tuple, weight: tuple, transposed: bool) -> str | None:
    """Why lora_A of shape `a` and lora_B of shape `b` cannot update a weight of shape `weight`
    (B @ A, transposed for embeddings and `fan_in_fan_out`), or None."""
    a, b = tuple(a), tuple(b)
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        return f"has lora_A {list(a)} and lora_B {list(b)}: not (r, in) and (out, r) factors"
    delta = (a[1], b[0]) if transposed else (b[0], a[1])
    if delta != weight:
        fifo = " with fan_in_fan_out" if transposed else ""
        return (f"gives an update of shape {list(delta)}{fifo}, but the base weight is "
                f"{list(weight)}")
    return None


def open_adapter(decl: Any, spec: LoraSpec, models: dict[str, ModelSource | None], base_dir: Path,
                 diags: Any, adapters: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Open `model NAME = lora(...)` once the other models are open (errors go to `diags`)."""
    from mergelang.io.locate import model_error
    from mergelang.diagnostics import error

    base = models.get(spec.base)
    if base is None:
        if spec.base in adapters:
            diags.add(error("E201", f"lora's base `{spec.base}` is an adapter declared later; "
                            "declare it first", decl.value.span))
        return  # otherwise the base failed to open: already reported
    path = Path(spec.path).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    try:
        models[decl.name] = LoraSource(decl.name, path, base, spec.scale)
    except (OSError, CheckpointError) as exc:
        diags.add(model_error(decl.name, str(path), exc, decl.value.span).diag)
