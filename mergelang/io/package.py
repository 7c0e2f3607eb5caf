"""What an output folder holds besides the merged tensors, for local and Ray runs alike.

One `Package` describes a run's outputs (an unnamed one, or one folder per named output, each
merged from a reference model, some of them LoRA adapters) and what the driver hands over: the
recipe copy, the used params, the provenance and a model-card maker (record/, above this stage).
From it come:

* `open_output`: the writer (CheckpointWriter, or MultiWriter for named outputs), the arguments
  of its `complete` per folder, and every output tensor's bytes;
* per folder: config.json (copied, or patched: the source's `config_patch`, the dtype, and the
  FP8 `quantization_config` dropped when block-scaled FP8 is written in another dtype), the
  other small files, the tokenizer files (`tokenizer_files` of the source, tokenizer_source)
  or adapter_config.json, the recipe copy, the manifest's params and provenance, the card;
* `config_warnings`: W004 for an output whose reference has no config.json;
* `config_dtype`: the dtype config.json names.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from mergelang.diagnostics import Diagnostic, MergelangError, error, warning
from mergelang.errors import CheckpointError
from mergelang.io.checkpoint import ModelSource
from mergelang.io.inputs import RECIPE_FILENAME

if TYPE_CHECKING:
    from mergelang.io.layout import OutputTensor

#: the files of a tokenizer (an output's come from one tokenizer: tokenizer_source)
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                             "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                             "vocab.txt", "chat_template.jinja", "chat_template.json"})

#: card(adapter, title, reference, recipe_text) -> {file name: text} (record/card.py's card)
CardMaker = Callable[[bool, str, str, str], dict[str, str]]


@dataclass
class Package:
    """A run's outputs and what the driver hands over for their folders."""

    outputs: list[OutputTensor]
    models: Mapping[str, ModelSource | None]
    copies: Mapping[str, dict[str, Path] | None]  # model -> its small files (config.json, ...)
    reference: str                                # the unnamed output's `merge from` model
    references: dict[str, str]                    # named output -> its `merge from` model
    adapters: set[str]                            # the outputs that are LoRA adapters ("": unnamed)
    recipe_text: str                              # the recipe copy (relative paths made absolute)
    params: dict[str, Any]                        # every param's value, for the manifest
    dtype: str | None = None                      # the recipe's output dtype (option / --dtype)
    copy_files: bool = True
    shard_size: int = 5 << 30
    spans: dict[str, Any] = field(default_factory=dict)  # model -> its declaration (W004)
    provenance: dict[str, Any] | None = None      # the manifest's (record/manifest.py)
    labelled_recipe: str | None = None            # the recipe copy naming where params came from
    card: CardMaker | None = None
    title: str = ""                               # the card's title for an unnamed output

    def split(self) -> dict[str, dict[str, OutputTensor]]:
        """Each named output's tensors, named within its folder."""
        out: dict[str, dict[str, OutputTensor]] = {n: {} for n in self.references}
        for t in self.outputs:
            name, _, tensor = t.name.partition("/")
            out[name][tensor] = t.renamed(tensor)
        return out


def config_dtype(outputs: Iterable[OutputTensor], dtype: str | None) -> str:
    """config.json's dtype: the recipe's `dtype`, else the most common floating output dtype."""
    if dtype:
        return dtype
    sizes: Counter[str] = Counter()
    for t in outputs:
        if t.dtype in ("float32", "float16", "bfloat16", "float64") and \
                not t.name.endswith("_scale_inv"):  # FP8 scales: not the model's dtype
            sizes[t.dtype] += t.nbytes
    return sizes.most_common(1)[0][0] if sizes else "float32"


def open_output(pkg: Package, out_dir: str | Path, force: bool, fingerprint: dict[str, str],
                resume: bool, fsync: bool = True, protected: Iterable[Path] = ()
                ) -> tuple[Any, Any, dict[str, int]]:
    """The writer (one checkpoint, or one per named output), the arguments of its `complete`,
    and the byte size of every output tensor by its name in the plan."""
    from mergelang.io.adapter import adapter_layout
    from mergelang.io.multiwriter import MultiWriter
    from mergelang.io.writer import CheckpointWriter, plan_shards

    def layout(tensors: list[OutputTensor], adapter: bool) -> Any:
        return adapter_layout(tensors) if adapter else plan_shards(tensors, pkg.shard_size)

    if not pkg.references:
        lay = layout(pkg.outputs, "" in pkg.adapters)
        writer = CheckpointWriter(out_dir, lay, force=force, fingerprint=fingerprint, resume=resume,
                                  fsync=fsync, protected=protected)
        files = folder_files(pkg, "", pkg.reference, pkg.outputs)
        return writer, files, {t: x.nbytes for t, x in lay.tensors.items()}
    per_output = pkg.split()
    layouts = {n: layout(list(ts.values()), n in pkg.adapters) for n, ts in per_output.items()}
    files = {n: folder_files(pkg, n, ref, list(per_output[n].values()))
             for n, ref in pkg.references.items()}
    multi = MultiWriter(out_dir, layouts, force=force, fingerprint=fingerprint, resume=resume,
                        fsync=fsync, protected=protected)
    return multi, files, {f"{n}/{t}": x.nbytes for n, lay in layouts.items()
                          for t, x in lay.tensors.items()}


