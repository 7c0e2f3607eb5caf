"""The elaborator's context and state (lang/elaborate.py): what an elaboration reads, frozen,
and the evaluation's own mutable state, shared by an elaborator and its views."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from mergelang.diagnostics import Diagnostics, Span
    from mergelang.io.checkpoint import ModelSource
    from mergelang.lang import ast
    from mergelang.lang.values import Value


@dataclass
class Frame:
    fn: str
    call_span: Span
    env: dict[str, Value]
    tag: str = ""  # `iterate`'s round ("#3"): tells model-wide statistics of each round apart


@dataclass(frozen=True)
class ElabContext:
    """What an elaboration reads: the recipe's functions, its models, params and options. The
    compiler builds one per stage (compiler.STAGES): model names only while declarations are
    evaluated (`params` holds the params evaluated so far, `derived` those computed from
    run-time params), the opened models and the output dtype for the merge blocks. `align`
    adds the models it derives to `models` (sources/align/lang.py)."""

    fns: Mapping[str, ast.FnDef]
    models: Mapping[str, ModelSource | None]
    params: Mapping[str, Value]
    diags: Diagnostics
    #: run-time params (tune / learn): name -> its compile-time value, for types only
    runtime: Mapping[str, Value] = field(default_factory=dict)
    #: params whose declaration reads run-time params: their Deferred values
    derived: Mapping[str, Value] = field(default_factory=dict)
    out_dtype: str | None = None
    plugins: Mapping[str, Any] | None = None
    model_spans: Mapping[str, Span] = field(default_factory=dict)


class ElabState:
    """The evaluation's own state (the call stack, the tensor being elaborated, compile-wide
    budgets and caches), shared by an elaborator and its views (loop bodies, recordings)."""

    def __init__(self) -> None:
        self.stack: list[Frame] = []
        self.tensor = ""  # the output tensor being elaborated (`Elaborator.tensor`)
        #: flags that keep an elaboration from becoming a template (lang/templates.py)
        self.name_read = False
        self.no_template = False
        self.recording = False
        #: `let`s evaluated so far (dead ones never are: ast.live_lets)
        self.lets_evaluated = 0
        self.string_chars = 0  # built by `+` on strings (py)
        self.live: dict[int, tuple[ast.FnDef, tuple[ast.Let, ...]]] = {}
        self.checking: set[str] | None = None


