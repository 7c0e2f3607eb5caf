"""The recipe AST: frozen dataclasses, every node carrying the :class:`Span` it came from."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Mapping, Union

from mergelang.diagnostics import Span


@dataclass(frozen=True)
class Node:
    span: Span = field(repr=False, compare=False)


# ---------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Number(Node):
    value: int | float


@dataclass(frozen=True)
class String(Node):
    value: str


@dataclass(frozen=True)
class Bool(Node):
    value: bool


@dataclass(frozen=True)
class NoneLit(Node):
    pass


@dataclass(frozen=True)
class Name(Node):
    id: str


@dataclass(frozen=True)
class ListExpr(Node):
    items: tuple["Expr", ...]


@dataclass(frozen=True)
class Unary(Node):
    op: str  # "neg" | "pos" | "not"
    operand: "Expr"


@dataclass(frozen=True)
class Binary(Node):
    op: str  # add sub mul div floordiv mod pow eq ne lt le gt ge and or
    left: "Expr"
    right: "Expr"


@dataclass(frozen=True)
class IfExpr(Node):
    cond: "Expr"
    then: "Expr"
    else_: "Expr"


@dataclass(frozen=True)
class Keyword(Node):
    name: str
    value: "Expr"


@dataclass(frozen=True)
class Call(Node):
    func: str
    func_span: Span = field(repr=False, compare=False)
    args: tuple["Expr", ...]
    kwargs: tuple[Keyword, ...]


@dataclass(frozen=True)
class Index(Node):
    target: "Expr"
    index: "Expr"


@dataclass(frozen=True)
class CompFor(Node):
    """One clause of a list comprehension: `for a, b in iter if cond`."""

    targets: tuple[str, ...]
    iter: "Expr"
    cond: "Expr | None" = None


@dataclass(frozen=True)
class ListComp(Node):
    """`[elt for x in xs if cond ...]`: a list built at compile time (lang/comprehend.py)."""

    elt: "Expr"
    clauses: tuple[CompFor, ...]


Expr = Union[Number, String, Bool, NoneLit, Name, ListExpr, ListComp, Unary, Binary, IfExpr, Call, Index]

BINARY_SYMBOLS = {
    "add": "+", "sub": "-", "mul": "*", "div": "/", "floordiv": "//", "mod": "%", "pow": "**",
    "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "and": "and", "or": "or",
}


# ---------------------------------------------------------------- patterns
@dataclass(frozen=True)
class Pattern(Node):
    """A tensor-name pattern: a glob with `{name}` integer captures, or a regex `re"..."`."""

    kind: str  # "glob" | "regex"
    text: str
    regex: str  # the compiled form (full match)
    captures: tuple[str, ...]

    def match(self, name: str) -> dict[str, int | str] | None:
        m = compile_pattern(self.regex, self.kind).fullmatch(name)
        if m is None:
            return None
        out: dict[str, int | str] = {}
        for key, value in m.groupdict().items():
            if value is None:
                continue
            v: int | str = int(value) if value.isdigit() else value
            base, dup, _ = key.partition(REPEAT)
            if dup:  # a capture named twice in a glob: both places must hold the same number
                if out.get(base, v) != v:
                    return None
                continue
            out[key] = v
        return out


#: a glob capture used twice, `{i}.x.{i}`, becomes groups `i` and `i__again_2` compared after
#: matching (the linear-time engine has no backreferences)
REPEAT = "__again_"
#: a glob with at most this many wildcards runs on Python's `re` (its generated regex has no
#: nested quantifiers, and a handful of `.*` stays fast); user regexes and wilder globs run on
#: RE2, whose matching time is linear in the name's length whatever the pattern
FAST_GLOB_WILDCARDS = 4
_REGEX_CACHE: dict[tuple[str, str], object] = {}


class PatternError(ValueError):
    """A regex the linear-time engine cannot compile (syntax, lookaround, backreference)."""


def compile_pattern(regex: str, kind: str = "regex"):
    """The compiled matcher of a pattern's regex (cached): RE2 for user regexes and globs with
    many wildcards, Python's `re` for simple globs. Raises PatternError."""
    key = (regex, kind)
    pat = _REGEX_CACHE.get(key)
    if pat is None:
        if kind == "glob" and regex.count(".*") + regex.count("\\d+") <= FAST_GLOB_WILDCARDS:
            pat = re.compile(regex)
        else:
            pat = _re2(regex)
        _REGEX_CACHE[key] = pat
    return pat


