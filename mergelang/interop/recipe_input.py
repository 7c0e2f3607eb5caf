"""What `ml.compile` and the CLI accept as a recipe: a `.mrg` path, recipe text, or a mergekit
config (`.yml` / `.yaml`) imported on the fly, with the import's warnings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from mergelang.diagnostics import Diagnostic, MergelangError, SourceFile, error
from mergelang.lang.loader import read_recipe_file


def recipe_input(recipe: str | Path) -> tuple[SourceFile, Path, list[Diagnostic]]:
    """The recipe's source, the folder its relative paths resolve against, and the warnings of
    a mergekit config's import (none for a recipe)."""
    if isinstance(recipe, (str, Path)) and "\n" not in str(recipe) and \
            str(recipe).lower().endswith((".yml", ".yaml")):
        return _imported(Path(recipe))
    return (*_recipe_source(recipe), [])


def _recipe_source(recipe: str | Path) -> tuple[SourceFile, Path]:
    if isinstance(recipe, Path) or (isinstance(recipe, str) and "\n" not in recipe
                                    and (recipe.endswith(".mrg") or Path(recipe).is_file())):
        path = Path(recipe)
        try:
            if "\0" in str(recipe):
                raise ValueError("the path contains a NUL character")
            return read_recipe_file(path), path.resolve().parent
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise MergelangError(error("E002", f"cannot read recipe {path}: {reason}")) from None
    return SourceFile("<recipe>", str(recipe)), Path.cwd()


def _imported(path: Path) -> tuple[SourceFile, Path, list[Diagnostic]]:
    """The recipe `import-mergekit` writes for mergekit config `path` (model paths relative to
    the config's folder, as mergekit reads them) and the import's warnings; its errors raise."""
    from mergelang.interop.mergekit_import import translate
    from mergelang.interop.mergekit_yaml import load_yaml, read_config_text

    folder = path.resolve().parent if path.exists() else Path.cwd()
    result = translate(load_yaml(read_config_text(path), str(path)), path, folder)
    if result.errors:
        raise MergelangError(result.diagnostics)
    return (SourceFile(f"{path} (imported)", result.text), folder,
            [d for d in result.diagnostics if not d.is_error])


def merge_source(expr: str, outputs: Iterable[str] | None, values: Mapping[str, Any]) -> SourceFile:
    """`ml.merge`'s recipe: every state dict (a Mapping) in `values` a model held in memory, the
    other values params, and one rule `"*" => expr` merged from `base` (else the first model),
    into the named `outputs` when given."""
    models = [k for k, v in values.items() if isinstance(v, Mapping)]
    if not models:
        raise TypeError("merge() needs at least one state dict keyword argument")
    ref = "base" if "base" in models else models[0]
    lines = [f'model {name} = "<memory>"' for name in models]
    lines += [f"param {name} = 0" for name, v in values.items() if not isinstance(v, Mapping)]
    names = ""
    if outputs is not None:
        import json

        names = "[" + ", ".join(json.dumps(str(n)) for n in outputs) + "] "
    lines.append(f"merge {names}from {ref} {{\n    \"*\" => {expr}\n}}")
    return SourceFile("<merge>", "\n".join(lines) + "\n")
