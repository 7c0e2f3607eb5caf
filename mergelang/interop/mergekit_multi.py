"""mergekit-multi files: several `---` separated configs, each with a `name` (an intermediate
merge) except at most one (the final merge), that use each other's names as models.

They become one recipe with one named block per config, computed in one graph: an intermediate
that another config uses is declared `model NAME = output("NAME")` (see docs/language.md,
"Outputs that other blocks use"). The unnamed config's block is named `final`. Every block is
written (`OUTDIR/NAME/`), as mergekit-multi writes its intermediates to `--intermediate-dir`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergelang.diagnostics import Diagnostic, error, warning
from mergelang.interop.mergekit_config import Result, fmt, to_ident
from mergelang.interop.mergekit_yaml import short
from mergelang.lang.loader import OUTPUT_NAME


def _refs(doc: dict[str, Any]) -> set[str]:
    """Every model reference of a config (models, slice sources, base_model)."""
    out: set[str] = set()

    def add(ref: Any) -> None:
        if isinstance(ref, dict):
            ref = ref.get("path", ref.get("model"))
        if isinstance(ref, str):
            out.add(ref)

    add(doc.get("base_model"))
    for m in doc.get("models") or []:
        add(m.get("model") if isinstance(m, dict) else m)
    for s in doc.get("slices") or []:
        for src in (s.get("sources") or []) if isinstance(s, dict) else []:
            add(src.get("model") if isinstance(src, dict) else None)
    return out


def _order(names: list[str], deps: dict[str, set[str]]) -> list[str] | None:
    """Dependencies first (mergekit-multi's order); None on a cycle."""
    done: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str) -> bool:
        if state.get(n) == 2:
            return True
        if state.get(n) == 1:
            return False
        state[n] = 1
        if not all(visit(d) for d in sorted(deps[n])):
            return False
        state[n] = 2
        done.append(n)
        return True

    return done if all(visit(n) for n in names) else None


def _output_names(docs: list[dict]) -> tuple[list[str], int, Diagnostic | None]:
    """Each document's output name (`final` for the unnamed one), how many are unnamed, and
    the error (E702) that stops the translation, if any."""
    names: list[str] = []
    unnamed = 0
    for k, d in enumerate(docs):
        n = d.get("name")
        if n is None:
            unnamed += 1
            n = "final"
        if not isinstance(n, str) or not OUTPUT_NAME.fullmatch(n) or n in (".", ".."):
            return names, unnamed, error("E702", f"document {k + 1}: name {short(n)} cannot be an "
                                         "output folder name (letters, digits, `_`, `-`, `.`)")
        names.append(n)
    if unnamed > 1:
        return names, unnamed, error("E702", f"{unnamed} documents have no `name`: mergekit-multi "
                                     "allows one unnamed (final) merge")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        return names, unnamed, error("E702", f"the name {short(dupes[0])} is used by two documents"
                                     + (" (the unnamed merge is named `final`)" if unnamed else ""))
    return names, unnamed, None


def translate_multi(docs: list[Any], config_path: Path | None, out_dir: Path | None,
                    layer_prefix: str, Translator: Any) -> Result:
    """`Translator`: mergekit_import.Translator (passed in: that module imports this one)."""
    if not docs or not all(isinstance(d, dict) for d in docs):
        return Result("", [error("E702", "every document of a mergekit-multi file must be a "
                                 "config (a YAML mapping)")])
    names, unnamed, problem = _output_names(docs)
    if problem is not None:
        return Result("", [problem])
    by_name = dict(zip(names, docs))
    deps = {n: _refs(d) & set(names) for n, d in by_name.items()}
    order = _order(names, deps)
    if order is None:
        return Result("", [error("E702", "the documents use each other's outputs in a cycle")])
    used = sorted(set().union(*deps.values()), key=names.index)

    diags: list[Diagnostic] = []
    shared: Any = None
    blocks: list[list[str]] = []
    dtypes: dict[str, Any] = {}
    options: dict[str, list[str]] = {}
    crimes: list[str] = []  # `option allow_crimes = true` (import-mergekit --allow-crimes)
    for n in order:
        t = Translator(by_name[n], config_path, out_dir, layer_prefix)
        t.output_name = n
        if shared is None:
            for ref in used:  # intermediates other configs use: models bound to their outputs
                ident = to_ident(ref)
                while ident in t.models.values() or ident == "base":
                    ident += "_out"
                t.models[ref] = ident
                t.model_lines.append(f"model {ident} = output({fmt(ref)})")
            shared = t
        else:  # one namespace for models, hoisted gradients and notes
            t.models, t.model_lines = shared.models, shared.model_lines
            t.hoisted, t.param_lines = shared.hoisted, shared.param_lines
            t.notes, t.local_paths = shared.notes, shared.local_paths
        res = t.translate()
        diags += [d for d in res.diagnostics if d not in diags]
        if res.errors:
            return Result("", diags)
        dtypes[n] = by_name[n].get("out_dtype") or by_name[n].get("dtype")
        crimes = crimes or [line for line in t.option_lines if "allow_crimes" in line]
        options[n] = [line for line in t.option_lines if "allow_crimes" not in line]
        blocks.append(t.block_lines)
    assert shared is not None
    final = names[-1] if unnamed == 0 else names[[d.get("name") for d in docs].index(None)]
    dtype = dtypes.get(final) or next((v for v in dtypes.values() if v), None)
    if len({str(v) for v in dtypes.values() if v}) > 1:
        diags.append(warning("W101", f"the documents ask for different dtypes "
                             f"({', '.join(sorted({str(v) for v in dtypes.values() if v}))}); "
                             f"every output is written as {dtype} (the recipe has one dtype)"))
    src = f" {config_path.name}" if config_path else ""
    out = [f"# Translated from the mergekit-multi config{src} by `mergelang import-mergekit`:",
           "# one named block per document, computed in one graph; intermediates that other",
           "# documents use are models bound to their block's output (`output(...)`).", ""]
    out += shared.model_lines
    if shared.param_lines:
        out += [""] + shared.param_lines
    if dtype:
        out += ["", f"option dtype = {fmt(str(dtype))}"]
    out += options.get(final, []) + crimes
    for n, lines in options.items():
        if lines and n != final:
            diags.append(warning("W101", f"the tokenizer settings of `{n}` are not translated: "
                                 "the recipe's tokenizer options follow the final merge's"))
    if shared.notes:
        out += [""] + sorted(set(shared.notes), key=shared.notes.index)
    for b in blocks:
        out += [""] + b
    return Result("\n".join(out) + "\n", diags)
