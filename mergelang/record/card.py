"""The model card (``README.md``) every output folder gets, as mergekit writes one: YAML front
matter (``base_model``: the inputs that are Hugging Face models, ``tags: [merge, mergelang]``,
``library_name``) and a body naming the models, the methods, the params (value and origin), the
recipe and the command. `--no-model-card` (``run(..., model_card=False)``) leaves it out.

Everything copied from the inputs (paths, ids, recipe text, the command) is escaped: the front
matter is written by ``yaml.safe_dump``, inline values are JSON strings inside code spans longer
than any run of backticks they hold, and blocks sit in fences longer than any fence inside them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from mergelang.io.inputs import hf_repo_id, is_hf_id

CARD_NAME = "README.md"


def code(value: Any) -> str:
    """`value` as an inline code span that nothing inside can end (a JSON string for text)."""
    text = value if isinstance(value, str) and _plain(value) else json.dumps(value, ensure_ascii=False)
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    ticks = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _plain(s: str) -> bool:
    return s.isprintable() and s == s.strip() and bool(s)


def fenced(text: str, lang: str = "") -> str:
    """`text` in a fenced code block no line of it can close."""
    ticks = "`" * max(3, max((len(m) for m in re.findall(r"`{3,}", text)), default=0) + 1)
    body = text if text.endswith("\n") else text + "\n"
    return f"{ticks}{lang}\n{body}{ticks}\n"


def hub_id(spec: str | None, folder: Any) -> str | None:
    """The Hugging Face id of a model given as ``hf:ORG/NAME[@REV]`` or opened from a cache
    snapshot folder; None for a local model."""
    if spec and is_hf_id(spec):
        return spec[3:].partition("@")[0] or None
    if folder is not None:
        return hf_repo_id(Path(folder))
    return None


def methods_used(c: Any) -> list[str]:
    """The functions the rules call (stdlib methods, user functions, intrinsics), in order."""
    import dataclasses

    from mergelang.lang import ast

    names: dict[str, None] = {}
    for block in c.unit.blocks:
        stack: list[Any] = [r.expr for r in reversed(block.rules)]
        while stack:
            x = stack.pop()
            if isinstance(x, ast.Call):
                names[x.func] = None
            if dataclasses.is_dataclass(x) and not isinstance(x, type):
                stack.extend(reversed([getattr(x, f.name) for f in dataclasses.fields(x)]))
            elif isinstance(x, (tuple, list)):
                stack.extend(reversed(x))
    return list(names)


def model_card(c: Any, prov: Mapping[str, Any], *, adapter: bool = False, title: str = "",
               reference: str | None = None, recipe_text: str | None = None) -> str:
    """The card of an output merged by compilation `c` (`prov`: the manifest's provenance,
    manifest.provenance; `reference`: the model the output is merged from)."""
    reference = reference or c.reference
    models = []
    for decl in c.unit.models:
        src = c.models.get(decl.name)
        spec = c.overridden.get(decl.name)
        if not isinstance(spec, str):
            v = decl.value
            spec = getattr(v, "value", None) if isinstance(getattr(v, "value", None), str) else None
        models.append((decl.name, hub_id(spec, getattr(src, "folder", None)),
                       str(getattr(src, "folder", None) or spec or "(in memory)")))
    hub = [h for n, h, _ in sorted(models, key=lambda m: m[0] != reference) if h]
    meta: dict[str, Any] = {}
    if hub:
        meta["base_model"] = list(dict.fromkeys(hub))
    meta["tags"] = ["merge", "mergelang"]
    meta["library_name"] = "peft" if adapter else "transformers"
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    what = "a LoRA adapter merged" if adapter else "a merge of pre-trained models"
    out = [f"---\n{front}---\n", f"# {_title(title)}\n\n",
           f"This is {what} made with [mergelang](https://github.com/mergelang/mergelang) "
           f"(version {code(prov.get('mergelang', '?'))}).\n\n",
           "## Merge details\n\n### Methods\n\n"]
    methods = methods_used(c)
    out.append(("The rules call " + ", ".join(code(m) for m in methods) + ".\n\n") if methods
               else "The rules copy tensors (no method is called).\n\n")
    out.append("### Models\n\n")
    for name, hid, where in models:
        role = " (merged from: names, shapes and config)" if name == reference else ""
        shown = f"[{code(hid)}](https://huggingface.co/{_url(hid)})" if hid else code(where)
        out.append(f"- {code(name)}{role}: {shown}\n")
    out.append("\n### Parameters\n\n")
    origins = prov.get("param_origins", {})
    params = prov.get("params", {})
    if not params:
        out.append("The recipe declares no params.\n")
    for name, value in params.items():
        out.append(f"- {code(name)} = {code(value)} ({_text(origins.get(name, 'default'))})\n")
    out.append("\n### Recipe\n\nThe recipe (its copy beside this card, "
               "`mergelang_recipe.mrg`, reruns from anywhere):\n\n")
    out.append(fenced(recipe_text if recipe_text is not None else c.source.text))
    out.append("\n### Command\n\n")
    cmd = prov.get("command")
    out.append(fenced(cmd, "sh") if cmd else "Made from Python (`mergelang.compile(...).run(...)`).\n")
    out.append(f"\nDevice: {code(prov.get('device', '?'))}; torch {code(prov.get('torch', '?'))}. "
               "`mergelang verify` checks this folder against its manifest "
               "(`mergelang_manifest.json`).\n")
    return "".join(out)


def _title(s: str) -> str:
    """A heading's text: one line, markdown's special characters escaped."""
    s = " ".join(s.split()) or "merged model"
    return re.sub(r"([\\`*_\[\]<>|&~])", r"\\\1", s)


def _text(s: Any) -> str:
    """Free text from an input (e.g. a study name) for a list item."""
    return _title(str(s))


def _url(hid: str) -> str:
    from urllib.parse import quote

    return quote(hid, safe="/")


def tool_card(title: str, kind: str, command: str | None, inputs: Iterable[tuple[str, str | None, str]],
              details: Iterable[str], adapter: bool) -> str:
    """The card of a folder written by a tool (`extract-lora`): `inputs` are (role, hub id or
    None, path); `details`: lines of markdown the caller escaped."""
    inputs = list(inputs)
    meta: dict[str, Any] = {}
    hub = [h for _, h, _ in inputs if h]
    if hub:
        meta["base_model"] = list(dict.fromkeys(hub))
    meta["tags"] = ["merge", "mergelang"]
    meta["library_name"] = "peft" if adapter else "transformers"
    out = [f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---\n",
           f"# {_title(title)}\n\n", f"This is {kind} made with "
           "[mergelang](https://github.com/mergelang/mergelang).\n\n## Details\n\n"]
    for role, hid, where in inputs:
        out.append(f"- {_text(role)}: {code(hid) if hid else code(where)}\n")
    out.extend(f"- {d}\n" for d in details)
    out.append("\n### Command\n\n")
    out.append(fenced(command, "sh") if command else "Made from Python.\n")
    return "".join(out)


def card_maker(c: Any, provenance: dict[str, Any]) -> Any:
    """io/package.py's CardMaker for compilation `c`: (adapter, title, reference, recipe text)
    -> {CARD_NAME: the model card}."""
    def make(adapter: bool, title: str, reference: str, text: str) -> dict[str, str]:
        return {CARD_NAME: model_card(c, provenance, adapter=adapter, title=title,
                                      reference=reference, recipe_text=text)}
    return make
