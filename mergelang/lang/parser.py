"""Text -> AST. Lark (LALR) parses; a Transformer builds the frozen AST with spans; Lark's
exceptions become E001 diagnostics with the expected tokens in words."""

from __future__ import annotations

import ast as pyast
import hashlib
import math
import re
from functools import lru_cache

import lark
from lark import Lark, Token, Transformer, v_args

from mergelang.lang import ast
from mergelang.diagnostics import CompileError, SourceFile, Span, error
from mergelang.resources import grammar_path


@lru_cache(maxsize=None)
def _parser() -> Lark:
    """The LALR parser. Building its tables takes ~0.15 s, loading them ~0.01 s: they are cached
    in the cache folder (cachedir.py), under a name made from the grammar, the options and the
    lark version (no cache when the folder is not writable)."""
    from mergelang.cachedir import cache_dir

    text = grammar_path().read_text(encoding="utf-8")
    options = dict(parser="lalr", start=["start", "expr_start"], propagate_positions=True,
                   maybe_placeholders=True)
    folder = cache_dir("lark")
    cache: bool | str = False
    if folder is not None:
        key = hashlib.sha256(f"{text}\0{sorted(options.items())}\0{lark.__version__}".encode()).hexdigest()[:20]
        cache = str(folder / f"mrg-{key}.lark")
    return Lark(text, cache=cache, **options)


_TOKEN_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "REGEX": 'a regex re"..."',
    "LPAR": "`(`", "RPAR": "`)`", "LSQB": "`[`", "RSQB": "`]`", "LBRACE": "`{`", "RBRACE": "`}`",
    "COMMA": "`,`", "EQUAL": "`=`", "MORETHAN": "`>`", "LESSTHAN": "`<`", "PLUS": "`+`",
    "MINUS": "`-`", "STAR": "`*`", "SLASH": "`/`", "PERCENT": "`%`", "_IF": "`if`", "_FOR": "`for`", "_IN": "`in`", "$END": "end of file",
}


def _word(term: str) -> str:
    if term in _TOKEN_WORDS:
        return _TOKEN_WORDS[term]
    try:
        pattern = _parser().get_terminal(term).pattern
        if isinstance(pattern, lark.lexer.PatternStr):
            return f"`{pattern.value}`"
    except KeyError:
        pass
    return term.lower()


def _expected(terms: set[str]) -> str:
    words = sorted({_word(t) for t in terms})
    if not words:
        return ""
    if len(words) > 8:
        words = words[:8] + ["..."]
    return ", ".join(words)


def _syntax_error(src: SourceFile, exc: lark.exceptions.LarkError) -> CompileError:
    if isinstance(exc, lark.exceptions.UnexpectedCharacters):
        span = Span(src, exc.pos_in_stream, exc.pos_in_stream + 1)
        ch = src.text[exc.pos_in_stream]
        help_ = None
        if ch == "'":
            help_ = 'strings use double quotes: "..."'
        elif ch == ":":
            help_ = "rules are written `\"PATTERN\" => EXPR`; keyword arguments use `name = value`"
        return CompileError(error("E001", f"unexpected character {ch!r}", span, help_))
    if isinstance(exc, lark.exceptions.UnexpectedToken):
        tok: Token = exc.token
        # the interactive parser knows the exact acceptable tokens (exc.expected is a superset)
        ip = getattr(exc, "interactive_parser", None)
        terms = set(ip.accepts()) if ip is not None else set(exc.expected)
        if tok.type == "$END":
            span = Span(src, max(0, len(src.text) - 1), len(src.text))
            what = "unexpected end of file"
        else:
            span = Span(src, tok.start_pos, tok.end_pos)
            kind = {"NAME": "name", "NUMBER": "number", "STRING": "string", "REGEX": "regex"}
            what = (f"unexpected {kind[tok.type]} `{tok}`" if tok.type in kind
                    else f"unexpected {_word(tok.type)}")
        expected = _expected(terms)
        help_ = f"expected {expected}" if expected else None
        if tok.type == "EQUAL" and "`=>`" in {_word(t) for t in terms}:
            help_ = "rules are written `\"PATTERN\" => EXPR`: use `=>`, not `=`"
        elif tok.type == "EQUAL" and "`==`" in {_word(t) for t in terms}:
            help_ = "use `==` to compare; `=` only names a keyword argument or a declaration"
        if tok.type == "NAME" and "RPAR" in terms:
            help_ = (help_ or "") + " (missing `,` between arguments?)"
        return CompileError(error("E001", what, span, help_))
    if isinstance(exc, lark.exceptions.UnexpectedEOF):
        span = Span(src, max(0, len(src.text) - 1), len(src.text))
        return CompileError(error("E001", "unexpected end of file", span,
                                  f"expected {_expected(set(exc.expected))}"))
    return CompileError(error("E001", f"syntax error: {exc}", None))


#: the longest integer literal (digits): compile-time integers stay below 2**256
MAX_INT_DIGITS = 77


