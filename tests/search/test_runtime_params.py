"""Run-time params (compile once, run many): a plan compiled with params as PARAM nodes and
filled per run gives exactly the tensors of a recipe compiled with those values (differential:
the filled plan against a fresh compilation, fused and unfused)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mergelang.api import Recipe
from mergelang.compiler import compile_recipe
from mergelang.diagnostics import MergelangError, SourceFile
from mergelang.ir.ops import Op
from mergelang.search.trials import TrialRunner, split_runtime


def _sd(seed: int, rows: int = 24, cols: int = 40) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(rows, cols, generator=g), "b": torch.randn(cols, generator=g),
            "n": torch.randn(7, generator=g)}


MODELS = {"base": _sd(0), "a": _sd(1), "b": _sd(2), "c": _sd(3)}
HEAD = 'model base = "<memory>"\nmodel a = "<memory>"\nmodel b = "<memory>"\nmodel c = "<memory>"\n'

RECIPES = {
    "task_arithmetic": ("param w = [0.5, 0.5, 0.5] in [0, 1]\nparam lam = 1.0 in [0, 2]\n"
                        'merge from base { "*" => task_arithmetic(base, [a, b, c], weights = w, lambda = lam) }\n'),
    "ties": ("param d = 0.5 in [0.05, 1]\nparam lam = 1.0 in [0, 2]\n"
             'merge from base { "*" => ties(base, [a, b, c], density = d, lambda = lam) }\n'),
    "ties_per_model": ("param d = [0.5, 0.3, 0.9] in [0.05, 1]\n"
                       'merge from base { "*" => ties(base, [a, b, c], density = d) }\n'),
    "dare_ties": ("param d = 0.5 in [0.05, 1]\n"
                  'merge from base { "*" => dare_ties(base, [a, b, c], density = d, seed = 3) }\n'),
    "linear": ('param w = [1, 1, 1] in [0, 3]\nmerge from base { "*" => linear([a, b, c], weights = w) }\n'),
}


def _compiled(src: str, values: dict) -> dict[str, torch.Tensor]:
    return Recipe(compile_recipe(SourceFile("r.mrg", HEAD + src), Path.cwd(),
                                        {**MODELS, **values})).evaluate()


def _runner(src: str, names: tuple[str, ...]) -> TrialRunner:
    def compile_(runtime, fixed):
        return compile_recipe(SourceFile("r.mrg", HEAD + src), Path.cwd(), {**MODELS, **fixed},
                              runtime=runtime)
    return TrialRunner(compile_, names)


def _equal(x: dict, y: dict) -> None:
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


VALUES = {
    "task_arithmetic": [{"w": [0.2, 0.7, 0.1], "lam": 0.9}, {"w": [1.0, 0.0, 0.33], "lam": 1.7}],
    "ties": [{"d": 0.7, "lam": 1.0}, {"d": 0.05, "lam": 0.3}, {"d": 1.0, "lam": 2.0}],
    "ties_per_model": [{"d": [0.7, 0.1, 1.0]}, {"d": [0.05, 0.05, 0.05]}],
    "dare_ties": [{"d": 0.3}, {"d": 0.9}, {"d": 1.0}],
    "linear": [{"w": [0.5, 2.0, 1.0]}, {"w": [3, 0, 1]}],
}


@pytest.mark.parametrize("fuse", ["1", "0"])
@pytest.mark.parametrize("method", sorted(RECIPES))
def test_filled_plan_equals_a_compilation_with_the_values(method: str, fuse: str, monkeypatch) -> None:
    monkeypatch.setenv("MERGELANG_FUSE", fuse)
    src = RECIPES[method]
    names = tuple(VALUES[method][0])
    r = _runner(src, names)
    try:
        assert r.runtime == names and r.static == ()  # every one is a run-time input
        for values in VALUES[method]:
            _equal(r.run(values), _compiled(src, values))
        assert r.compiles == 1
    finally:
        r.close()


@settings(max_examples=25, deadline=None)
@given(d=st.floats(0.05, 1.0), lam=st.floats(0.0, 2.0))
def test_ties_any_density_and_lambda(d: float, lam: float) -> None:
    src = RECIPES["ties"]
    r = _runner(src, ("d", "lam"))
    try:
        _equal(r.run({"d": d, "lam": lam}), _compiled(src, {"d": d, "lam": lam}))
    finally:
        r.close()


def test_params_the_compiler_needs_recompile_per_value() -> None:
    """breadcrumbs turns its density into counts at compile time: that param is static (each
    new value compiles again), the other stays a run-time input; results are still exact."""
    src = ("param d = 0.5 in [0.1, 0.9]\nparam lam = 1.0 in [0, 2]\n"
           'merge from base { "*" => breadcrumbs(base, [a, b, c], density = d, gamma = 0.1, lambda = lam) }\n')
    r = _runner(src, ("d", "lam"))
    try:
        assert r.runtime == ("lam",) and r.static == ("d",)
        for values in [{"d": 0.5, "lam": 0.2}, {"d": 0.5, "lam": 1.5}, {"d": 0.3, "lam": 1.0}]:
            _equal(r.run(values), _compiled(src, values))
        assert r.compiles == 2  # d = 0.5 once, d = 0.3 once
    finally:
        r.close()


def test_della_density_is_static() -> None:
    """DELLA branches on its density (1: unchanged, <= 0: zero, epsilon checks), so the density
    is read at compile time; epsilon-free parts (lambda) stay run-time inputs."""
    src = ("param d = 0.6 in [0.2, 0.9]\nparam lam = 1.0 in [0, 2]\n"
           'merge from base { "*" => della(base, [a, b, c], density = d, epsilon = 0.1, lambda = lam) }\n')
    r = _runner(src, ("d", "lam"))
    try:
        assert r.runtime == ("lam",) and r.static == ("d",)
        for values in [{"d": 0.3, "lam": 1.0}, {"d": 0.85, "lam": 0.5}]:
            _equal(r.run(values), _compiled(src, values))
    finally:
        r.close()


def test_graph_holds_param_nodes_and_refs() -> None:
    c = compile_recipe(SourceFile("r.mrg", HEAD + RECIPES["ties"]), Path.cwd(), MODELS, runtime=("d", "lam"))
    ops = {n.op for _, n in c.optimized.items()}
    assert Op.PARAM in ops
    text = Recipe(c).emit("optimized")
    assert "density=d" in text and "= param lam : f32[]" in text
    c.close()


def test_a_value_outside_its_range_is_refused() -> None:
    r = _runner(RECIPES["ties"], ("d", "lam"))
    try:
        with pytest.raises(MergelangError) as ei:
            r.run({"d": 1.5, "lam": 1.0})
        assert ei.value.diagnostics[0].code == "E405"
    finally:
        r.close()


def test_a_string_param_cannot_be_runtime() -> None:
    src = 'param m = "total"\nmerge from base { "*" => linear([a, b]) }\n'
    with pytest.raises(MergelangError) as ei:
        compile_recipe(SourceFile("r.mrg", HEAD + src), Path.cwd(), MODELS, runtime=("m",))
    assert ei.value.diagnostics[0].code == "E901"


def test_split_runtime_finds_guards() -> None:
    src = ('param k = 2 in [1, 3]\nmerge from base {\n    "*" if k > 1 => linear([a, b])\n'
           '    "*" => base\n}\n')

    def compile_(runtime, fixed):
        return compile_recipe(SourceFile("r.mrg", HEAD + src), Path.cwd(), {**MODELS, **fixed},
                              runtime=runtime)
    assert split_runtime(compile_, ("k",)) == ((), ("k",))


def test_known_intrinsic() -> None:
    src = ('param lam = 0.5 in [0, 1]\n'
           'merge from base { "*" => if known(lam) then a else b }\n')
    assert torch.equal(_compiled(src, {})["w"], MODELS["a"]["w"])

    def compile_(runtime, fixed):
        return compile_recipe(SourceFile("r.mrg", HEAD + src), Path.cwd(), {**MODELS, **fixed},
                              runtime=runtime)
    r = TrialRunner(compile_, ("lam",))
    try:
        # at run time lam is not known: the recipe takes the other branch (compiled once)
        assert torch.equal(r.run({"lam": 0.5})["w"], MODELS["b"]["w"])
    finally:
        r.close()


def test_fused_loops_take_the_params_at_run_time() -> None:
    """Tensors big enough to fuse: the generated loops read a run-time param (and a top-k
    density) as an input, so new values need no new loop; results equal a compilation."""
    from mergelang.passes.pipeline import plan_for
    from mergelang.runtime.executor import target_for

    big = {k: {"w": torch.randn(300, 300, generator=torch.Generator().manual_seed(i))}
           for i, k in enumerate(["base", "a", "b", "c"])}
    src = HEAD + RECIPES["ties"]

    def compile_(runtime, fixed):
        return compile_recipe(SourceFile("r.mrg", src), Path.cwd(), {**big, **fixed}, runtime=runtime)
    c = compile_(("d", "lam"), {})
    plan = plan_for(c.plan, target_for("cpu")).plan
    fused = [n for _, n in plan.graph.items() if n.op is Op.FUSED]
    c.close()
    if not fused:
        pytest.skip("fusion is off on this machine (numba unavailable)")
    from mergelang.ir.ops import ParamRef

    # the fused top-k holds the density as a reference, filled per run (not baked into a loop)
    assert any(isinstance(n.attrs.get("select"), tuple) and n.attrs["select"][0] == ParamRef(("p", "d", ()))
               for n in fused)
    r = TrialRunner(compile_, ("d", "lam"))
    try:
        for values in [{"d": 0.3, "lam": 1.0}, {"d": 0.8, "lam": 0.4}]:
            want = Recipe(compile_recipe(SourceFile("r.mrg", src), Path.cwd(), {**big, **values})).evaluate()
            _equal(r.run(values), want)
    finally:
        r.close()


ARITH = {
    "one_minus": ("param w = 0.3 in [0, 1]\n"
                  'merge from base { "*" => linear([a, b], weights = [w, 1 - w]) }\n', {"w": [0.1, 0.77, 0.333]}),
    "normalised": ("param w = [0.2, 0.5, 0.9] in [0, 1]\n"
                   'merge from base { "*" => base + sum((w / sum(w)) * ([a, b, c] - base), over = "models") }\n',
                   {"w": [[0.1, 0.2, 0.7], [0.9, 0.3, 0.33]]}),
    "affine_sqrt": ("param lam = 0.4 in [0, 2]\n"
                    'merge from base { "*" => base + (lam * 2 + 1) * sqrt(lam) * (a - base) }\n', {"lam": [0.0, 0.7, 1.9]}),
    "max_and_compare": ("param lam = 0.4 in [0, 1]\n"
                        'merge from base { "*" => where(lam > 0.5, a, b) * maximum(lam, 0.25) }\n', {"lam": [0.1, 0.6]}),
}


@pytest.mark.parametrize("case", sorted(ARITH))
def test_arithmetic_on_params_is_folded_as_at_compile_time(case: str) -> None:
    """`1 - w`, `w / sum(w)`, `lam * 2 + 1`, `sqrt(lam)`: folded in Python (float64) when the
    values are given, as the compiler folds them, so the bits equal a compilation's."""
    src, grid = ARITH[case]
    name = next(iter(grid))
    r = _runner(src, (name,))
    try:
        assert r.runtime == (name,) and r.static == ()
        for v in grid[name]:
            _equal(r.run({name: v}), _compiled(src, {name: v}))
    finally:
        r.close()


def test_division_by_zero_at_run_time_is_E205() -> None:
    src = 'param w = 0.5 in [0, 1]\nmerge from base { "*" => base * (1 / w) }\n'
    r = _runner(src, ("w",))
    try:
        with pytest.raises(MergelangError) as ei:
            r.run({"w": 0.0})
        assert ei.value.diagnostics[0].code == "E205"
    finally:
        r.close()


def test_params_derived_from_tuned_params_follow_them() -> None:
    """`param b = 1 - a` with `a` tuned: b is evaluated from each run's a, as a compilation
    with that value of a evaluates it."""
    src = ("param lam = 0.5 in [0, 1]\nparam mu = 1 - lam\nparam ws = [lam, mu * 2]\n"
           'merge from base { "*" => linear([a, b], weights = ws) }\n')
    r = _runner(src, ("lam",))
    try:
        assert r.runtime == ("lam",)
        for v in (0.1, 0.8):
            _equal(r.run({"lam": v}), _compiled(src, {"lam": v}))
    finally:
        r.close()
