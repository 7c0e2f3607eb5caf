"""Compile-time values of the elaborator, and call signatures shared by functions and intrinsics.

Scalars, strings and lists of them are evaluated in Python at compile time (float64), so that
`t = i / 31`, weight lists and guards cost nothing at run time; a value becomes a graph node only
when it meets a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class ListV:
    items: tuple["Value", ...]

    def describe(self) -> str:
        return f"a list of {len(self.items)}"

    @property
    def scalars(self) -> bool:
        return all(isinstance(i, Const) and _is_number(i.value) for i in self.items)


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
    return isinstance(v, (int, float))  # bools count: they multiply like 0/1


def is_number(v: Value) -> bool:
    return isinstance(v, Const) and isinstance(v.value, (int, float)) and not isinstance(v.value, bool)


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
