"""mergekit-moe configs (`base_model`, `experts` with `source_model` and prompts, `gate_mode`,
`experts_per_token`, `shared_experts`, `dtype`, `architecture`) -> a recipe declaring
`model moe = moe(...)` (sources/moe.py) and writing it.

mergekit picks the output architecture from the config (Mixtral without shared experts, Qwen MoE
with exactly one); `architecture: mixtral | qwen` chooses it explicitly. Not translated:
`noise_scale` (random noise, unseeded in mergekit), `uniform_random` and `hidden_avg` gates,
several shared experts, DeepSeek and Qwen3 MoE outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergelang.interop.mergekit_config import ConfigReader, Result, fmt
from mergelang.interop.mergekit_checks import finite
from mergelang.interop.mergekit_yaml import short

MOE_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts",
            "architecture"}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
GATES = {"hidden": "hidden", "hidden_last": "hidden", "cheap_embed": "cheap_embed", "random": "random"}


def is_moe_config(cfg: Any) -> bool:
    return isinstance(cfg, dict) and "experts" in cfg and "merge_method" not in cfg


def _strings(v: Any) -> list[str]:
    return [str(x) for x in v] if isinstance(v, list) else []


def _prompts_ok(r: ConfigReader, experts: list[dict]) -> bool:
    """mergekit-moe's own refusals (mergekit/moe/config.py `is_bad_config`) for prompt-based gates: an
    expert without positive prompts, or every expert with the same prompts (the gate could not
    tell them apart). Experts that are all one model: W120 (mergekit asks for a flag)."""
    for i, e in enumerate(experts):
        if not _strings(e.get("positive_prompts")):
            r.err("E705", f"experts[{i}] has no positive_prompts", "each expert needs example "
                  "prompts of what should be routed to it (or use gate_mode: random)")
            return False

    def prompts(e: dict) -> tuple:
        return tuple(_strings(e.get("positive_prompts"))), tuple(_strings(e.get("negative_prompts")))

    if all(prompts(e) == prompts(experts[0]) for e in experts[1:]):
        r.err("E710", "every expert has the same positive and negative prompts: the gate could not "
              "route between them (mergekit-moe refuses this config too)",
              "give each expert prompts that show what should be routed to it")
        return False
    refs = [str(e.get("source_model")) for e in experts]
    if len(experts) > 1 and len(set(refs)) == 1:
        r.warn("W120", f"every expert is the same model `{refs[0]}`: the MoE costs more and "
               "computes the same as that model until it is trained (mergekit-moe asks for "
               "--i-understand-this-is-not-useful-without-training)")
    return True


def translate_moe(cfg: dict[str, Any], config_path: Path | None, out_dir: Path | None) -> Result:
    r = ConfigReader(cfg, config_path, out_dir)
    for key in cfg:
        if key not in MOE_KEYS:
            r.warn("W101", f"`{key}` is not translated (unknown mergekit-moe key)")
    base = r.model(cfg.get("base_model"), "base_model", base=True)
    experts = cfg.get("experts")
    if not isinstance(experts, list) or not experts or not all(isinstance(e, dict) for e in experts):
        r.err("E702", "`experts` must be a non-empty list of {source_model: ..., positive_prompts: [...]}")
        return Result("", r.diags)
    shared = cfg.get("shared_experts") or []
    if not isinstance(shared, list) or len(shared) > 1:
        r.err("E704", "several shared experts: only one (a Qwen2-MoE output) is supported")
        return Result("", r.diags)
    arch = cfg.get("architecture")
    output = "qwen2_moe" if shared or (isinstance(arch, str) and arch.lower().startswith("qwen")) else "mixtral"
    if isinstance(arch, str) and arch.lower() not in ("mixtral", "qwen", "qwen2", "qwen2_moe"):
        r.err("E704", f"architecture {short(arch)}: mergelang writes Mixtral and Qwen2-MoE outputs")
        return Result("", r.diags)
    gate = cfg.get("gate_mode", "hidden")
    if not isinstance(gate, str) or gate not in GATES:
        r.err("E704", f"gate_mode {short(gate)} is not supported", "use hidden, cheap_embed or random")
        return Result("", r.diags)
    if int(float(cfg.get("experts_per_token", 2))) > len(experts):  # a whole number (checked)
        r.err("E705", f"experts_per_token is {cfg.get('experts_per_token', 2)} but there are "
              f"{len(experts)} experts", "mergekit-moe needs at least as many experts")
        return Result("", r.diags)
    if GATES[gate] != "random" and not _prompts_ok(r, experts):
        return Result("", r.diags)
    names, pos, neg, scales = [], [], [], []
    for i, e in enumerate([*experts, *shared]):
        for key in e:
            if key not in EXPERT_KEYS:
                r.warn("W101", f"experts[{i}].{key} is not translated (unknown key)")
        if e.get("noise_scale") is not None:
            r.warn("W102", f"experts[{i}].noise_scale has no effect in mergelang: mergekit adds "
                   "unseeded random noise, which cannot be reproduced")
        name = r.model(e.get("source_model"), f"experts[{i}].source_model")
        names.append(name)
        pos.append(_strings(e.get("positive_prompts")))
        neg.append(_strings(e.get("negative_prompts")))
        rs = e.get("residual_scale")
        scales.append(1.0 if rs is None else finite(rs))  # checked: a finite number
    if base is None or any(n is None for n in names) or any(d.is_error for d in r.diags):
        return Result("", r.diags)
    n = len(experts)
    args = [base, "[" + ", ".join(names[:n]) + "]", f"gate = {fmt(GATES[gate])}"]
    if GATES[gate] != "random":
        args.append("prompts = [" + ", ".join("[" + ", ".join(fmt(p) for p in ps) + "]" for ps in pos[:n]) + "]")
        if any(neg[:n]):
            args.append("negative_prompts = [" + ", ".join(
                "[" + ", ".join(fmt(p) for p in ps) + "]" for ps in neg[:n]) + "]")
    args.append(f"experts_per_token = {int(float(cfg.get('experts_per_token', 2)))}")  # checked
    if output != "mixtral":
        args.append(f"output = {fmt(output)}")
    if shared:
        args.append(f"shared = {names[n]}")
        if GATES[gate] != "random":
            args.append("shared_prompts = [" + ", ".join(fmt(p) for p in pos[n]) + "]")
    if any(s != 1.0 for s in scales[:n]):
        args.append("residual_scale = [" + ", ".join(fmt(s) for s in scales[:n]) + "]")
    lines = ["# translated from a mergekit-moe config by `mergelang import-mergekit`", *r.notes, ""]
    lines += r.model_lines
    if cfg.get("dtype"):
        lines.append(f"option dtype = {fmt(str(cfg['dtype']))}")
    lines.append(f"model moe = moe({', '.join(args)})")
    lines += ["", 'merge from moe { "*" => moe }']
    return Result("\n".join(lines) + "\n", r.diags)
