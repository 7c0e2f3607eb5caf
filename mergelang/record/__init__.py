"""What an output folder records about how it was made: the model card (``README.md``,
card.py) and the provenance in its manifest (manifest.py); `mergelang verify` checks an output
against it (io/verify.py)."""

from __future__ import annotations

from typing import Sequence

#: the command line of this process's `mergelang` command (cli.py sets it), for the card and
#: manifest; None when mergelang is used from Python
COMMAND: list[str] | None = None


def set_command(args: Sequence[object] | None) -> None:
    global COMMAND
    COMMAND = None if args is None else ["mergelang", *(str(a) for a in args)]


def command_text() -> str | None:
    import shlex

    return None if COMMAND is None else shlex.join(COMMAND)
