"""The compiler in stages (compiler.STAGES), the model wrappers in one ordered tuple
(sources/wrappers.WRAPPERS), and an elaborator nothing is assigned to after construction."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch

from mergelang import compiler
from mergelang.compiler import STAGES, CompileState, compile_recipe
from mergelang.diagnostics import Diagnostics, SourceFile
from mergelang.ir.graph import format_graph
from mergelang.lang.elaborate import ElabContext, Elaborator
from mergelang.sources.wrappers import WRAPPERS, Wrapper

PKG = Path(__file__).resolve().parents[1] / "mergelang"
RECIPE = """model a = "a"
model b = "b"
param t = 0.25
fn mix(x, y, w) { return x + w * (y - x) }
merge from a {
    "l.{i}.w" => mix(a, b, t * (i + 1))
    "*" => iterate("half", a, times = 3)
}
fn half(x) { return x * 0.5 }
"""


def _models() -> dict:
    g = torch.Generator().manual_seed(0)
    return {k: {"l.0.w": torch.randn(3, 2, generator=g), "l.1.w": torch.randn(3, 2, generator=g),
                "n": torch.randn(2, generator=g)} for k in ("a", "b")}


def test_stages_are_a_tuple_of_state_functions() -> None:
    assert isinstance(STAGES, tuple) and len(STAGES) >= 5
    for stage in STAGES:
        assert inspect.isfunction(stage), stage
        assert list(inspect.signature(stage).parameters) == ["s", "diags"], stage.__name__
    assert dataclasses.is_dataclass(CompileState) and CompileState.__dataclass_params__.frozen


def test_running_the_stages_by_hand_gives_compile_recipes_graph(tmp_path: Path) -> None:
    src = SourceFile("<t>", RECIPE)
    state = CompileState(src, tmp_path, _models(), {})
    diags = Diagnostics()
    seen = []
    for stage in STAGES:
        state = stage(state, diags)
        seen.append(state)
    assert len({id(s) for s in seen}) == len(STAGES)  # each stage gives a new state
    c = compile_recipe(src, tmp_path, _models())
    assert format_graph(state.graph) == format_graph(c.graph)
    assert format_graph(state.optimized) == format_graph(c.optimized)
    # the merged tensors against a direct torch computation
    import mergelang as ml

    out = ml.compile(RECIPE, **_models()).evaluate()
    m = _models()
    for i in (0, 1):
        a, b = m["a"][f"l.{i}.w"], m["b"][f"l.{i}.w"]
        torch.testing.assert_close(out[f"l.{i}.w"], a + 0.25 * (i + 1) * (b - a))
    torch.testing.assert_close(out["n"], m["a"]["n"] * 0.125)
    assert "loop" in format_graph(c.graph)  # `iterate` became one LOOP node (a body view)


def test_wrappers_are_one_ordered_tuple() -> None:
    assert isinstance(WRAPPERS, tuple) and all(isinstance(w, Wrapper) for w in WRAPPERS)
    names = [w.name for w in WRAPPERS]
    assert names == ["dequantize", "check_architectures", "link_outputs", "retokenize", "resize_vocab"]
    # the steps that need the options come last: one pass over the tuple keeps its order
    flags = [w.after_checks for w in WRAPPERS]
    assert flags == sorted(flags)


def test_the_elaborator_is_frozen(tmp_path: Path) -> None:
    assert dataclasses.is_dataclass(Elaborator) and Elaborator.__dataclass_params__.frozen
    assert ElabContext.__dataclass_params__.frozen
    el = Elaborator(ElabContext({}, {}, {}, Diagnostics()))
    for name in ("models", "graph", "in_loop_body", "load", "out_dtype"):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(el, name, None)
    # a loop body is a view with its own graph; the elaborator itself is unchanged
    body = el.body_view()
    assert body.in_loop_body and body.graph is not el.graph and body.state is el.state
    assert not el.in_loop_body


def _assignments_to(attr_owner: str, tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        flat = [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
        for t in flat:  # `el.x = ...`, not `el.state.x = ...` nor `el.models[k] = ...`
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == attr_owner:
                out.append(f"{attr_owner}.{t.attr} (line {node.lineno})")
    return out


def test_nothing_assigns_to_an_elaborator_or_patches_its_methods() -> None:
    """No `el.x = ...` anywhere (its mutable state is `el.state` / `el.block_state`, whose
    fields are assigned as `el.state.x`), no `self.x = ...` in Elaborator's methods, and no
    `.load =` / `.make =` monkeypatching (templates record through a view)."""
    bad = []
    for p in PKG.rglob("*.py"):
        text = p.read_text(encoding="utf-8")
        tree = ast.parse(text)
        bad += [f"{p.name}: {a}" for a in _assignments_to("el", tree)]
        bad += [f"{p.name}: {m.group(0)}" for m in re.finditer(r"\.(load|make) = ", text)]
        for cls in ast.walk(tree):
            if isinstance(cls, ast.ClassDef) and cls.name == "Elaborator":
                bad += [f"{p.name}: {a}" for a in _assignments_to("self", cls)]
    assert not bad, bad


def test_declarations_are_evaluated_through_one_try_except() -> None:
    """The one handler turning a declaration's evaluation error into a diagnostic."""
    sources = [PKG / "compiler.py", PKG / "lang" / "declarations.py"]
    handlers = [h for p in sources for h in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                if isinstance(h, ast.ExceptHandler) and isinstance(h.type, ast.Name)
                and h.type.id == "Poisoned"]
    assert len(handlers) == 1
    assert compiler.evaluate_declaration.__module__ == "mergelang.lang.declarations"
