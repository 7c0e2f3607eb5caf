"""Validated run options (pydantic at the boundary): recipe `option` lines, CLI flags, API kwargs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, ValidationError, field_validator

from mergelang.ir.types import ALIASES, OUTPUT_DTYPES

DEFAULT_SHARD_SIZE = 5 * 1000**3  # 5 GB, as transformers' save_pretrained


class RecipeOptions(BaseModel):
    """Options a recipe may set with `option NAME = VALUE` (and the CLI may override)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: str | None = None  # output dtype; default: each tensor keeps the reference model's dtype
    shard_size: ByteSize = ByteSize(DEFAULT_SHARD_SIZE)
    copy_files: bool = True  # copy config.json, tokenizer and other small files from the reference
    resize_vocab: bool = False  # truncate/pad other models' embeddings to the reference's vocab
    nan_check: Literal["error", "warn", "off"] = "error"  # NaN/Inf in an input or output tensor
    # the dtype a merge's arithmetic runs in (inputs are upcast to it on load)
    compute_dtype: Literal["float32", "float64"] = "float32"
    # the output's tokenizer, as mergekit's tokenizer_source: "base" (the `merge from` model's),
    # "union" (every model's tokens) or a model's name; every model's embedding and lm_head rows
    # are then mapped by token to it (sources/tokenizer.py). None: rows are merged as stored
    tokenizer_source: str | None = None
    pad_to_multiple_of: int | None = None  # pad the output vocabulary (rows: the mean embedding)
    chat_template: str | None = None  # a Jinja template, or "auto" (the models' most common)
    # merge checkpoints whose config.json name different architectures (E709 otherwise), as
    # mergekit's --allow-crimes
    allow_crimes: bool = False

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _pad(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("pad_to_multiple_of must be a positive integer")
        return v

    @field_validator("compute_dtype", mode="before")
    @classmethod
    def _compute(cls, v: Any) -> Any:
        return ALIASES.get(v, v) if isinstance(v, str) else v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return None
        name = ALIASES.get(v, v)
        if name not in OUTPUT_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)} (or bf16, fp16, fp32)")
        return name

    @field_validator("shard_size")
    @classmethod
    def _positive(cls, v: ByteSize) -> ByteSize:
        if v <= 0:
            raise ValueError("shard_size must be positive")
        return v


def option_names() -> list[str]:
    return list(RecipeOptions.model_fields)


def validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def validate(values: dict[str, Any]) -> RecipeOptions:
    return RecipeOptions(**values)
