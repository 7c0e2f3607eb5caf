"""The intrinsics registry: name -> signature and implementation.

Members of `mergelang.lang.intrinsics` (core, layers, linalg, stats) and of `mergelang.sources`
(lora, stack_layers, layer_range, align) add themselves with the `@intrinsic` decorator when
their package imports them; the packages' `__init__` files list their members explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from mergelang.diagnostics import Span
from mergelang.lang.values import Param, Signature, Value

Impl = Callable[[Any, dict[str, Value], Span], Value]


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