def _unquote(src: SourceFile, tok: Token) -> str:
    body = str(tok)[1:-1]
    try:
        return pyast.literal_eval('"' + body + '"') if "\\" in body else body
    except (SyntaxError, ValueError):
        raise CompileError(error("E001", "invalid escape sequence in string", _tok_span(src, tok)))


def _tok_span(src: SourceFile, tok: Token) -> Span:
    return Span(src, tok.start_pos, tok.end_pos)


def _doc_comment(src: SourceFile, start: int) -> str:
    """The `##` comment lines immediately above offset `start` (a fn definition)."""
    line, _ = src.position(start)
    docs: list[str] = []
    ln = line - 1
    while ln >= 1:
        text = src.line_text(ln).strip()
        if text.startswith("##"):
            docs.append(text[2:].strip())
            ln -= 1
        else:
            break
    return " ".join(reversed(docs)).strip()


class _Builder(Transformer):
    def __init__(self, src: SourceFile):
        super().__init__()
        self.src = src

    def _span(self, meta) -> Span:
        return Span(self.src, meta.start_pos, meta.end_pos)

    # ---- items
    @v_args(meta=True)
    def start(self, meta, items):
        span = self._span(meta) if not meta.empty else Span(self.src, 0, 0)
        return ast.Program(span, tuple(items))

    @v_args(meta=True)
    def expr_start(self, meta, items):
        return items[0]

    @v_args(meta=True)
    def model_decl(self, meta, c):
        return ast.ModelDecl(self._span(meta), str(c[0]), c[1])

    @v_args(meta=True)
    def param_decl(self, meta, c):
        learn = bool(c) and isinstance(c[-1], Token) and c[-1].type == "LEARN"
        c = [x for x in c if not (isinstance(x, Token) and x.type == "LEARN")]
        c = c[:2] + [x for x in c[2:] if x is not None]
        lo, hi, log = (c[2], c[3], c[4] if len(c) > 4 else None) if len(c) > 2 else (None, None, None)
        return ast.ParamDecl(self._span(meta), str(c[0]), c[1], lo, hi, log is not None, learn)

    @v_args(meta=True)
    def option_decl(self, meta, c):
        return ast.OptionDecl(self._span(meta), str(c[0]), c[1])

    @v_args(meta=True)
    def import_stmt(self, meta, c):
        return ast.Import(self._span(meta), _unquote(self.src, c[0]))

    @v_args(meta=True)
    def fn_def(self, meta, c):
        name = c[0]
        params = tuple(p for p in c[1:] if isinstance(p, ast.FnParam))
        lets = tuple(x for x in c[1:] if isinstance(x, ast.Let))
        ret = c[-1]
        return ast.FnDef(self._span(meta), str(name), _tok_span(self.src, name), params, lets, ret,
                         _doc_comment(self.src, meta.start_pos))

    @v_args(meta=True)
    def fn_param(self, meta, c):
        return ast.FnParam(self._span(meta), str(c[0]), c[1])

    @v_args(meta=True)
    def let_stmt(self, meta, c):
        return ast.Let(self._span(meta), str(c[0]), c[1])

    @v_args(meta=True)
    def merge_block(self, meta, c):
        adapter, c = c[0] is not None, c[1:]
        names, span = c[0] if c[0] is not None else ((), None)
        return ast.MergeBlock(self._span(meta), str(c[1]), _tok_span(self.src, c[1]), tuple(c[2:]),
                              names, span, adapter)

    @v_args(meta=True)
    def out_name(self, meta, c):
        return (_unquote(self.src, c[0]),), self._span(meta)

    @v_args(meta=True)
    def out_list(self, meta, c):
        return tuple(_unquote(self.src, t) for t in c if t is not None), self._span(meta)

    @v_args(meta=True)
    def rule(self, meta, c):
        return ast.Rule(self._span(meta), c[0], c[1], c[2])

    @v_args(meta=True)
    def glob(self, meta, c):
        text = _unquote(self.src, c[0])
        regex, captures = ast.glob_to_regex(text)
        return ast.Pattern(self._span(meta), "glob", text, regex, captures)

    @v_args(meta=True)
    def regex(self, meta, c):
        text = str(c[0])[3:-1]
        span = self._span(meta)
        try:
            compiled = ast.compile_pattern(text, "regex")
        except ast.PatternError as exc:
            raise CompileError(error("E109", str(exc), span,
                                     "e.g. re\"model\\.layers\\.(?P<i>\\d+)\\..*\"")) from None
        return ast.Pattern(span, "regex", text, text, tuple(compiled.groupindex))

    # ---- expressions
    @v_args(meta=True)
    def if_expr(self, meta, c):
        return ast.IfExpr(self._span(meta), c[0], c[1], c[2])

    @v_args(meta=True)
    def not_(self, meta, c):
        return ast.Unary(self._span(meta), "not", c[0])

    @v_args(meta=True)
    def neg(self, meta, c):
        return ast.Unary(self._span(meta), "neg", c[0])

    @v_args(meta=True)
    def pos(self, meta, c):
        return ast.Unary(self._span(meta), "pos", c[0])

    @v_args(meta=True)
    def call(self, meta, c):
        name = c[0]
        args, kwargs = [], []
        for a in c[1:]:
            if a is None:
                continue
            if isinstance(a, ast.Keyword):
                kwargs.append(a)
            else:
                if kwargs:
                    raise CompileError(error("E001", "positional argument after a keyword argument",
                                             a.span, "put positional arguments first"))
                args.append(a)
        return ast.Call(self._span(meta), str(name), _tok_span(self.src, name), tuple(args), tuple(kwargs))

    @v_args(meta=True)
    def kwarg(self, meta, c):
        return ast.Keyword(self._span(meta), str(c[0]), c[1])

    @v_args(meta=True)
    def index(self, meta, c):
        return ast.Index(self._span(meta), c[0], c[1])

    @v_args(meta=True)
    def number(self, meta, c):
        text = str(c[0])
        span = self._span(meta)
        digits = text.lstrip("0") or "0"
        if re.fullmatch(r"\d+", text):
            if len(digits) > MAX_INT_DIGITS:  # before int(): Python refuses > 4300 digits anyway
                raise CompileError(error("E203", f"integer literal with {len(digits)} digits is out "
                                         f"of range (at most {MAX_INT_DIGITS} digits)", span))
            return ast.Number(span, int(text))
        value = float(text)
        if not math.isfinite(value):
            raise CompileError(error("E203", f"number literal {text[:40]} is out of range of a "
                                     "64-bit float", span))
        return ast.Number(span, value)

    @v_args(meta=True)
    def string(self, meta, c):
        return ast.String(self._span(meta), _unquote(self.src, c[0]))

    @v_args(meta=True)
    def true(self, meta, c):
        return ast.Bool(self._span(meta), True)

    @v_args(meta=True)
    def false(self, meta, c):
        return ast.Bool(self._span(meta), False)

    @v_args(meta=True)
    def none(self, meta, c):
        return ast.NoneLit(self._span(meta))

    @v_args(meta=True)
    def name(self, meta, c):
        return ast.Name(self._span(meta), str(c[0]))

    @v_args(meta=True)
    def list(self, meta, c):
        return ast.ListExpr(self._span(meta), tuple(x for x in c if x is not None))

    @v_args(meta=True)
    def listcomp(self, meta, c):
        return ast.ListComp(self._span(meta), c[0], tuple(c[1:]))

    @v_args(meta=True)
    def comp_for(self, meta, c):
        *names, iter_, cond = c
        return ast.CompFor(self._span(meta), tuple(str(n) for n in names), iter_, cond)