def _re2(regex: str):
    import re2

    opts = re2.Options()
    opts.log_errors = False
    try:
        return re2.compile(regex, opts)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        try:
            re.compile(regex)
        except re.error:
            raise PatternError(f"invalid regular expression: {reason}") from None
        raise PatternError(f"this regular expression needs a feature mergelang does not run "
                           f"({reason}): patterns are matched in linear time (RE2 syntax), "
                           "without lookarounds or backreferences") from None


_CAPTURE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def glob_to_regex(text: str) -> tuple[str, tuple[str, ...]]:
    """`model.layers.{i}.*` -> `model\\.layers\\.(?P<i>\\d+)\\..*`; `*` spans dots, `?` one char."""
    out: list[str] = []
    captures: list[str] = []
    pos = 0
    for m in _CAPTURE.finditer(text):
        out.append(_glob_chunk(text[pos : m.start()]))
        name = m.group(1)
        if name in captures:
            repeats = sum(1 for c in out if f"(?P<{name}{REPEAT}" in c) + 2
            out.append(f"(?P<{name}{REPEAT}{repeats}>\\d+)")
        else:
            captures.append(name)
            out.append(f"(?P<{name}>\\d+)")
        pos = m.end()
    out.append(_glob_chunk(text[pos:]))
    return "".join(out), tuple(captures)


def _glob_chunk(chunk: str) -> str:
    parts = []
    for ch in chunk:
        if ch == "*":
            parts.append(".*")
        elif ch == "?":
            parts.append(".")
        else:
            parts.append(re.escape(ch))
    return "".join(parts)


# ---------------------------------------------------------------- statements and items
@dataclass(frozen=True)
class Let(Node):
    name: str
    value: Expr


@dataclass(frozen=True)
class FnParam(Node):
    name: str
    default: Expr | None


@dataclass(frozen=True)
class FnDef(Node):
    name: str
    name_span: Span = field(repr=False, compare=False)
    params: tuple[FnParam, ...]
    lets: tuple[Let, ...]
    ret: Expr
    doc: str = ""


@dataclass(frozen=True)
class ModelDecl(Node):
    name: str
    value: Expr


@dataclass(frozen=True)
class ParamDecl(Node):
    name: str
    value: Expr
    #: `param x = 0.3 in [LO, HI]` (`log`: log-uniform for `tune`); None without a range
    lo: Expr | None = None
    hi: Expr | None = None
    log: bool = False
    #: `param x = v learn`: a coefficient `learn` fits by gradient descent
    learn: bool = False


@dataclass(frozen=True)
class OptionDecl(Node):
    name: str
    value: Expr


@dataclass(frozen=True)
class Import(Node):
    path: str


@dataclass(frozen=True)
class Rule(Node):
    pattern: Pattern
    guard: Expr | None
    expr: Expr


@dataclass(frozen=True)
class MergeBlock(Node):
    source: str
    source_span: Span = field(repr=False, compare=False)
    rules: tuple[Rule, ...]
    #: output names (`merge "a" from ...`, `merge ["a", "b"] from ...`); () for the unnamed block
    outputs: tuple[str, ...] = ()
    outputs_span: Span | None = field(default=None, repr=False, compare=False)
    #: `merge adapter ["NAME"] from M { ... }`: writes a PEFT LoRA adapter (io/adapter.py)
    adapter: bool = False


Item = Union[ModelDecl, ParamDecl, OptionDecl, Import, FnDef, MergeBlock]


