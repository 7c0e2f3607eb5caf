"""The steps that wrap a recipe's opened models, in the order they wrap: `WRAPPERS`.

Each step takes the models (name -> source, None for one that failed) and returns them, some
wrapped (a wrapper forwards what it does not change to the source it wraps). The order is the
nesting order: a retokenized model wraps the dequantized one. A step marked `after_checks`
needs the recipe's options and runs once the compiler has checked the blocks' models
(compiler.STAGES `wrap_checked`); the others run as soon as the models are open
(`wrap_opened`). A new wrapper is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from mergelang.diagnostics import Diagnostics, warning
from mergelang.io.checkpoint import ModelSource
from mergelang.lang.loader import Unit
from mergelang.sources.fp8 import dequantize_models
from mergelang.sources.outputs import link_outputs
from mergelang.sources.tokenizer import retokenize_models
from mergelang.sources.vocab import resize_models

Models = dict[str, ModelSource | None]


@dataclass(frozen=True)
class WrapContext:
    """What the steps read besides the models."""

    unit: Unit
    diags: Diagnostics
    follow: bool = False  # --follow-symlinks
    options: Any = None  # the recipe's options (RecipeOptions): for `after_checks` steps

    @property
    def spans(self) -> dict[str, Any]:
        """Model name -> its declaration's value (where diagnostics point)."""
        return {d.name: d.value.span for d in self.unit.models}

    @property
    def reference(self) -> str:
        """The (first) merge block's `merge from` model."""
        assert self.unit.block is not None  # `after_checks` steps run once the blocks exist
        return self.unit.block.source


@dataclass(frozen=True)
class Wrapper:
    name: str
    apply: Callable[[Models, WrapContext], Models]
    after_checks: bool = False


def _dequantize(models: Models, ctx: WrapContext) -> Models:
    return dequantize_models(models, ctx.spans, ctx.diags)


def check_architectures(models: Mapping[str, ModelSource | None], spans: Mapping[str, Any],
                        diags: Diagnostics) -> None:
    """W109 for a model whose config.json disagrees with its tensors on layer or expert counts
    (io/architectures.py; header names only)."""
    from mergelang.io.architectures import mismatch

    for label, m in models.items():
        if m is None or m.block_output is not None or m.folder is None:
            continue
        why = mismatch(m.config(), {n: i.shape for n, i in m.tensors().items()})
        if why:
            diags.add(warning("W109", f"model `{label}`: {why}", spans.get(label),
                              "a checkpoint cut or stacked by hand? transformers builds the model "
                              "from config.json"))


def _check_architectures(models: Models, ctx: WrapContext) -> Models:
    check_architectures(models, ctx.spans, ctx.diags)  # a check of the dequantized models
    return models


def _link_outputs(models: Models, ctx: WrapContext) -> Models:
    link_outputs(ctx.unit, models, ctx.diags)
    return models


def _retokenize(models: Models, ctx: WrapContext) -> Models:
    opts = ctx.options
    if opts.tokenizer_source is None:
        return models
    span = next((d.value.span for d in ctx.unit.options if d.name == "tokenizer_source"), None)
    return retokenize_models(models, ctx.reference, opts.tokenizer_source, opts.pad_to_multiple_of,
                             opts.chat_template, ctx.diags, span, ctx.follow)


def _resize_vocab(models: Models, ctx: WrapContext) -> Models:
    if ctx.options.tokenizer_source is not None or not ctx.options.resize_vocab:
        return models  # a tokenizer_source maps the vocabularies instead
    return resize_models(models, ctx.reference, ctx.diags)


#: the steps, in wrapping order
WRAPPERS: tuple[Wrapper, ...] = (
    Wrapper("dequantize", _dequantize),  # block-scaled FP8 (sources/fp8.py)
    Wrapper("check_architectures", _check_architectures),  # W109, wraps nothing
    Wrapper("link_outputs", _link_outputs),  # `output("NAME")` models (sources/outputs.py)
    Wrapper("retokenize", _retokenize, after_checks=True),  # tokenizer_source (sources/tokenizer.py)
    Wrapper("resize_vocab", _resize_vocab, after_checks=True),  # resize_vocab (sources/vocab.py)
)


def apply_wrappers(models: Models, ctx: WrapContext, after_checks: bool) -> Models:
    """The models after the steps of WRAPPERS with this `after_checks`, in order."""
    for w in WRAPPERS:
        if w.after_checks == after_checks:
            models = w.apply(models, ctx)
    return models
