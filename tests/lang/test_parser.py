"""Parser tests: `ast.dump(parse_program(...))` against golden files, precedence, and the E001
messages for typical mistakes.

Goldens live in tests/golden/parser/NAME.mrg -> NAME.ast. To regenerate them after an intended
change: MERGELANG_UPDATE_GOLDEN=1 pytest tests/test_parser.py (then review the diff).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mergelang.lang import ast
from mergelang.diagnostics import CompileError, SourceFile
from mergelang.lang.parser import parse_expr, parse_program

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "parser"
UPDATE = bool(os.environ.get("MERGELANG_UPDATE_GOLDEN"))


def check_golden(path: Path, actual: str) -> None:
    if UPDATE or not path.exists():
        if not UPDATE:
            pytest.fail(f"missing golden file {path}; run with MERGELANG_UPDATE_GOLDEN=1 to create it")
        path.write_text(actual)
        return
    expected = path.read_text()
    assert actual == expected, f"{path.name} differs; MERGELANG_UPDATE_GOLDEN=1 to accept"


@pytest.mark.parametrize("name", sorted(p.stem for p in GOLDEN.glob("*.mrg")))
def test_parser_golden(name: str):
    src = GOLDEN / f"{name}.mrg"
    program = parse_program(SourceFile(src.name, src.read_text()))
    check_golden(GOLDEN / f"{name}.ast", ast.dump(program) + "\n")


def test_golden_files_exist():
    assert len(list(GOLDEN.glob("*.mrg"))) >= 4


# ---------------------------------------------------------------------------------------------
# structure checks that do not depend on the dump format


def expr(text: str) -> ast.Expr:
    return parse_expr(SourceFile("<expr>", text))


def shape(e: ast.Expr) -> str:
    """A parenthesised rendering, to check precedence and associativity."""
    if isinstance(e, ast.Binary):
        return f"({shape(e.left)} {e.op} {shape(e.right)})"
    if isinstance(e, ast.Unary):
        return f"({e.op} {shape(e.operand)})"
    if isinstance(e, ast.Number):
        return str(e.value)
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Bool):
        return str(e.value).lower()
    if isinstance(e, ast.IfExpr):
        return f"(if {shape(e.cond)} {shape(e.then)} {shape(e.else_)})"
    if isinstance(e, ast.Call):
        args = [shape(a) for a in e.args] + [f"{k.name}={shape(k.value)}" for k in e.kwargs]
        return f"{e.func}[{', '.join(args)}]"
    if isinstance(e, ast.Index):
        return f"{shape(e.target)}@{shape(e.index)}"
    if isinstance(e, ast.ListExpr):
        return "[" + ", ".join(shape(i) for i in e.items) + "]"
    return type(e).__name__


@pytest.mark.parametrize("text, expected", [
    ("1 + 2 * 3", "(1 add (2 mul 3))"),
    ("1 - 2 - 3", "((1 sub 2) sub 3)"),
    ("8 / 4 / 2", "((8 div 4) div 2)"),
    ("7 // 2 % 3 * 4", "(((7 floordiv 2) mod 3) mul 4)"),
    ("2 ** 3 ** 2", "(2 pow (3 pow 2))"),
    ("-2 ** 2", "(neg (2 pow 2))"),
    ("2 ** -1", "(2 pow (neg 1))"),
    ("-a * b", "((neg a) mul b)"),
    ("- - a", "(neg (neg a))"),
    ("+a - b", "((pos a) sub b)"),
    ("a < b + 1", "(a lt (b add 1))"),
    ("not a == b", "(not (a eq b))"),
    ("a or b and c", "(a or (b and c))"),
    ("not a and b", "((not a) and b)"),
    ("a >= 1 and b != 2 or c <= 3", "(((a ge 1) and (b ne 2)) or (c le 3))"),
    ("if a then b else c + 1", "(if a b (c add 1))"),
    ("if a then if b then 1 else 2 else 3", "(if a (if b 1 2) 3)"),
    ("f(x, y = 2)[0] * 3", "(f[x, y=2]@0 mul 3)"),
    ("xs[0][1]", "xs@0@1"),
    ("[a, b,][i - 1]", "[a, b]@(i sub 1)"),
    ("(1 + 2) * 3", "((1 add 2) mul 3)"),
    ("f()", "f[]"),
    ("1e-3 + .5 + 2.", "((0.001 add 0.5) add 2.0)"),
])
def test_precedence(text: str, expected: str):
    assert shape(expr(text)) == expected


def test_patterns_and_guards():
    program = parse_program(SourceFile("r.mrg", (
        'model base = "b"\n'
        'merge from base {\n'
        '    "model.layers.{i}.mlp.{j}.weight" if i < 2 => base\n'
        '    re"layers\\.(?P<n>\\d+)\\.x" => base\n'
        '    "*" => base\n'
        '}\n')))
    (block,) = program.of(ast.MergeBlock)
    glob, regex, star = block.rules
    assert glob.pattern.captures == ("i", "j")
    assert glob.pattern.match("model.layers.12.mlp.3.weight") == {"i": 12, "j": 3}
    assert glob.pattern.match("model.layers.x.mlp.3.weight") is None
    assert glob.guard is not None and shape(glob.guard) == "(i lt 2)"
    assert regex.pattern.kind == "regex" and regex.pattern.captures == ("n",)
    assert regex.pattern.match("layers.7.x") == {"n": 7}
    assert star.pattern.match("anything.at.all") == {}
    assert star.guard is None


def test_doc_comments():
    program = parse_program(SourceFile("r.mrg", (
        "# plain comment\n"
        "## Line one.\n"
        "## Line two.\n"
        "fn f(x, y = 2) { return x }\n"
        "\n"
        "fn g(x) { return x }\n")))
    f, g = program.of(ast.FnDef)
    assert f.doc == "Line one. Line two."
    assert not g.doc
    assert [p.name for p in f.params] == ["x", "y"]
    assert f.params[0].default is None and shape(f.params[1].default) == "2"


def test_spans_point_into_the_source():
    text = 'param lam = 0.5 * density\n'
    program = parse_program(SourceFile("r.mrg", text))
    (decl,) = program.items
    assert decl.value.span.text == "0.5 * density"
    assert (decl.value.span.line, decl.value.span.col) == (1, 13)
    assert decl.value.right.span.text == "density"


# ---------------------------------------------------------------------------------------------
# syntax errors


def syntax_error(text: str):
    with pytest.raises(CompileError) as ei:
        parse_program(SourceFile("r.mrg", text))
    d = ei.value.diag
    assert d.code == "E001"
    return d


def test_equals_instead_of_arrow():
    d = syntax_error('model a = "a"\nmerge from a {\n    "*" = a\n}\n')
    assert (d.span.line, d.span.col) == (3, 9) and d.span.text == "="
    assert "use `=>`" in d.help
    assert d.render().splitlines()[1:5] == [
        " --> r.mrg:3:9", "  |", '3 |     "*" = a', "  |         ^"]


def test_missing_comma_between_arguments():
    d = syntax_error('model a = "a"\nmerge from a { "*" => linear([a, a] weights = [1, 2]) }\n')
    assert d.span.text == "weights"
    assert "missing `,`" in d.help


def test_missing_comma_in_list():
    d = syntax_error('param w = [1 2]\n')
    assert d.span.text == "2" and (d.span.line, d.span.col) == (1, 14)
    assert "`,`" in d.help


def test_single_quotes():
    d = syntax_error("model a = 'models/a'\n")
    assert d.span.text == "'" and (d.span.line, d.span.col) == (1, 11)
    assert "double quotes" in d.help


def test_unclosed_brace():
    d = syntax_error('model a = "a"\nmerge from a {\n    "*" => a\n')
    assert d.message == "unexpected end of file"
    assert "`}`" in d.help


def test_unclosed_paren():
    d = syntax_error('model a = "a"\nmerge from a { "*" => linear([a, a] }\n')
    assert d.span.text == "}"
    assert "`)`" in d.help


def test_comparison_with_single_equals():
    d = syntax_error('param x = if 1 = 1 then 2 else 3\n')
    assert d.span.text == "="
    assert "`==`" in d.help


def test_colon_instead_of_arrow():
    d = syntax_error('model a = "a"\nmerge from a { "*": a }\n')
    assert d.span.text == ":"
    assert "=>" in d.help


def test_positional_after_keyword():
    d = syntax_error('param x = f(a = 1, 2)\n')
    assert d.span.text == "2"
    assert "positional arguments first" in d.help


def test_bad_regex_is_e109():
    with pytest.raises(CompileError) as ei:
        parse_program(SourceFile("r.mrg", 'model a = "a"\nmerge from a { re"(" => a }\n'))
    assert ei.value.diag.code == "E109"
    assert ei.value.diag.span.text == 're"("'


def test_missing_return():
    d = syntax_error("fn f(x) { let y = x }\n")
    assert d.span.text == "}"
    assert "return" in d.help


def test_parser_tables_are_cached_on_disk(tmp_path, monkeypatch):
    """The LALR tables go to MERGELANG_CACHE_DIR/lark (and are read back); an unusable cache
    folder only means no cache."""
    from mergelang.lang import parser
    from mergelang.diagnostics import SourceFile

    monkeypatch.setenv("MERGELANG_CACHE_DIR", str(tmp_path / "c"))
    parser._parser.cache_clear()
    try:
        parser.parse_program(SourceFile("r.mrg", 'model a = "x"\n'))
        files = list((tmp_path / "c" / "lark").glob("mrg-*.lark"))
        assert len(files) == 1 and files[0].stat().st_size > 1000
        parser._parser.cache_clear()
        parser.parse_program(SourceFile("r.mrg", 'model a = "x"\n'))  # loads the tables from the file
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("MERGELANG_CACHE_DIR", str(tmp_path / "file"))  # not a folder
        parser._parser.cache_clear()
        parser.parse_program(SourceFile("r.mrg", 'model a = "x"\n'))
    finally:
        parser._parser.cache_clear()


def test_stdlib_functions_are_cached_on_disk(tmp_path, monkeypatch):
    """The parsed standard library is pickled to MERGELANG_CACHE_DIR/stdlib and loaded from
    there (equal functions); a torn cache file is parsed again and rewritten."""
    from mergelang.lang import loader

    monkeypatch.setenv("MERGELANG_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(loader, "_STDLIB", None)
    fresh = loader.stdlib_functions()
    (cached,) = (tmp_path / "stdlib").glob("stdlib-*.pickle")
    monkeypatch.setattr(loader, "_STDLIB", None)
    again = loader.stdlib_functions()
    assert again is not fresh and again.keys() == fresh.keys()
    assert all(again[k] == fresh[k] for k in fresh)  # frozen dataclasses: field equality
    src = {id(fn.span.source) for fn in again.values() if fn.span.source.path.endswith("core.mrg")}
    assert len(src) == 1  # one SourceFile object per library file, as when parsed
    cached.write_bytes(cached.read_bytes()[:100])  # torn
    monkeypatch.setattr(loader, "_STDLIB", None)
    assert loader.stdlib_functions().keys() == fresh.keys()
    assert cached.stat().st_size > 1000  # rewritten
