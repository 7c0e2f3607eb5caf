"""Compile-time values of the elaborator, and call signatures shared by functions and intrinsics.

Scalars, strings and lists of them are evaluated in Python at compile time (float64), so that
`t = i / 31`, weight lists and guards cost nothing at run time; a value becomes a graph node only
when it meets a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from mergelang.diagnostics import Span

REQUIRED: Any = object()  # marks a parameter without a default


@dataclass(frozen=True)
class Const:
    """A number, bool, string or none known at compile time."""

    value: Any

    def describe(self) -> str:
        v = self.value
        if v is None:
            return "none"
        if isinstance(v, bool):
            return "a bool"
        if isinstance(v, str):
            return "a string"
        return "a number"


#: bounds on compile-time values (a bound on work and memory: `param s1 = s0 + s0` doubled 31
#: times is 2 GB; lists of lists sharing their items grow as 2**depth when written out)
MAX_STRING_CHARS = 1 << 20
MAX_LIST_DEPTH = 32
MAX_LIST_ELEMENTS = 100_000
MAX_LIST_CHARS = 16 << 20
#: bounds on all of a recipe's compile-time values together (the params recorded in the
#: manifest and the recipe copy; every string a compilation builds)
MAX_TOTAL_ELEMENTS = 1_000_000
MAX_TOTAL_CHARS = 64 << 20


@dataclass(frozen=True)
class ListV:
    items: tuple["Value", ...]
    #: nesting depth, elements at every level counted with repetition, characters of its strings
    depth: int = field(default=1, init=False, compare=False, repr=False)
    elements: int = field(default=0, init=False, compare=False, repr=False)
    chars: int = field(default=0, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        depth, n, chars = 1, len(self.items), 0
        for i in self.items:
            if isinstance(i, ListV):
                depth, n, chars = max(depth, i.depth + 1), n + i.elements, chars + i.chars
            elif isinstance(i, Const) and isinstance(i.value, str):
                chars += len(i.value)
        object.__setattr__(self, "depth", depth)
        object.__setattr__(self, "elements", n)
        object.__setattr__(self, "chars", chars)

    def too_big(self) -> str | None:
        """Why this list exceeds the compile-time bounds, or None."""
        if self.depth > MAX_LIST_DEPTH:
            return f"it nests {self.depth} levels deep (at most {MAX_LIST_DEPTH})"
        if self.elements > MAX_LIST_ELEMENTS:
            return (f"it holds {self.elements} elements counting every level (at most "
                    f"{MAX_LIST_ELEMENTS})")
        if self.chars > MAX_LIST_CHARS:
            return f"its strings hold {self.chars} characters (at most {MAX_LIST_CHARS})"
        return None

    def describe(self) -> str:
        return f"a list of {len(self.items)}"

    @property
    def scalars(self) -> bool:
        return all(isinstance(i, Const) and _is_number(i.value) for i in self.items)


def too_big(v: Any) -> str | None:
    """Why a value exceeds the compile-time bounds (a `--set` / Python override), or None."""
    if isinstance(v, ListV):
        return v.too_big()
    if isinstance(v, Const) and isinstance(v.value, str) and len(v.value) > MAX_STRING_CHARS:
        return f"a string of {len(v.value)} characters (at most {MAX_STRING_CHARS})"
    return None


def add_size(held: tuple[int, int], v: Any) -> tuple[tuple[int, int], str | None]:
    """`held` (elements, characters of the params so far) plus value `v`'s, and why the total
    exceeds MAX_TOTAL_ELEMENTS / MAX_TOTAL_CHARS (every param is recorded in the manifest)."""
    size = (v.elements, v.chars) if isinstance(v, ListV) else (
        1, len(v.value) if isinstance(v, Const) and isinstance(v.value, str) else 0)
    total = (held[0] + size[0], held[1] + size[1])
    if total[0] > MAX_TOTAL_ELEMENTS or total[1] > MAX_TOTAL_CHARS:
        return total, (f"the params' values exceed {MAX_TOTAL_ELEMENTS} elements or "
                       f"{MAX_TOTAL_CHARS} characters in all (each is recorded in the manifest)")
    return total, None


@dataclass(frozen=True)
class ModelV:
    """A whole checkpoint; in tensor context it stands for the tensor being merged."""

    name: str
    span: Span

    def describe(self) -> str:
        return f"the model `{self.name}`"


@dataclass(frozen=True)
class TensorV:
    nid: int

    def describe(self) -> str:
        return "a tensor"


Value = Union[Const, ListV, ModelV, TensorV]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, Deferred))  # bools count: they multiply like 0/1


def is_number(v: Value) -> bool:
    return isinstance(v, Const) and isinstance(v.value, (int, float, Deferred)) and not isinstance(v.value, bool)


class Deferred:
    """The number of a run-time param (tune, learn), or compile-time arithmetic on it: a small
    expression evaluated in Python when the param's value is given (passes/params.py), exactly
    as the compiler would have folded it. Anything that needs the number itself while
    compiling (an `if`, a comparison, a count) is a compile error (E201): such a param cannot
    be a run-time input (search/trials.split_runtime makes it static)."""

    __slots__ = ("tree",)

    def __init__(self, tree: tuple):
        self.tree = tree  # ("p", name, path) | ("op", name, a, b) | ("f", fn, a) | ("c", number)

    @staticmethod
    def leaf(x: Any) -> tuple:
        return x.tree if isinstance(x, Deferred) else ("c", x)

    def _op(self, name: str, other: Any, swap: bool = False) -> "Deferred":
        if not isinstance(other, (int, float, Deferred)) or isinstance(other, bool):
            return NotImplemented  # type: ignore[return-value]
        a, b = (Deferred.leaf(other), self.tree) if swap else (self.tree, Deferred.leaf(other))
        return Deferred(("op", name, a, b))

    def __add__(self, o: Any) -> "Deferred": return self._op("add", o)
    def __radd__(self, o: Any) -> "Deferred": return self._op("add", o, True)
    def __sub__(self, o: Any) -> "Deferred": return self._op("sub", o)
    def __rsub__(self, o: Any) -> "Deferred": return self._op("sub", o, True)
    def __mul__(self, o: Any) -> "Deferred": return self._op("mul", o)
    def __rmul__(self, o: Any) -> "Deferred": return self._op("mul", o, True)
    def __truediv__(self, o: Any) -> "Deferred": return self._op("div", o)
    def __rtruediv__(self, o: Any) -> "Deferred": return self._op("div", o, True)
    def __pow__(self, o: Any) -> "Deferred": return self._op("pow", o)
    def __rpow__(self, o: Any) -> "Deferred": return self._op("pow", o, True)
    def __neg__(self) -> "Deferred": return Deferred(("op", "sub", ("c", 0), self.tree))
    def __pos__(self) -> "Deferred": return self

    def call(self, fn: Any) -> "Deferred":
        """fn(value), evaluated with the value (a unary compile-time function)."""
        return Deferred(("f", fn, self.tree))

    def _read(self, *a: Any) -> Any:
        from mergelang.diagnostics import CompileError, error

        raise CompileError(error("E201", f"{self.describe()} is needed while compiling (a "
                                 "comparison, an `if`, a count or a shape reads it)", None,
                                 "a run-time param (tune, learn) can only scale or mix tensors"))

    __float__ = __int__ = __index__ = __bool__ = __lt__ = __le__ = __gt__ = __ge__ = _read
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __round__ = _read

    def __eq__(self, o: Any) -> bool:
        if isinstance(o, Deferred):
            return o.tree == self.tree
        return self._read()

    def __ne__(self, o: Any) -> bool:
        return not self.__eq__(o)

    def __hash__(self) -> int:
        return hash(self.tree)

    def __abs__(self) -> "Deferred":
        return self.call(abs)

    def names(self) -> set[str]:
        from mergelang.ir.paramexpr import names

        return names(self.tree)

    def describe(self) -> str:
        return "run-time param " + ", ".join(f"`{n}`" for n in sorted(self.names()))

    def __repr__(self) -> str:
        from mergelang.ir.paramexpr import render

        return render(self.tree)



@dataclass(frozen=True)
class Param:
    name: str
    default: Any = REQUIRED  # a Python value (intrinsics) or an ast.Expr (recipe functions)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Signature:
    name: str
    params: tuple[Param, ...]
    doc: str = ""

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def render(self) -> str:
        parts = []
        for p in self.params:
            if p.required:
                parts.append(p.name)
            elif hasattr(p.default, "span"):
                parts.append(f"{p.name} = {p.default.span.text}")
            else:
                parts.append(f"{p.name} = {_py(p.default)}")
        return f"{self.name}({', '.join(parts)})"


def _py(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


class Poisoned(Exception):
    """Evaluation touched a model that failed to open (already reported): skip silently."""


@dataclass(frozen=True)
class LowRank:
    """`low_rank(delta, rank)`: the nodes of a LoRA pair (A: r x in, B: out x r, B @ A the best
    rank-r approximation of delta); `embedding`: decomposed transposed (lora_embedding_A/B)."""

    a: int
    b: int
    rank: int
    embedding: bool = False
