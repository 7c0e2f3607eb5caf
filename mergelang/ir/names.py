"""Tensor names as families: the numeric components of a dotted name (`model.layers.3.mlp.w`)
are what varies within a family of tensors (layers, experts). Used by `explain` (collapsed
listings) and the progress bar (the family being written)."""

from __future__ import annotations

import re

_NUM = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


def template(name: str) -> tuple[str, tuple[int, ...]]:
    """`model.layers.3.mlp.w` -> (`model.layers.{}.mlp.w`, (3,))."""
    nums = tuple(int(m.group()) for m in _NUM.finditer(name))
    return _NUM.sub("{}", name), nums


def family(name: str) -> str:
    """`model.layers.3.mlp.experts.7.w` -> `model.layers.{}.mlp.experts.{}.w`."""
    return _NUM.sub("{}", name)
