"""The intrinsics registry: name -> signature and implementation.

Members of `mergelang.lang.intrinsics` (core, layers, linalg, stats) and of `mergelang.sources`
(lora, stack_layers, layer_range, align) add themselves with the `@intrinsic` decorator when
their package imports them; the packages' `__init__` files list their members explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

from mergelang.diagnostics import CompileError, Span
from mergelang.lang.values import Param, Signature, Value

if TYPE_CHECKING:
    from mergelang.io.checkpoint import ModelSource
    from mergelang.ir.graph import MergeGraph
    from mergelang.ir.ops import Attrs, Op


class Elab(Protocol):
    """What an intrinsic may use of the elaborator (`lang/elaborate.Elaborator` implements it):
    the graph being built, the models, the output tensor being elaborated, the call stack, node
    construction and diagnostics. Intrinsics take it as their first argument."""

    graph: "MergeGraph"
    models: "Mapping[str, ModelSource | None]"
    fns: Mapping[str, Any]
    tensor: str
    stack: Sequence[Any]

    def error(self, code: str, message: str, span: Span, help: str | None = None) -> CompileError: ...

    def to_node(self, v: Value, span: Span) -> int: ...

    def load(self, model: str, tensor: str, span: Span, raw: bool = False) -> int: ...

    def make(self, op: "Op", args: list[int], attrs: "Attrs", span: Span) -> int: ...

    def binop(self, op: str, a: Value, b: Value, span: Span) -> Value: ...

    def unary(self, op: "Op", v: Value, span: Span, py: Callable[[float], float] | None = None,
              **attrs: Any) -> Value: ...

    def apply(self, fn: Any, given: dict[str, Value], span: Span, tag: str = "") -> Value: ...


Impl = Callable[[Elab, dict[str, Value], Span], Value]


@dataclass(frozen=True)
class Intrinsic:
    sig: Signature
    impl: Impl


INTRINSICS: dict[str, Intrinsic] = {}


def intrinsic(name: str, *params: str | tuple[str, Any], doc: str = "") -> Callable[[Impl], Impl]:
    def deco(fn: Impl) -> Impl:
        ps = tuple(Param(p) if isinstance(p, str) else Param(p[0], p[1]) for p in params)
        INTRINSICS[name] = Intrinsic(Signature(name, ps, doc), fn)
        return fn
    return deco