@dataclass(frozen=True)
class Program(Node):
    items: tuple[Item, ...]

    def of(self, kind: type) -> list:
        return [it for it in self.items if isinstance(it, kind)]


# ---------------------------------------------------------------- printing (--emit ast)
def dump(node: object, indent: int = 0) -> str:
    """A stable, indented S-expression rendering of an AST (spans as line:col)."""
    pad = "  " * indent
    if isinstance(node, Node):
        head = f"{pad}({type(node).__name__} @{node.span.line}:{node.span.col}"
        scalars, children = [], []
        for f in fields(node):
            if f.name in ("span", "func_span", "name_span", "source_span", "regex", "outputs_span"):
                continue
            value = getattr(node, f.name)
            if isinstance(value, Node) or (isinstance(value, tuple) and value and isinstance(value[0], Node)):
                children.append((f.name, value))
            elif isinstance(value, tuple) and not value:
                continue
            elif value is None or value == "":
                continue
            else:
                scalars.append(f"{f.name}={value!r}")
        if scalars:
            head += " " + " ".join(scalars)
        lines = [head]
        for name, value in children:
            lines.append(f"{pad}  :{name}")
            items = value if isinstance(value, tuple) else (value,)
            for item in items:
                lines.append(dump(item, indent + 2))
        return "\n".join(lines) + ")"
    return f"{pad}{node!r}"


def walk(e: object):
    """Every AST node inside `e` (itself included; nodes, tuples and lists of them), spans
    skipped: the one traversal the name and call queries below share."""
    stack = [e]
    while stack:
        x = stack.pop()
        if isinstance(x, Node):
            yield x
            stack.extend(getattr(x, f.name) for f in fields(x) if f.name != "span")
        elif isinstance(x, (tuple, list)):
            stack.extend(x)


def names_in(e: object) -> frozenset[str]:
    """The variable names an expression reads (Name ids, anywhere in it)."""
    return frozenset(x.id for x in walk(e) if isinstance(x, Name))


def expr_names(e: Node) -> set[str]:
    """The names (`Name.id`) an expression reads, anywhere inside it."""
    return set(names_in(e))


def expr_calls(e: object) -> set[str]:
    """The functions (`Call.func`) an expression (or a program) calls, anywhere inside it."""
    return {x.func for x in walk(e) if isinstance(x, Call)}


#: the intrinsics whose only purpose may be a check (a `let` calling one is kept even unused)
CHECKS = frozenset({"fail", "checked"})


def checking_fns(fns: Mapping[str, FnDef]) -> set[str]:
    """The names of functions that may stop the compilation with a check: they call `fail` or
    `checked`, or such a function (a fixed point over the call graph)."""
    calls = {name: set().union(*(expr_calls(x) for x in (*(p.default for p in fn.params
                                                             if p.default is not None),
                                                          *(let.value for let in fn.lets), fn.ret)))
             for name, fn in fns.items()}
    out = {n for n, c in calls.items() if c & CHECKS}
    grew = True
    while grew:
        grew = False
        for n, c in calls.items():
            if n not in out and c & out:
                out.add(n)
                grew = True
    return out


def live_lets(fn: FnDef, checking: set[str] | frozenset[str] = frozenset()) -> tuple[Let, ...]:
    """The `let`s of `fn` to evaluate, in order: those its result depends on, and those that
    check something (call `fail`, `checked` or a function in `checking`: `let d =
    _fraction(density, "density")` validates even when `d` is unused), with what they depend
    on. A let's name is unique in its function (resolve.py reports E106). The others are never
    evaluated: 5000 unused lets cost nothing per call (they are still resolved: names,
    recursion)."""
    need = expr_names(fn.ret)
    live: list[Let] = []
    for let in reversed(fn.lets):
        if let.name in need or expr_calls(let.value) & (CHECKS | checking):
            live.append(let)
            need |= expr_names(let.value)
    return tuple(reversed(live))
