"""List comprehensions, range / zip / enumerate / reduce (lang/comprehend.py,
lang/intrinsics/lists.py): results against straightforward torch on the same tensors, the
scoping of comprehension names, and one test per new diagnostic (E111-E113 also in
tests/test_diagnostics.py)."""

from __future__ import annotations

import pytest
import torch

import mergelang as ml
from mergelang.diagnostics import MergelangError

SHAPES = {"w": (3, 4), "b": (4,)}


def sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


@pytest.fixture(scope="module")
def models():
    return {"base": sd(0), "a": sd(1), "b": sd(2), "c": sd(3)}


def merge_with(functions: str, expr: str, **sds) -> dict[str, torch.Tensor]:
    """ml.merge with recipe functions declared before the rule."""
    from pathlib import Path

    from mergelang.api import Recipe, compile_recipe
    from mergelang.diagnostics import SourceFile

    lines = [functions] + [f'model {n} = "<memory>"' for n in sds]
    lines.append(f'merge from base {{\n    "*" => {expr}\n}}')
    return Recipe(compile_recipe(SourceFile("<t>", "\n".join(lines) + "\n"), Path.cwd(), sds,
                                 {"dtype": None})).evaluate()


def close(x: torch.Tensor, y: torch.Tensor) -> None:
    assert torch.allclose(x, y, rtol=1e-6, atol=1e-6), (x - y).abs().max()


def test_task_vectors_from_a_comprehension(models):
    out = ml.merge('base + sum([m - base for m in [a, b, c]], over = "models")', **models)
    for k in SHAPES:
        base = models["base"][k]
        close(out[k], base + sum(models[m][k] - base for m in "abc"))


def test_zip_filter_and_unpacking(models):
    out = ml.merge('base + sum([w * (m - base) for w, m in zip([0.5, 0, 2], [a, b, c]) if w != 0],'
                   ' over = "models")', **models)
    for k in SHAPES:
        base = models["base"][k]
        close(out[k], base + 0.5 * (models["a"][k] - base) + 2 * (models["c"][k] - base))


def test_nested_clauses_run_left_to_right(models):
    # pairs i < j, as Python orders them: (a, b), (a, c), (b, c)
    out = ml.merge('sum([x * y for i, x in enumerate([a, b, c]) for j, y in enumerate([a, b, c]) '
                   'if j > i], over = "models")', **models)
    for k in SHAPES:
        a, b, c = (models[m][k] for m in "abc")
        close(out[k], a * b + a * c + b * c)


def test_a_stack_iterates_by_position(models):
    # `models - base` is one stacked tensor: the comprehension takes its models by index
    out = ml.merge('base + sum([2 * t for t in [a, b] - base], over = "models")', **models)
    for k in SHAPES:
        base = models["base"][k]
        close(out[k], base + 2 * (models["a"][k] - base) + 2 * (models["b"][k] - base))


def test_compile_time_numbers_and_range():
    out = ml.merge('a * sum([i * i for i in range(1, 7, 2)]) + 0 * len([0 for i in range(4) for j in range(3)])',
                   a={"w": torch.ones(2)})
    close(out["w"], torch.full((2,), 1 + 9 + 25.0))


RECIPE = '''
fn add2(acc, x) {
    return acc + x
}
fn mean_pair_cosine(base, models) {
    let tv = [m - base for m in models]
    let cos = [dot(tv[i], tv[j]) / maximum(norm(tv[i]) * norm(tv[j]), 1e-6)
               for i in range(len(tv)) for j in range(i + 1, len(tv))]
    return mean(cos, over = "models")
}
fn weighted_tv(base, models, weights) {
    let parts = [w * (m - base) for w, m in zip(weights, models) if w != 0]
    return base + reduce("add2", parts)
}
'''


def test_functions_written_once_for_any_number_of_models(models):
    """The docs/language.md example: one definition, 2 and 3 models, against plain torch."""
    for names in (["a", "b"], ["a", "b", "c"]):
        listed = ", ".join(names)
        out = merge_with(RECIPE, f"mean_pair_cosine(base, [{listed}]) * base", **models)
        for k in SHAPES:
            base = models["base"][k]
            tvs = [models[m][k] - base for m in names]
            cos = [torch.dot(tvs[i].flatten(), tvs[j].flatten())
                   / max(float(tvs[i].norm() * tvs[j].norm()), 1e-6)
                   for i in range(len(tvs)) for j in range(i + 1, len(tvs))]
            close(out[k], sum(cos) / len(cos) * base)
        weights = [1.0, 0.0, 0.5][: len(names)]
        out = merge_with(RECIPE, f"weighted_tv(base, [{listed}], {weights})", **models)
        for k in SHAPES:
            base = models["base"][k]
            close(out[k], base + sum(w * (models[m][k] - base) for w, m in zip(weights, names) if w))


def test_comprehension_names_do_not_leak(models):
    with pytest.raises(MergelangError) as exc:
        ml.merge('sum([m for m in [a, b]], over = "models") + m', **models)
    assert any(d.code == "E101" and "`m`" in d.message for d in exc.value.diagnostics)


def test_filter_must_be_known_at_compile_time(models):
    with pytest.raises(MergelangError) as exc:
        ml.merge('sum([m for m in [a, b] if m > 0], over = "models")', **models)
    assert exc.value.diagnostics[0].code == "E201"


def test_unpacking_the_wrong_count(models):
    with pytest.raises(MergelangError) as exc:
        ml.merge('sum([x for x, y, z in zip([a, b], [b, c])], over = "models")', **models)
    d = exc.value.diagnostics[0]
    assert d.code == "E112" and "into 3 names" in d.message


def test_zip_of_different_lengths_and_reduce_errors(models):
    for text, code in [('sum([x for x, y in zip([a, b], [a])], over = "models")', "E202"),
                       ('reduce("nope", [a, b])', "E102"),
                       ('reduce("add2", [])', "E203"),
                       ('a + len(range(0, 5, 0))', "E203")]:
        with pytest.raises(MergelangError) as exc:
            merge_with("fn add2(x, y) { return x + y }", text, **models)
        assert exc.value.diagnostics[0].code == code, text


def test_a_huge_comprehension_is_refused_quickly(models):
    import time

    t0 = time.perf_counter()
    with pytest.raises(MergelangError) as exc:
        ml.merge('a + len([0 for i in range(5000) for j in range(5000)])', **models)
    assert exc.value.diagnostics[0].code == "E113"
    assert time.perf_counter() - t0 < 5