def folder_files(pkg: Package, name: str, reference: str, tensors: list[OutputTensor]
                 ) -> dict[str, Any]:
    """The writer's `complete` arguments for output `name` ("" unnamed) merged from `reference`,
    with the provenance, the labelled recipe copy and the card when the driver gave them."""
    adapter = name in pkg.adapters
    files = adapter_files(pkg, reference, tensors) if adapter else model_files(pkg, reference)
    prov = pkg.provenance
    if prov is None:
        return files
    files["manifest"] = {**files.get("manifest", {}), "provenance": prov}
    if pkg.labelled_recipe is not None:
        files["recipe_text"] = pkg.labelled_recipe
    if pkg.card is not None:
        files["extra_files"] = {**(files.get("extra_files") or {}), **pkg.card(
            adapter, name or pkg.title, reference, files["recipe_text"])}
    return files


def adapter_files(pkg: Package, reference: str, tensors: list[OutputTensor]) -> dict[str, Any]:
    """For an adapter: adapter_config.json (no config.json or tokenizer: the adapter applies to
    `reference`), the recipe, the manifest."""
    from mergelang.io.adapter import adapter_config

    ref = pkg.models[reference]
    base = str(ref.folder) if ref is not None and ref.folder is not None else reference
    cfg = adapter_config(tensors, base)
    return dict(copies={}, dtype=None, recipe_text=pkg.recipe_text, recipe_filename=RECIPE_FILENAME,
                extra_files={"adapter_config.json": json.dumps(cfg, indent=4) + "\n"},
                manifest={"params": pkg.params})


def model_files(pkg: Package, reference: str) -> dict[str, Any]:
    """For an output merged from model `reference`: its config.json and other small files, the
    tokenizer's files, the dtype, the recipe."""
    ref = pkg.models[reference]
    copies = pkg.copies.get(reference) if pkg.copy_files else None
    extra = config_override(pkg, ref, copies)
    tok = ref.tokenizer_files() if ref is not None else None
    if tok is not None and copies is not None:  # tokenizer_source: the chosen tokenizer's files
        copies = {k: v for k, v in copies.items() if k not in TOKENIZER_FILES}
        extra = {**(extra or {}), **tok}  # type: ignore[dict-item]
    return dict(copies=copies or {}, dtype=config_dtype(pkg.outputs, pkg.dtype),
                recipe_text=pkg.recipe_text, recipe_filename=RECIPE_FILENAME, extra_files=extra,
                manifest={"params": pkg.params})


def config_override(pkg: Package, ref: ModelSource | None, copies: dict[str, Path] | None
                    ) -> dict[str, str] | None:
    """config.json for a reference model that changes it (stacked layers: the layer count), or
    block-scaled FP8 written in another dtype (--dtype: not quantized any more)."""
    patch = ref.config_patch() if ref is not None else None
    drop = pkg.dtype is not None and ref is not None and ref.block_scaled
    if not copies or (patch is None and not drop) or "config.json" not in copies:
        return None
    from mergelang.io.inputs import check_json_object

    try:
        cfg = check_json_object(copies["config.json"])
    except CheckpointError as e:
        raise MergelangError(error(e.code, str(e), None, e.help)) from None
    if patch is not None:
        cfg.update(patch)
    if drop:
        cfg.pop("quantization_config", None)
    dtype = config_dtype(pkg.outputs, pkg.dtype)
    cfg["torch_dtype"] = dtype
    if "dtype" in cfg:
        cfg["dtype"] = dtype
    return {"config.json": json.dumps(cfg, indent=2) + "\n"}


def config_warnings(pkg: Package) -> list[Diagnostic]:
    """W004 for each output whose reference model has no config.json to copy (transformers
    cannot load such a folder)."""
    out = []
    refs = [r for n, r in pkg.references.items() if n not in pkg.adapters] if pkg.references \
        else ([] if "" in pkg.adapters else [pkg.reference])
    for ref in dict.fromkeys(refs):
        copies = pkg.copies.get(ref)
        if copies is not None and "config.json" not in copies:
            out.append(warning("W004", f"the output's reference model `{ref}` has no config.json, "
                               "so the output has none", pkg.spans.get(ref),
                               "transformers cannot load a folder without config.json: merge "
                               "from a model folder that has one, or add it to the output"))
    return out
