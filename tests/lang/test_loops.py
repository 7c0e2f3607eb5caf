"""`iterate` as one LOOP node: the graph does not grow with the number of rounds, results equal
the unrolled rounds bit for bit (with and without an early fixed point), bodies that cannot be a
loop unroll (and refuse absurd round counts), nested loops, --emit output."""

from __future__ import annotations

import time

import pytest
import torch

import mergelang as ml
from mergelang.ir.ops import Op

G = torch.Generator().manual_seed(0)
A = {"w": torch.rand(5, 7, generator=G) + 0.5, "b": torch.rand(9, generator=G) + 0.5}
B = {k: torch.rand(v.shape, generator=G) + 0.5 for k, v in A.items()}

# Heron's square root of y: converges to a fixed point (or a two-value cycle in the last bit)
LOOPED = '''
fn heron(x, y) {{ return 0.5 * (x + y / x) }}
merge from a {{ "*" => iterate("heron", a, {n}, [b]) }}
'''
# the same body reading `b` by its global name cannot be a loop node: it is unrolled
UNROLLED = '''
fn heron(x) {{ return 0.5 * (x + b / x) }}
merge from a {{ "*" => iterate("heron", a, {n}) }}
'''


def compile_(text, **models):
    return ml.compile('model a = "a"\nmodel b = "b"\n' + text, a=A, b=B, **models)


def loop_nodes(r) -> int:
    return r.emit("graph").count("= loop")


@pytest.mark.parametrize("n", [2, 3, 7, 40])
def test_loop_equals_unrolled_bit_for_bit(n):
    r1, r2 = compile_(LOOPED.format(n=n)), compile_(UNROLLED.format(n=n))
    try:
        assert loop_nodes(r1) == 2 and loop_nodes(r2) == 0
        got, want = r1.evaluate(), r2.evaluate()
    finally:
        r1.close()
        r2.close()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    if n == 40:  # converged: the square root
        torch.testing.assert_close(got["w"], torch.sqrt(B["w"]))


def test_graph_and_compile_time_do_not_grow_with_rounds():
    sizes, times = [], []
    for n in (10, 100_000):
        t = time.perf_counter()
        r = compile_(LOOPED.format(n=n))
        times.append(time.perf_counter() - t)
        sizes.append(r.emit("graph").count("\n"))
        r.close()
    assert sizes[0] == sizes[1]
    assert times[1] < 10 * times[0] + 1.0


def test_karcher_with_1200_iterations_compiles_small():
    out = ml.merge("karcher([a, b], max_iter = 1200, tol = 1e-10)", a=A, b=B)
    ref = ml.merge("karcher([a, b], max_iter = 200, tol = 1e-10)", a=A, b=B)
    for k in A:  # converged well before 200 rounds: the fixed point is the same bits
        assert torch.equal(out[k], ref[k])


def test_model_wide_statistics_in_the_body_unroll():
    text = '''
fn step(x) {{ return x * 0.5 + model_sum(x) * 0 }}
merge from a {{ "*" => iterate("step", a, {n}) }}
'''
    r = compile_(text.format(n=3))
    try:
        assert loop_nodes(r) == 0
        got = r.evaluate()
    finally:
        r.close()
    assert torch.equal(got["w"], A["w"] * 0.125)


def test_unrolling_is_bounded():
    text = '''
fn step(x) { return x * 0.5 + b * 0 }
merge from a { "*" => iterate("step", a, 1000) }
'''
    with pytest.raises(ml.MergelangError) as info:
        compile_(text)
    d = info.value.diagnostics[0]
    assert d.code == "E203" and "unrolls" in d.message


def test_nested_iterate_and_compile_time_arguments():
    text = '''
fn inner(x, s) { return x * s }
fn outer(x, y) { return iterate("inner", x, 3, [0.5]) + y }
merge from a { "*" => iterate("outer", a, 4, [b]) }
'''
    r = compile_(text)
    try:
        got = r.evaluate()
    finally:
        r.close()
    x = A["w"].clone()
    for _ in range(4):
        for _ in range(3):
            x = x * 0.5
        x = x + B["w"]
    assert torch.equal(got["w"], x)


def test_loop_in_emit_graph_is_summarised():
    r = compile_(LOOPED.format(n=12))
    try:
        text = r.emit("graph")
    finally:
        r.close()
    line = next(s for s in text.splitlines() if "= loop" in s)
    assert "fn='heron' times=12 body=<" in line and "div" in line
    assert Op.LOOP.value == "loop"


def test_loop_with_a_failing_check_reports_E501():
    text = '''
fn step(x) { return checked(x * 2, x < 100, "too big") }
merge from a { "*" => iterate("step", a, 50) }
'''
    r = compile_(text)
    try:
        with pytest.raises(ml.MergelangError) as info:
            r.evaluate()
    finally:
        r.close()
    assert info.value.diagnostics[0].code == "E501"
