"""`mergelang extract-lora BASE FINETUNED -o OUT --rank R`: a PEFT LoRA adapter that
approximates FINETUNED - BASE, as mergekit-extract-lora makes it.

Which modules (mergekit's rules, decided from tensor names and shapes, without instantiating
the model): every 2-D `.weight` is a linear layer, decomposed to rank min(R, rows, cols) by a
float32 SVD of the delta (best rank-R approximation): lora_A = sqrt(S) Vh, lora_B = U sqrt(S)
(`--no-distribute-scale`: lora_A = S Vh, lora_B = U), `r` = `lora_alpha` = the largest rank
used, smaller ranks in `rank_pattern`/`alpha_pattern`, so scale * B @ A is the approximation
itself. A bias becomes `lora_B.bias` (its delta). Embeddings (`embed_tokens`, `wte`, ...) and
output embeddings (`lm_head`, `embed_out`) go to `modules_to_save` at full rank unless
`--embed-lora` (then embeddings are decomposed transposed, as lora_embedding_A/B; not when the
vocabularies differ); other weights (norms: 1-D; integer / bool 2-D tables) cannot be decomposed
and are saved at full rank (`--skip-undecomposable` drops them). NaN / inf in a delta or a saved
tensor is E331 (no adapter); a base without the fine-tune's bias, or with another shape, E302; a
bad --include / --exclude regex E109. `--include`/`--exclude` (regular expressions, searched in
the module name) choose the decomposed modules, as mergekit's.

The output folder is written like every mergelang output: planned up front, in a work folder,
verified, renamed into place (refused where it would touch an input).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from mergelang.diagnostics import MergelangError, error
from mergelang.errors import CodedError, to_diagnostic
from mergelang.io.checkpoint import ModelSource

EMBED = re.compile(r"(embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|"
                   r"embed_in|embed_positions|tok_embeddings|shared)$")
OUTPUT_EMBED = re.compile(r"(lm_head|embed_out)$")


@dataclass
class LoraModule:
    module: str  # e.g. model.layers.0.self_attn.q_proj
    rank: int
    transpose: bool  # an embedding: decomposed transposed (lora_embedding_A/B)
    bias: bool


@dataclass
class ExtractionPlan:
    lora: list[LoraModule] = field(default_factory=list)
    full: list[str] = field(default_factory=list)  # tensors saved at full rank
    modules_to_save: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _searcher(patterns: Iterable[str]):
    """`name -> bool`: does any of the regular expressions occur in the name (compiled once)."""
    from mergelang.lang.ast import PatternError, compile_pattern

    try:
        compiled = [compile_pattern(".*(?:" + p + ").*", "regex") for p in patterns]
    except PatternError as exc:
        bad = next(p for p in patterns if _fails(p))
        raise MergelangError(error("E109", f"--include / --exclude {bad!r}: {exc}", None,
                                   "a regular expression searched in the module name (RE2 "
                                   "syntax), e.g. 'self_attn\\.(q|k)_proj'")) from None
    return lambda name: any(c.fullmatch(name) for c in compiled)


def _fails(p: str) -> bool:
    from mergelang.lang.ast import PatternError, compile_pattern

    try:
        compile_pattern(".*(?:" + p + ").*", "regex")
        return False
    except PatternError:
        return True


def _floating(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat")) and not dtype.startswith("float8")


def _finite(t, what: str) -> None:
    """E331 unless every value of float tensor `t` is finite (an SVD of NaN/inf fails or
    gives a NaN adapter)."""
    import torch

    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise MergelangError(error("E331", f"{what} holds NaN or infinite values", None,
                                   "the fine-tuned (or base) checkpoint is broken there: an "
                                   "adapter extracted from it would be too"))


def plan_extraction(base: ModelSource, ft: ModelSource, rank: int, include: tuple[str, ...] = (),
                    exclude: tuple[str, ...] = (), embed_lora: bool = False,
                    save_modules: tuple[str, ...] = (), skip_undecomposable: bool = False
                    ) -> ExtractionPlan:
    plan = ExtractionPlan(modules_to_save=list(save_modules))
    included, excluded = _searcher(include), _searcher(exclude)
    tensors, btensors = ft.tensors(), base.tensors()
    rows = {n: i.shape[0] for n, i in tensors.items() if EMBED.search(n.removesuffix(".weight"))
            and len(i.shape) == 2}
    brows = {n: i.shape[0] for n, i in btensors.items() if n in rows}
    if embed_lora and rows != brows:
        plan.notes.append(f"the vocabularies differ ({rows} against {brows}): embeddings go to "
                          "modules_to_save (--embed-lora is ignored), as mergekit")
        embed_lora = False
    warned: set[str] = set()
    for name, info in tensors.items():
        if not name.endswith(".weight"):
            continue
        module = name.removesuffix(".weight")
        key = module.rsplit(".", 1)[-1]
        bias = module + ".bias" in tensors
        is_embed = bool(EMBED.search(module)) and len(info.shape) == 2
        is_out = bool(OUTPUT_EMBED.search(module)) and len(info.shape) == 2
        if not embed_lora and (is_embed or is_out) and not excluded(module):
            if key not in plan.modules_to_save:
                plan.modules_to_save.append(key)
        if module in plan.modules_to_save or key in plan.modules_to_save:
            plan.full += [name] + ([module + ".bias"] if bias else [])
        elif (not include or included(module)) and not excluded(module):
            if len(info.shape) == 2 and _floating(info.dtype):
                if name not in btensors or btensors[name].shape != info.shape:
                    raise MergelangError(error(
                        "E302", f"tensor `{name}` is missing in the base model or has another "
                        f"shape there ({list(btensors[name].shape) if name in btensors else 'missing'}"
                        f" against {list(info.shape)})", None,
                        "exclude the module (--exclude) or save it at full rank (--save-module)"))
                bn = module + ".bias"
                if bias and (bn not in btensors or btensors[bn].shape != tensors[bn].shape):
                    raise MergelangError(error(
                        "E302", f"bias `{bn}` is missing in the base model or has another shape "
                        f"there ({list(btensors[bn].shape) if bn in btensors else 'missing'} against "
                        f"{list(tensors[bn].shape)})", None,
                        "exclude the module (--exclude) or save it at full rank (--save-module)"))
                plan.lora.append(LoraModule(module, min(rank, *info.shape), is_embed, bias))
            elif not skip_undecomposable:
                if key not in plan.modules_to_save:
                    plan.modules_to_save.append(key)
                plan.full += [name] + ([module + ".bias"] if bias else [])
                if key not in warned:
                    what = (f"a {len(info.shape)}-D weight" if len(info.shape) != 2
                            else f"a {info.dtype} weight (not floating point)")
                    plan.notes.append(f"{key}: {what} cannot be decomposed; "
                                      "saved at full rank (modules_to_save)")
                    warned.add(key)
    if not plan.lora:
        raise MergelangError(error("E203", "no module to decompose: no 2-D `.weight` tensor is "
                                   "selected (check --include / --exclude)", None))
    return plan


def lora_names(m: LoraModule) -> tuple[str, str]:
    """The adapter's names of module `m`'s A and B factors (PEFT's)."""
    kind, suf = ("lora_embedding", "") if m.transpose else ("lora", ".weight")
    return (f"base_model.model.{m.module}.{kind}_A{suf}", f"base_model.model.{m.module}.{kind}_B{suf}")


def decompose(delta, rank: int, distribute: bool):
    """(A, B) with B @ A the best rank-`rank` approximation of `delta` (float32 SVD)."""
    import torch

    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    r = min(rank, s.shape[0])
    if distribute:
        root = torch.sqrt(s[:r])
        return root.unsqueeze(1) * vh[:r], u[:, :r] * root
    return s[:r].unsqueeze(1) * vh[:r], u[:, :r].clone()


def extract_lora(base: str | Path, finetuned: str | Path, out: str | Path, rank: int, *,
                 include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                 embed_lora: bool = False, save_modules: tuple[str, ...] = (),
                 skip_undecomposable: bool = False, distribute_scale: bool = True,
                 device: str = "auto", force: bool = False,
                 log: Callable[[str], None] = lambda m: None) -> Path:
    import torch

    from mergelang.io.adapter import adapter_config, adapter_layout
    from mergelang.io.layout import OutputTensor
    from mergelang.io.locate import model_error, open_model
    from mergelang.io.writer import CheckpointWriter
    from mergelang.runtime.executor import resolve_device

    if rank < 1:
        raise MergelangError(error("E203", f"--rank must be at least 1, got {rank}", None))
    srcs = []
    for label, path in (("base", base), ("finetuned", finetuned)):
        try:
            srcs.append(open_model(label, str(path)))
        except Exception as exc:  # noqa: BLE001 - CheckpointError, OSError: one diagnostic
            for s in srcs:
                s.close()
            raise MergelangError(model_error(label, str(path), exc, None).diag) from None
    b, f = srcs
    try:
        plan = plan_extraction(b, f, rank, include, exclude, embed_lora, save_modules,
                               skip_undecomposable)
        for note in plan.notes:
            log(f"note: {note}")
        dev = resolve_device(device)
        tinfo = f.tensors()
        outs: list[OutputTensor] = []
        for m in plan.lora:
            w = tinfo[m.module + ".weight"]
            rows, cols = (w.shape[1], w.shape[0]) if m.transpose else w.shape
            a_name, b_name = lora_names(m)
            outs += [OutputTensor(a_name, (m.rank, cols), w.dtype), OutputTensor(b_name, (rows, m.rank), w.dtype)]
            if m.bias:
                outs.append(OutputTensor(f"base_model.model.{m.module}.lora_B.bias",
                                         tinfo[m.module + ".bias"].shape, tinfo[m.module + ".bias"].dtype))
        outs += [OutputTensor(f"base_model.model.{n}", tinfo[n].shape, tinfo[n].dtype) for n in plan.full]
        layout = adapter_layout(outs)
        inputs = [p for s in srcs for p in s.input_paths()]
        with CheckpointWriter(out, layout, force=force, protected=inputs) as writer:
            for m in plan.lora:
                w = m.module + ".weight"
                delta = (f.load_as(w, torch.float32).to(dev) - b.load_as(w, torch.float32).to(dev))
                _finite(delta, f"the delta of `{w}` (fine-tuned - base)")
                try:
                    factors = decompose(delta.T if m.transpose else delta, m.rank, distribute_scale)
                except torch.linalg.LinAlgError as exc:
                    raise MergelangError(error("E331", f"the SVD of `{w}`'s delta failed: {exc}",
                                               None)) from None
                for t in factors:
                    _finite(t, f"the factors of `{w}`")
                for name, t in zip(lora_names(m), factors):
                    writer.write(name, t.to(layout.tensors[name].torch_dtype).cpu().contiguous())
                if m.bias:
                    bn, name = m.module + ".bias", f"base_model.model.{m.module}.lora_B.bias"
                    d = f.load_as(bn, torch.float32) - b.load_as(bn, torch.float32)
                    _finite(d, f"the delta of `{bn}`")
                    writer.write(name, d.to(layout.tensors[name].torch_dtype))
            for n in plan.full:
                t = f.load_as(n).contiguous()
                _finite(t, f"the fine-tuned model's `{n}`")
                writer.write(f"base_model.model.{n}", t)
            cfg = adapter_config(outs, str(base))
            return writer.finish(extra_files={"adapter_config.json": json.dumps(cfg, indent=4) + "\n",
                                              "README.md": _card(base, finetuned, b, f, cfg, plan)},
                                 manifest={"provenance": _provenance(base, finetuned, b, f, dev)})
    except CodedError as exc:  # the writer's: output refused (E403/E404), disk errors
        raise MergelangError(to_diagnostic(exc)) from None
    finally:
        for s in srcs:
            s.close()


def _card(base: Any, finetuned: Any, b: Any, f: Any, cfg: dict, plan: Any) -> str:
    """The adapter's model card (record/card.py): front matter for PEFT, the inputs, the rank."""
    from mergelang.record import command_text
    from mergelang.record.card import code, hub_id, tool_card

    inputs = [("base", hub_id(str(base), b.folder), str(b.folder or base)),
              ("fine-tuned", hub_id(str(finetuned), f.folder), str(f.folder or finetuned))]
    saved = ", ".join(code(m) for m in plan.modules_to_save) or "none"
    details = [f"rank: {code(cfg['r'])} ({len(plan.lora)} modules decomposed)",
               f"modules saved at full rank: {saved}"]
    return tool_card("LoRA adapter extracted by mergelang", "a LoRA adapter extracted from the "
                     "difference of two models", command_text(), inputs, details, adapter=True)


def _provenance(base: Any, finetuned: Any, b: Any, f: Any, device: Any) -> dict:
    """The manifest's provenance: versions, the command, both inputs with their digests."""
    import platform

    from mergelang._version import __version__
    from mergelang.record import command_text
    import torch

    from mergelang.record.manifest import PROVENANCE_VERSION, sources_record

    return {"version": PROVENANCE_VERSION, "mergelang": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device), "command": command_text(),
            "tool": "extract-lora", "inputs": sources_record({"base": b, "finetuned": f},
                                                             {"base": str(base), "finetuned": str(finetuned)})}
