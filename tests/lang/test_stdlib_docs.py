"""The standard library documents itself: every public stdlib function and every intrinsic has a
doc comment and is listed by `mergelang methods`; docs/methods.md has a section per merge method
and every example rule in it runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mergelang as ml
from mergelang.cli import main
from mergelang.lang.elaborate import signature_of
import mergelang.sources  # noqa: E402,F401  (registers lora, stack_layers, align)
from mergelang.lang.intrinsics import INTRINSICS
from mergelang.lang.loader import stdlib_functions

DOCS = Path(__file__).resolve().parents[1].parent / "docs" / "methods.md"
PUBLIC = sorted(n for n in stdlib_functions() if not n.startswith("_"))
BUILDING_BLOCKS = {"trim", "elect", "disjoint_mean", "unit", "random_drop", "band", "della_prune",
                   "rescale_kept"}
METHODS = [n for n in PUBLIC if n not in BUILDING_BLOCKS]


def _run(*args: str) -> str:
    result = CliRunner().invoke(main, ["methods", *args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("name", PUBLIC)
def test_public_function_is_documented_and_listed(name):
    fn = stdlib_functions()[name]
    assert fn.doc.strip(), f"stdlib function `{name}` has no ## doc comment"
    out = _run()
    assert signature_of(fn).render() in out.splitlines()
    assert fn.doc.split()[0] in out


def test_private_helpers_are_not_listed():
    listed = {line.split("(")[0] for line in _run().splitlines() if line and not line[0].isspace()
              and not line.startswith("#")}
    assert listed == set(PUBLIC)


@pytest.mark.parametrize("name", sorted(INTRINSICS))
def test_intrinsic_is_documented_and_listed(name):
    sig = INTRINSICS[name].sig
    assert sig.doc.strip(), f"intrinsic `{name}` has no doc"
    assert sig.render() in _run("--all").splitlines()


@pytest.mark.parametrize("name", METHODS)
def test_method_has_a_docs_section(name):
    text = DOCS.read_text()
    headings = [h.strip() for line in text.splitlines() if line.startswith("### ")
                for h in line[4:].split(",")]
    assert name in headings, f"docs/methods.md has no section for `{name}`"
    assert f"`{signature_of(stdlib_functions()[name]).render()}`" in text


def _examples() -> list[str]:
    blocks = re.findall(r"```mrg\n(.*?)```", DOCS.read_text(), flags=re.S)
    return [m.group(1) for b in blocks for m in re.finditer(r'^"\*" => (.+)$', b, flags=re.M)]


@pytest.mark.parametrize("expr", _examples())
def test_docs_example_runs(expr):
    g = torch.Generator().manual_seed(0)
    sd = lambda: {"w": torch.randn(12, 10, generator=g), "v": torch.randn(16, generator=g)}  # noqa: E731
    base, a, b, c = sd(), sd(), sd(), sd()
    sidecars = {f"f{n}": {k: torch.rand(v.shape, generator=g) for k, v in a.items()} for n in "ab"}
    for n in "ab":  # Gram matrices for the linear weight `w` only
        x = torch.randn(40, 10, generator=g)
        sidecars[f"g{n}"] = {"w": x.T @ x}
    out = ml.merge(expr, base=base, a=a, b=b, c=c, **sidecars)
    assert set(out) == {"w", "v"}
    assert all(torch.isfinite(t).all() for t in out.values())
