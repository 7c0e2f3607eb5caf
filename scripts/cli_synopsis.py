#!/usr/bin/env python3
"""Print the synopsis of every `mergelang` command, generated from the click command group.

    python scripts/cli_synopsis.py

README.md ("Command line") and docs/guide.md (section 2) quote it in a ```` ```text synopsis ````
block; tests/test_doc_commands.py checks that each such block equals this output, so a new
command or option fails the test until the docs are regenerated. Every command also takes
`--debug` (the traceback of an internal error) and `-h/--help`; they are left out here."""

from __future__ import annotations

import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a clone: import this checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

WIDTH = 100
LEFT_OUT = {"--debug", "--help"}
#: click's type names as a shorter placeholder
METAVARS = {"INTEGER RANGE": "N", "INTEGER": "N", "FLOAT": "X", "FLOAT RANGE": "X"}


def _option(param: click.Option, ctx: click.Context) -> str | None:
    if param.hidden or any(o in LEFT_OUT for o in param.opts):
        return None
    record = param.get_help_record(ctx)
    if record is None:
        return None
    first = record[0]
    if " / " in first:  # --fsync / --no-fsync: the form that changes the default
        on, off = (s.strip() for s in first.split(" / "))
        text = off if param.default else on
    else:
        parts = first.split(", ")  # "-o, --output PATH": the first spelling, the metavar
        name = parts[0].split(" ")[0]
        metavar = parts[-1].partition(" ")[2].strip()
        if metavar.startswith("[") and metavar.endswith("]"):
            metavar = metavar[1:-1]
        metavar = METAVARS.get(metavar, metavar)
        if metavar == "TEXT":
            metavar = param.name.upper()
        text = name if param.is_flag else f"{name} {metavar}"
    if param.multiple:
        text += "..." if param.required else ""
        return text if param.required else f"[{text}]..."
    return text if param.required else f"[{text}]"


def _argument(param: click.Argument, ctx: click.Context) -> str:
    meta = param.make_metavar(ctx)
    return meta if param.required else f"[{meta}]"


def command_line(name: str, cmd: click.Command, parent: click.Context) -> str:
    ctx = click.Context(cmd, info_name=name, parent=parent)
    params = cmd.get_params(ctx)
    words = [_argument(p, ctx) for p in params if isinstance(p, click.Argument)]
    opts = [(p, _option(p, ctx)) for p in params if isinstance(p, click.Option)]
    words += [t for p, t in opts if t and p.required] + [t for p, t in opts if t and not p.required]
    head = f"mergelang {name}"
    lines, line = [], head
    indent = " " * (len(head) + 1)
    for w in words:
        if len(line) + 1 + len(w) > WIDTH and line.strip() != head:
            lines.append(line)
            line = indent + w
        else:
            line += " " + w
    lines.append(line)
    return "\n".join(lines)


def synopsis(group: click.Group | None = None) -> str:
    if group is None:
        from mergelang.cli import main as group
    parent = click.Context(group, info_name="mergelang")
    return "\n".join(command_line(n, c, parent) for n, c in group.commands.items() if not c.hidden)


def commands_in(text: str) -> list[str]:
    """The command names a synopsis lists, in order."""
    return re.findall(r"^mergelang ([\w-]+)", text, re.M)


if __name__ == "__main__":
    print(synopsis())
