"""Layer stacking (frankenmerges): a model built from layer ranges of other models.

    model a = "./model-a"
    model b = "./model-b"
    model franken = stack_layers([layer_range(a, 0, 24), layer_range(b, 8, 32)])
    merge from franken { "*" => franken }

The stacked model's tensor table: the tensors before the layers (embeddings) of the first range's
model, then each range's layers renumbered consecutively (`layers.8.` of `b` above becomes
`layers.24.`), then the other non-layer tensors (final norm, lm_head) of the last range's model —
mergekit's passthrough semantics. It can be merged like any model; as the `merge from` model its
names define the output, and the output's config.json gets the new layer count. Ranges are
half-open: layer_range(a, 0, 24) is layers 0..23.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch

from mergelang.io.checkpoint import ModelSource, TensorInfo
from mergelang.diagnostics import Span, error
from mergelang.lang.intrinsics.registry import Elab, intrinsic
from mergelang.lang.values import Const, ListV, ModelV, Value, is_number

LAYER = re.compile(r"(^|\.)(layers|layer|h|blocks)\.(\d+)\.")
PRE = re.compile(r"embed|wte|wpe|word_embeddings")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class LayerRange:
    model: str
    start: int
    end: int


@dataclass(frozen=True)
class StackSpec:
    ranges: tuple[LayerRange, ...]

    def open_model(self, decl: Any, models: dict[str, ModelSource | None], base_dir: Path,
                   diags: Any, pending: set[str]) -> None:
        sources = []
        for r in self.ranges:
            m = models.get(r.model)
            if m is None:
                if r.model in pending:
                    diags.add(error("E201", f"`{r.model}` is declared later; declare it before "
                                    f"`{decl.name}`", decl.value.span))
                return  # otherwise it failed to open: already reported
            sources.append(m)
        try:
            stacked = StackedSource(decl.name, list(zip(self.ranges, sources)))
            from mergelang.io.architectures import stacking_patch

            why = stacking_patch(stacked.source_config() or {}, stacked.layer_map)
            if isinstance(why, str):
                diags.add(error("E326", f"model `{decl.name}`: {why}", decl.value.span,
                                "keep the dense layers first, or write config.json by hand"))
                return
            models[decl.name] = stacked
        except ValueError as exc:
            diags.add(error("E203", f"model `{decl.name}`: {exc}", decl.value.span))


def _int(el: Elab, v: Value, what: str, span: Span) -> int:
    if not (is_number(v) and float(v.value) == int(v.value)):  # type: ignore[union-attr]
        raise el.error("E201", f"layer_range's `{what}` must be an integer, got {v.describe()}", span)
    return int(v.value)  # type: ignore[union-attr]


@intrinsic("layer_range", "model", "start", "end",
           doc="layers start..end-1 of a model, for stack_layers (half-open, like mergekit)")
def _layer_range(el: Elab, a: dict[str, Value], span: Span) -> Value:
    m = a["model"]
    if not isinstance(m, ModelV):
        raise el.error("E201", f"layer_range needs a model, got {m.describe()}", span)
    start, end = _int(el, a["start"], "start", span), _int(el, a["end"], "end", span)
    if not 0 <= start < end:
        raise el.error("E203", f"layer_range({m.name}, {start}, {end}) is empty or negative", span,
                       "ranges are half-open: layer_range(a, 0, 24) is layers 0..23")
    return Const(LayerRange(m.name, start, end))


@intrinsic("stack_layers", "ranges",
           doc="a model made of layer ranges of other models, renumbered in order (frankenmerge); "
               "use in `model NAME = stack_layers([layer_range(a, 0, 24), ...])`")
def _stack_layers(el: Elab, a: dict[str, Value], span: Span) -> Value:
    if el.tensor:
        raise el.error("E201", "stack_layers(...) declares a model: use it as "
                       "`model NAME = stack_layers(...)`", span)
    rs = a["ranges"]
    items = rs.items if isinstance(rs, ListV) else ()
    if not items or not all(isinstance(i, Const) and isinstance(i.value, LayerRange) for i in items):
        raise el.error("E201", "stack_layers needs a non-empty list of layer_range(model, start, end)",
                       span)
    return Const(StackSpec(tuple(i.value for i in items)))  # type: ignore[union-attr]


def _layers(source: ModelSource) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name in source.tensors():
        m = LAYER.search(name)
        if m:
            out.setdefault(int(m.group(3)), []).append(name)
    return out


class StackedSource(ModelSource):
    def __init__(self, label: str, ranges: list[tuple[LayerRange, ModelSource]]):
        self.label = label
        first, last = ranges[0][1], ranges[-1][1]
        self.folder = first.folder
        self._map: dict[str, tuple[ModelSource, str]] = {}
        table: dict[str, TensorInfo] = {}

        def put(src: ModelSource, old: str, new: str) -> None:
            info = src.tensors()[old]
            table[new] = TensorInfo(new, info.shape, info.dtype, info.file, info.begin, info.end)
            self._map[new] = (src, old)

        for name in first.tensors():
            if not LAYER.search(name) and PRE.search(name):
                put(first, name, name)
        k = 0
        self.layer_map: list[int] = []  # new layer -> the layer of its source model
        for r, src in ranges:
            layers = _layers(src)
            if r.end > len(layers) or any(i not in layers for i in range(r.start, r.end)):
                raise ValueError(f"layer_range({r.model}, {r.start}, {r.end}): `{r.model}` has "
                                 f"{len(layers)} layers (0..{len(layers) - 1})")
            for i in range(r.start, r.end):
                for name in layers[i]:
                    new = LAYER.sub(lambda m: f"{m.group(1)}{m.group(2)}.{k}.", name, count=1)
                    put(src, name, new)
                self.layer_map.append(i)
                k += 1
        for name in last.tensors():
            if not LAYER.search(name) and not PRE.search(name):
                put(last, name, name)
        self.num_layers = k
        self._table = table

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._table

    def load(self, name: str) -> torch.Tensor:
        src, old = self._map[name]
        return src.load(old)

    def config(self) -> dict | None:
        cfg = super().config()
        return patch_config(cfg, self.config_patch()) if cfg is not None else None

    def source_config(self) -> dict | None:
        """The first range's model's config.json, unchanged."""
        return super().config()

    def config_patch(self) -> dict[str, Any]:
        """The layer count, and for MoE models the keys saying which layers are dense
        (io/architectures.py; checked at compile time, E326)."""
        from mergelang.io.architectures import stacking_patch

        cfg = super().config() or {}
        keys = [k for k in LAYER_KEYS if k in cfg] or ["num_hidden_layers"]
        moe = stacking_patch(cfg, self.layer_map)
        return {**{k: self.num_layers for k in keys}, **(moe if isinstance(moe, dict) else {})}


def patch_config(cfg: dict, patch: dict[str, Any]) -> dict:
    out = dict(cfg)
    out.update(patch)
    return out
