"""Compile-time strings and lists are bounded (issue 27, item 11): doubling a string 31 times,
lists of lists 40 deep sharing their items, or 40 levels of brackets are an E329 at the span in
`check`, within a moment and small memory — not 4 GB in `check`, 5.5 GB in `run` or a 262 MB
manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergelang as ml
from mergelang.diagnostics import MergelangError
from mergelang.lang.values import MAX_LIST_DEPTH, MAX_LIST_ELEMENTS, MAX_STRING_CHARS


@pytest.fixture
def base(tmp_path: Path) -> str:
    (tmp_path / "b").mkdir()
    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "b" / "model.safetensors"))
    return f'model base = "{tmp_path / "b"}"\n'


TAIL = 'merge from base { "*" => base }\n'


def first_error(text: str) -> tuple[str, str]:
    with pytest.raises(MergelangError) as exc:
        ml.compile(text)
    d = exc.value.diagnostics[0]
    return d.code, d.span.source.line_text(d.span.line) if d.span else ""


def test_string_doubling(base: str) -> None:
    lines = ['param s0 = "abcdefgh"'] + [f"param s{i} = s{i - 1} + s{i - 1}" for i in range(1, 32)]
    code, line = first_error(base + "\n".join(lines) + "\n" + TAIL)
    n = next(i for i in range(32) if 8 * 2 ** i > MAX_STRING_CHARS)  # the first too long
    assert code == "E329" and line == f"param s{n} = s{n - 1} + s{n - 1}"


def test_list_doubling(base: str) -> None:
    lines = ["param l0 = [1, 1]"] + [f"param l{i} = [l{i - 1}, l{i - 1}]" for i in range(1, 41)]
    code, line = first_error(base + "\n".join(lines) + "\n" + TAIL)
    # level i holds 2 + 4 + ... + 2**(i+1) elements counting every level
    n = next(i for i in range(41) if sum(2 ** (k + 1) for k in range(i + 1)) > MAX_LIST_ELEMENTS)
    assert code == "E329" and line == f"param l{n} = [l{n - 1}, l{n - 1}]"


@pytest.mark.parametrize("depth", [MAX_LIST_DEPTH + 1, 40])
def test_deep_brackets(base: str, depth: int) -> None:
    code, _ = first_error(base + f"param d = {'[' * depth}1{']' * depth}\n" + TAIL)
    assert code == "E329"


def test_function_building_lists_is_bounded(base: str) -> None:
    text = base + ("fn dbl(x) { return [x, x] }\nparam l0 = [1, 1]\n" +
                   "".join(f"param l{i} = dbl(l{i - 1})\n" for i in range(1, 41)) + TAIL)
    assert first_error(text)[0] == "E329"


def test_python_overrides_are_bounded(base: str) -> None:
    text = base + 'param p = "x"\n' + TAIL
    with pytest.raises(MergelangError) as exc:
        ml.compile(text, p="y" * (MAX_STRING_CHARS + 1))
    assert exc.value.codes == ["E329"]
    shared: list = [1, 1]
    for _ in range(15):
        shared = [shared, shared]
    with pytest.raises(MergelangError) as exc:
        ml.compile(text, p=shared)
    assert exc.value.codes == ["E329"]


def test_values_within_the_bounds_still_work(base: str) -> None:
    depth = MAX_LIST_DEPTH
    text = (base + f'param s = "{"x" * 1000}" + "y"\nparam d = {"[" * depth}1{"]" * depth}\n'
            f"param w = [{', '.join(['0.5'] * 1000)}]\n" + TAIL)
    ml.compile(text).close()


# --- item 16: dead `let`s cost nothing --------------------------------------------------------


def _evals(monkeypatch, text: str) -> int:
    from mergelang.lang import elaborate

    calls = [0]
    orig = elaborate.Elaborator.eval

    def counting(self, e, env):
        calls[0] += 1
        return orig(self, e, env)

    monkeypatch.setattr(elaborate.Elaborator, "eval", counting)
    ml.compile(text).close()
    monkeypatch.setattr(elaborate.Elaborator, "eval", orig)
    return calls[0]


def _fn(dead: int) -> str:
    lets = "".join(f"    let u{i} = x * {i}.0 + 1.0\n" for i in range(dead))
    return ("fn f(x) {\n    let a = x * 2.0\n" + lets + "    let b = a + 1.0\n"
            "    let unused_too = b * b\n    return b - x\n}\n")


def test_dead_lets_are_never_evaluated(base: str, monkeypatch) -> None:
    rule = 'merge from base { "*" => f(base) }\n'
    none = _evals(monkeypatch, base + _fn(0) + rule)
    many = _evals(monkeypatch, base + _fn(2000) + rule)
    assert many == none  # the work done does not grow with unused declarations


def test_live_lets_keep_their_meaning(base: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    r = ml.compile(base + _fn(3) + 'merge from base { "*" => f(base) }\n')
    got = r.evaluate()["w"]
    r.close()
    w = load_file(str(tmp_path / "b" / "model.safetensors"))["w"]
    torch.testing.assert_close(got, (w * 2 + 1) - w)


def test_unused_lets_that_check_still_check(base: str) -> None:
    """A `let` calling `fail` / `checked` (or a function that does) is evaluated even unused:
    the stdlib validates densities that way (`let d = _fraction(density, "density")`)."""
    text = base + ('fn guard(v) { return if v > 1 then fail("too big") else v }\n'
                   'fn f(x, v) {\n    let ok = guard(v)\n    let ok2 = checked(v, v >= 0, "negative")\n'
                   '    return x\n}\n')
    for v, msg in (("2", "too big"), ("-1", "negative")):
        with pytest.raises(MergelangError) as exc:
            ml.compile(text + f'merge from base {{ "*" => f(base, {v}) }}\n')
        assert exc.value.codes[0] in ("E203", "E204") and msg in exc.value.render()
    ml.compile(text + 'merge from base { "*" => f(base, 0.5) }\n').close()


def test_many_large_values_are_bounded_in_all(base: str) -> None:
    """Each value within its own bound, but thousands of them: the params (recorded in the
    manifest) and the strings a compilation builds are bounded in all (E329)."""
    from mergelang.lang.values import MAX_TOTAL_CHARS, MAX_TOTAL_ELEMENTS

    half = 'param h = "' + "x" * 1000 + '"\n' + "".join(f"param h{i} = h{i - 1 if i else ''} + h{i - 1 if i else ''}\n"
                                                         for i in range(9))  # h8: 512k characters
    n = MAX_TOTAL_CHARS // (1 << 20) + 2
    text = base + half + "".join(f"param s{i} = h8 + h8\n" for i in range(n)) + TAIL
    with pytest.raises(MergelangError) as exc:
        ml.compile(text)
    assert exc.value.codes[0] == "E329"
    lst = "[" + ", ".join(["1"] * 1000) + "]"
    text = base + f"param l = {lst}\n" + "".join(
        f"param l{i} = [l, l, l, l, l, l, l, l, l, l]\n" for i in range(MAX_TOTAL_ELEMENTS // 10000 + 2)) + TAIL
    with pytest.raises(MergelangError) as exc:
        ml.compile(text)
    assert set(exc.value.codes) == {"E329"}
