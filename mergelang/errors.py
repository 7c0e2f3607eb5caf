"""Coded errors raised below the compiler (checkpoints, inputs, writers, journals): each carries a
diagnostic code, a message and an optional help line, and becomes a rendered diagnostic where it
reaches the user (the compiler at a model's declaration, `Recipe.run` for output problems)."""

from __future__ import annotations


class CodedError(Exception):
    """An error with a diagnostic `code`, a `message` and an optional `help`."""

    default_code = "E303"

    def __init__(self, message: str, help: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.help = help
        self.code = code or self.default_code


class CheckpointError(CodedError):
    """A problem with a checkpoint file; becomes an E303 diagnostic at the model's declaration."""
