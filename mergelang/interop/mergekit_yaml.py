"""Reading a mergekit YAML config safely: bounded, regular files only, bounded YAML.

- `read_config_text`: a regular file (not a device, FIFO or folder: `/dev/zero` never ends, a FIFO
  blocks) of at most MAX_CONFIG_BYTES (512 KiB), read by the one bounded reader (io/textfile.py);
  anything else is E701 at once.
- `load_yaml`: PyYAML's safe loader (libyaml's parser) with bounds: nesting depth (MAX_DEPTH), the size of the
  document once every alias is expanded (MAX_NODES: a "billion laughs" file is refused before
  anything walks it) and the digits of a number (MAX_DIGITS). Every refusal is E701.
- `short`: a config value for a message, cut to a few dozen characters (a message never prints
  a whole expanded value).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from mergelang.diagnostics import MergelangError, error

#: real configs are a few kilobytes (a frankenmerge of 100 slices ~15 KB); the bound keeps the
#: worst file (one flat list of ~170k numbers) to seconds of YAML parsing
MAX_CONFIG_BYTES = 512 * 1024
#: nested mappings/lists: mergekit configs nest about 6 deep
MAX_DEPTH = 64
#: nodes of the document with every alias expanded (a config has hundreds)
MAX_NODES = 200_000
#: digits of an integer scalar (YAML ints are read with Python's int(): 4300 digits is its limit)
MAX_DIGITS = 64
MESSAGE_CHARS = 60


def short(v: Any, limit: int = MESSAGE_CHARS) -> str:
    """repr(v), cut to `limit` characters. Walks at most `limit` items, so a value that shares
    its parts many times over (YAML aliases) costs nothing."""
    text = _bounded_repr(v, limit + 1, 0)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _bounded_repr(v: Any, budget: int, depth: int) -> str:
    if depth > 8:
        return "..."
    if isinstance(v, (list, tuple)):
        parts, used = [], 1
        for x in v:
            if used > budget:
                parts.append("...")
                break
            p = _bounded_repr(x, budget - used, depth + 1)
            parts.append(p)
            used += len(p) + 2
        return "[" + ", ".join(parts) + "]"
    if isinstance(v, dict):
        parts, used = [], 1
        for k, x in v.items():
            if used > budget:
                parts.append("...")
                break
            p = f"{_bounded_repr(k, budget - used, depth + 1)}: {_bounded_repr(x, budget - used, depth + 1)}"
            parts.append(p)
            used += len(p) + 2
        return "{" + ", ".join(parts) + "}"
    if isinstance(v, str):
        return repr(v[:budget + 2])[:budget + 2] if len(v) > budget else repr(v)
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 10 ** 30:
        return "<a number too large to print>"
    return repr(v)[:budget + 2]


def read_config_text(path: Path) -> str:
    """The text of a config file, read by the one bounded reader (io/textfile.py); E701 for a
    folder, device, FIFO, a file over MAX_CONFIG_BYTES, or bytes that are not UTF-8."""
    from mergelang.io.textfile import read_bytes

    try:
        if "\0" in str(path):
            raise ValueError("the path contains a NUL character")
        return read_bytes(path, MAX_CONFIG_BYTES).decode("utf-8")
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(exc, UnicodeDecodeError):
            reason = "it is not UTF-8 text"
        raise MergelangError(error("E701", f"cannot read {path}: {reason}", None,
                                   "give a mergekit YAML config file")) from None


class _Refused(yaml.YAMLError):
    pass


class BoundedLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe loader (libyaml's parser when PyYAML has it: ~20x faster than the pure-Python
    one) with a depth and an expanded-size bound checked on the composed nodes before anything
    is constructed, and a digit bound on integers."""

    def construct_document(self, node: Any) -> Any:
        _check_size(node)
        return super().construct_document(node)

    def construct_yaml_int(self, node: Any) -> Any:
        digits = sum(ch.isdigit() for ch in str(node.value))
        if digits > MAX_DIGITS:
            raise _Refused(f"a number with {digits} digits (line {node.start_mark.line + 1}); "
                           f"at most {MAX_DIGITS} are read")
        return super().construct_yaml_int(node)


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)


def _check_size(root: Any) -> None:
    """The node count of the document with every alias expanded (shared nodes counted once per
    use), computed once per distinct node: refused over MAX_NODES."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()  # nodes whose descendants are being counted
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        if len(visiting) > MAX_DEPTH:
            raise _Refused(f"it nests more than {MAX_DEPTH} levels deep")
        node, done = stack.pop()
        if id(node) in sizes and not done:
            continue
        if not done and id(node) in visiting:
            raise _Refused("a YAML alias refers to a value that contains it (a cycle)")
        kids: list[Any] = []
        if isinstance(node, yaml.SequenceNode):
            kids = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            kids = [x for pair in node.value for x in pair]
        if not done:
            visiting.add(id(node))
            stack.append((node, True))
            stack += [(k, False) for k in kids if id(k) not in sizes]
            continue
        visiting.discard(id(node))
        total = 1 + sum(sizes.get(id(k), 1) for k in kids)
        sizes[id(node)] = total
        if total > MAX_NODES:
            raise _Refused(f"it expands to more than {MAX_NODES} values (YAML aliases that repeat "
                           "a value many times over?)")


def _flow_depth(text: str) -> int:
    """The deepest nesting of flow collections (`[`, `{`) in `text`, quoted scalars and comments
    skipped: PyYAML's scanner looks ahead over a whole nested flow collection before the
    composer sees its first level, so a deep one is refused before PyYAML reads it."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return 0
    depth = deepest = 0
    quote = ""
    prev = "\n"
    for ch in re.sub(r"[^][{}'\"# \t\n]+", "x", text):  # runs of other characters: one
        if quote:
            if ch == quote or (ch == "\n" and quote == "#"):
                quote = ""
        elif ch in "'\"" or (ch == "#" and prev in " \t\n"):
            quote = "#" if ch == "#" else ch
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
        prev = ch
    return deepest


def load_yaml(text: str, where: str) -> Any:
    """The config; a list of configs for a multi-document (mergekit-multi) file."""
    if _flow_depth(text) > MAX_DEPTH:
        raise MergelangError(error("E701", f"cannot parse {where}: it nests more than {MAX_DEPTH} "
                                   "levels deep", None, "a mergekit config is a small YAML mapping"))
    try:
        docs = [d for d in yaml.load_all(text, Loader=BoundedLoader) if d is not None]
    except _Refused as exc:
        raise MergelangError(error("E701", f"cannot parse {where}: {exc}", None,
                                   "a mergekit config is a small YAML mapping")) from None
    except yaml.YAMLError as exc:
        raise MergelangError(error("E701", f"cannot parse {where}: {_yaml_message(exc)}")) from None
    except RecursionError:
        raise MergelangError(error("E701", f"cannot parse {where}: it nests too deep")) from None
    return docs[0] if len(docs) == 1 else docs


def _yaml_message(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 600 else text[:597] + "..."
