"""What config.json says about a checkpoint's layers and experts: the built-in knowledge of the
mixture-of-experts families (DeepSeek-V3 / V2, Qwen3-MoE / Qwen2-MoE, Mixtral) and of dense
decoders, used by `explain` (a summary line), `check` (W109 when the config and the tensors
disagree), stacking (the config keys a new layer order changes) and `align` (which models it has
no built-in groups for).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

MOE_TYPES = ("deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral")
_EXPERT = re.compile(r"\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.")
_FUSED = re.compile(r"\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Architecture:
    model_type: str
    layers: int | None
    experts: int | None = None            # routed experts per MoE layer
    experts_per_token: int | None = None
    shared_experts: int = 0
    dense_layers: tuple[int, ...] = ()    # layers with a dense MLP (the others are MoE)
    routers: tuple[str, ...] = field(default=())  # per-layer router tensors (name suffixes)

    @property
    def moe(self) -> bool:
        return self.experts is not None

    def describe(self) -> str:
        if not self.moe:
            return f"{self.model_type}, {self.layers} layers" if self.layers else self.model_type
        dense = (f" ({len(self.dense_layers)} dense: {_ranges(self.dense_layers)})"
                 if self.dense_layers else "")
        shared = f" + {self.shared_experts} shared" if self.shared_experts else ""
        per = f" ({self.experts_per_token} per token)" if self.experts_per_token else ""
        return (f"{self.model_type}, {self.layers} layers{dense}, {self.experts} routed experts"
                f"{per}{shared} per MoE layer; routers: {', '.join(self.routers)}")


def _ranges(xs: tuple[int, ...]) -> str:
    return f"{xs[0]}..{xs[-1]}" if len(xs) > 2 and xs[-1] - xs[0] == len(xs) - 1 else \
        ",".join(map(str, xs))


def architecture(cfg: Mapping[str, Any] | None) -> Architecture | None:
    """The layer and expert layout config.json describes (None without a model_type)."""
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("model_type"), str):
        return None
    kind = cfg["model_type"]
    layers = cfg.get("num_hidden_layers") if isinstance(cfg.get("num_hidden_layers"), int) else None
    if kind in ("deepseek_v3", "deepseek_v2"):
        k = int(cfg.get("first_k_dense_replace") or 0)
        freq = int(cfg.get("moe_layer_freq") or 1)
        dense = tuple(i for i in range(layers or 0) if i < k or i % freq)
        routers = ("mlp.gate.weight",) + (("mlp.gate.e_score_correction_bias",)
                                           if cfg.get("topk_method") == "noaux_tc" or kind == "deepseek_v3" else ())
        return Architecture(kind, layers, cfg.get("n_routed_experts"), cfg.get("num_experts_per_tok"),
                            int(cfg.get("n_shared_experts") or 0), dense, routers)
    if kind in ("qwen3_moe", "qwen2_moe"):
        step = int(cfg.get("decoder_sparse_step") or 1)
        only = set(cfg.get("mlp_only_layers") or [])
        dense = tuple(i for i in range(layers or 0) if i in only or (i + 1) % step)
        shared = 1 if kind == "qwen2_moe" and cfg.get("shared_expert_intermediate_size") else 0
        routers = ("mlp.gate.weight",) + (("mlp.shared_expert_gate.weight",) if shared else ())
        return Architecture(kind, layers, cfg.get("num_experts"), cfg.get("num_experts_per_tok"),
                            shared, dense, routers)
    if kind == "mixtral":
        return Architecture(kind, layers, cfg.get("num_local_experts"), cfg.get("num_experts_per_tok"),
                            0, (), ("mlp.gate.weight",))
    return Architecture(kind, layers)


def tensor_layout(names_shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, int | None]:
    """(layers, experts per MoE layer) found in a checkpoint's tensors (headers only)."""
    layers = {int(m.group(1)) for n in names_shapes if (m := _LAYER.search(n))}
    experts: dict[int, int] = {}
    for n, shape in names_shapes.items():
        if m := _EXPERT.search(n):
            experts[int(m.group(1))] = max(experts.get(int(m.group(1)), 0), int(m.group(2)) + 1)
        elif (m := _FUSED.search(n)) and shape:
            experts[int(m.group(1))] = max(experts.get(int(m.group(1)), 0), shape[0])
    return (max(layers) + 1 if layers else None), (max(experts.values()) if experts else None)


def mismatch(cfg: Mapping[str, Any] | None, names_shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """What config.json and the tensors disagree on (layer or expert counts), or None."""
    arch = architecture(cfg)
    if arch is None or (arch.layers is None and arch.experts is None):
        return None
    layers, experts = tensor_layout(names_shapes)
    if arch.layers is not None and layers is not None and layers != arch.layers:
        return f"config.json says {arch.layers} layers, the tensors have {layers}"
    if arch.moe and arch.experts is not None and experts is not None and experts != arch.experts:
        return f"config.json says {arch.experts} routed experts, the tensors have {experts}"
    return None


def stacking_patch(cfg: Mapping[str, Any], layer_map: list[int]) -> dict[str, Any] | str:
    """The config keys a stacked MoE model changes, given for each new layer the old layer it
    comes from (one source config); a message when the config cannot describe the new order."""
    arch = architecture(cfg)
    if arch is None or not arch.moe:
        return {}
    dense_new = [j for j, old in enumerate(layer_map) if old in arch.dense_layers]
    if arch.model_type in ("deepseek_v3", "deepseek_v2"):
        if int(cfg.get("moe_layer_freq") or 1) != 1:
            return "stacking a DeepSeek model with moe_layer_freq != 1 is not supported"
        if dense_new != list(range(len(dense_new))):
            return ("DeepSeek's config describes dense layers only as the first k "
                    "(first_k_dense_replace): the stacked order puts a dense layer after an MoE layer")
        return {"first_k_dense_replace": len(dense_new)}
    if arch.model_type in ("qwen3_moe", "qwen2_moe"):
        return {"mlp_only_layers": dense_new, "decoder_sparse_step": 1}
    return {}


def different_architectures(models: Mapping[str, tuple[Any, Any]], diags: Any) -> None:
    """E709 when checkpoints (name -> (ModelSource or None, span)) name different `architectures`
    in their config.json (`LlamaForCausalLM` with `MistralForCausalLM`): refused as mergekit
    refuses it without --allow-crimes; `option allow_crimes = true` is the opt-in."""
    from mergelang.diagnostics import error

    first: dict[tuple[str, ...], str] = {}
    for name, (m, span) in models.items():
        cfg = m.config() if m is not None else None
        arch = cfg.get("architectures") if isinstance(cfg, dict) else None
        if not (isinstance(arch, list) and arch and all(isinstance(a, str) for a in arch)):
            continue
        key = tuple(arch)
        if first and key not in first:
            other, theirs = next(iter(first.items()))[::-1]
            diags.add(error("E709", f"model `{name}` is a {', '.join(key)} but `{other}` is a "
                            f"{', '.join(theirs)} (their config.json name different architectures)",
                            span, "tensors of different architectures rarely line up; to merge them "
                            "anyway add `option allow_crimes = true` (mergekit's --allow-crimes)"))
        first.setdefault(key, name)
