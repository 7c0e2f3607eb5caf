"""Every ```mrg block in README.md and docs/*.md parses; recipes with models compile against tiny
synthetic Llama-shaped state dicts (every declared model replaced by one); blocks without models
pass the static checks. A block using a method that lives elsewhere says `# needs: NAME` and is
skipped while NAME is missing. The other kinds of blocks (bash, python, yaml, text, and blocks
marked illustrative) are tests/test_doc_commands.py's, which also documents the convention."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mergelang as ml  # noqa: E402
from mergelang.diagnostics import Diagnostics, SourceFile  # noqa: E402
import mergelang.sources  # noqa: E402,F401  (registers lora, stack_layers, align)
from mergelang.lang.intrinsics import INTRINSICS  # noqa: E402
from mergelang.lang.loader import load, stdlib_functions  # noqa: E402
from mergelang.lang.resolve import check_unit  # noqa: E402
from test_mergekit_import import _tensors  # noqa: E402

BLOCK = re.compile(r"^```mrg[ \t]*\n(.*?)^```", re.S | re.M)
NEEDS = re.compile(r"^#\s*needs:\s*([\w, ]+)$", re.M)


def _blocks() -> list[tuple[str, str]]:
    out = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if path.is_file():
            for k, m in enumerate(BLOCK.finditer(path.read_text(encoding="utf-8"))):
                out.append((f"{path.relative_to(REPO)}#{k + 1}", m.group(1)))
    return out


BLOCKS = _blocks()


def test_the_guide_has_recipes():
    assert sum(1 for name, _ in BLOCKS if name.startswith("docs/guide.md")) >= 8


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    from tokenizer_models import make_models

    return list(make_models(tmp_path_factory.mktemp("doc_tok")).values())


@pytest.mark.parametrize("text", [t for _, t in BLOCKS], ids=[n for n, _ in BLOCKS])
def test_doc_block(text, tokenizer_folders):
    for names in NEEDS.findall(text):
        missing = [n.strip() for n in names.split(",")
                   if n.strip() and n.strip() not in stdlib_functions() and n.strip() not in INTRINSICS]
        if missing:
            pytest.skip(f"needs {', '.join(missing)} (not in this build's standard library)")
    if text.lstrip().startswith(('"', 're"')):
        # a fragment of rules (docs/methods.md): parse it inside a block; test_stdlib_docs runs them
        ml.parse("merge from base {\n" + text + "\n}\n")
        return
    program = ml.parse(text)  # raises MergelangError on a syntax error
    models = [it.name for it in program.items if type(it).__name__ == "ModelDecl"]
    if "import " in text:
        return  # imports files the docs do not ship: parsing is all we can check
    if models and "tokenizer_source" in text:  # needs folders with tokenizers
        r = ml.compile(text, **{m: tokenizer_folders[k % 3] for k, m in enumerate(models)})
        r.close()
        return
    if models and 'tensor(vlm, "language_model.' in text:  # a checkpoint naming its layers otherwise
        sd = _tensors(0)
        given = {m: sd for m in models}
        given["vlm"] = {"language_model." + k: v for k, v in sd.items()}
        ml.compile(text, **given).close()
        return
    if models:
        sd = _tensors(0)
        r = ml.compile(text, **{m: sd for m in models})
        r.close()
        return
    diags = Diagnostics()
    unit = load(SourceFile("<doc>", text), REPO, diags)
    assert unit is not None
    check_unit(unit, diags)
    assert not diags.has_errors, "\n".join(d.render() for d in diags.items)
