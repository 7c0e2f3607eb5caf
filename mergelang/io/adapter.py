"""PEFT LoRA adapter folders written by `merge adapter` blocks: one `adapter_model.safetensors`
(no index) and `adapter_config.json` derived from the output tensors' names and shapes."""

from __future__ import annotations

from typing import Iterable

from mergelang.io.layout import OutputTensor, ShardLayout, single_file

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