def _binary_rule(op: str):
    @v_args(meta=True)
    def build(self, meta, c):
        return ast.Binary(self._span(meta), op, c[0], c[1])
    return build


for _op in ("or", "and", "eq", "ne", "lt", "le", "gt", "ge", "add", "sub", "mul", "div", "floordiv",
            "mod", "pow"):
    setattr(_Builder, _op + "_" if _op in ("or", "and") else _op, _binary_rule(_op))


def _parse(src: SourceFile, start: str):
    try:
        tree = _parser().parse(src.text, start=start)
    except lark.exceptions.LarkError as exc:
        raise _syntax_error(src, exc) from None
    _check_depth(src, tree)
    try:
        return _Builder(src).transform(tree)
    except lark.exceptions.VisitError as exc:
        if isinstance(exc.orig_exc, CompileError):
            raise exc.orig_exc from None
        raise


#: the deepest nesting of expressions (parentheses, lists, calls, operator chains) a recipe may
#: have: every later stage walks expressions recursively, and real recipes stay below 20
MAX_NESTING = 100


def _check_depth(src: SourceFile, tree: lark.Tree) -> None:
    """E001 when the parse tree nests deeper than MAX_NESTING (an explicit stack: no recursion)."""
    stack: list[tuple[object, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, lark.Tree):
            continue
        if depth > MAX_NESTING:
            meta = node.meta
            start = getattr(meta, "start_pos", None)
            span = Span(src, start, getattr(meta, "end_pos", start)) if start is not None else None
            raise CompileError(error(
                "E001", f"expression nested more than {MAX_NESTING} levels deep", span,
                "split it with `let` in a function, or write a long sum as sum([...]) or a loop"))
        stack.extend((c, depth + 1) for c in node.children)


def parse_program(src: SourceFile) -> ast.Program:
    """Parse a whole recipe; raises CompileError (E001/E109) on the first syntax error."""
    return _parse(src, "start")


def parse_expr(src: SourceFile) -> ast.Expr:
    """Parse a single expression (used by `ml.merge` and `--set` values)."""
    return _parse(src, "expr_start")
