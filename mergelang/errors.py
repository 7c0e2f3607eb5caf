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


class CodedIOError(CodedError):
    """An output or work-folder problem raised as `(code, message, help)`: the writer's E403 /
    E502 / E506 and the journal's E504 / E505 / E507."""

    def __init__(self, code: str, message: str, help: str | None = None):
        super().__init__(message, help, code)


def to_diagnostic(exc: CodedError, span=None):
    """The one conversion of a coded error into a diagnostic (the API and the CLI use it)."""
    from mergelang.diagnostics import error

    return error(exc.code, str(exc), span, exc.help)
