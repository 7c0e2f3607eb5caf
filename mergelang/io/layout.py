"""The output layout: which tensor goes in which shard, at which byte offset, planned from names,
shapes and dtypes alone (no tensor data), so that every shard can be created at its final size
before any tensor exists (writer.py fills them in)."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from mergelang.ir.types import ITEMSIZE, NAME_TO_ST, torch_dtype

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output checkpoint: name, shape and torch dtype name (e.g. "bfloat16")."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.dtype not in NAME_TO_ST:
            raise ValueError(f"unsupported output dtype {self.dtype!r} for {self.name!r}")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"negative dimension in shape {self.shape} of {self.name!r}")

    def renamed(self, name: str) -> "OutputTensor":
        return OutputTensor(name, self.shape, self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class ShardFile:
    """One planned shard file: its tensors in file order, its exact header bytes and offsets."""

    filename: str
    tensors: tuple[OutputTensor, ...]
    header: bytes  # 8-byte length prefix + space-padded JSON header
    offsets: dict[str, tuple[int, int]]  # absolute (begin, end) byte offsets in the file
    size: int  # total file size in bytes


@dataclass(frozen=True)
class ShardLayout:
    """The planned output: every shard file, in order."""

    shards: tuple[ShardFile, ...]
    #: write (and verify) model.safetensors.index.json; False for one named file (an adapter)
    indexed: bool = True

    @cached_property
    def _where(self) -> dict[str, tuple[ShardFile, int, int]]:
        return {name: (shard, b, e) for shard in self.shards for name, (b, e) in shard.offsets.items()}

    @cached_property
    def tensors(self) -> dict[str, OutputTensor]:
        """Every planned tensor by name, in layout order."""
        return {t.name: t for s in self.shards for t in s.tensors}

    def index(self) -> dict[str, Any]:
        """The content of ``model.safetensors.index.json`` (total_size: tensor bytes, as HF counts)."""
        return {"metadata": {"total_size": sum(t.nbytes for t in self.tensors.values())},
                "weight_map": {name: self._where[name][0].filename for name in self.tensors}}

    def where(self, name: str) -> tuple[ShardFile, int, int]:
        """The shard holding `name` and the tensor's absolute (begin, end) offsets in it."""
        return self._where[name]


def build_header(tensors: tuple[OutputTensor, ...], metadata: dict[str, str] | None = None
                 ) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A safetensors header for `tensors` laid out back to back in order, and their absolute
    offsets. The JSON is padded with spaces so the data starts 8-byte aligned. `metadata`:
    extra string entries of `__metadata__` (a single-file output's recipe and manifest)."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    spans: list[tuple[int, int]] = []
    pos = 0
    for t in tensors:
        spans.append((pos, pos + t.nbytes))
        meta[t.name] = {"dtype": NAME_TO_ST[t.dtype], "shape": list(t.shape),
                        "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    text = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors pads it
    header = struct.pack("<Q", len(text)) + text
    return header, {t.name: (len(header) + b, len(header) + e) for t, (b, e) in zip(tensors, spans)}


def single_file(tensors: list[OutputTensor], filename: str) -> ShardLayout:
    """Every tensor in one file named `filename`, without an index (a PEFT adapter's
    adapter_model.safetensors)."""
    if len({t.name for t in tensors}) != len(tensors):
        raise ValueError("duplicate output tensor names")
    members = tuple(tensors)
    header, offsets = build_header(members)
    size = len(header) + sum(t.nbytes for t in members)
    return ShardLayout((ShardFile(filename, members, header, offsets, size),), indexed=False)


def plan_shards(tensors: list[OutputTensor], shard_size: int) -> ShardLayout:
    """Split `tensors` greedily, in order, into shards of at most `shard_size` tensor bytes.

    A tensor that would push the current shard past `shard_size` starts a new shard; a single
    tensor bigger than `shard_size` gets a shard of its own. Files are always named
    ``model-0000i-of-0000N.safetensors``, even when there is one shard. No tensors gives one
    empty shard.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if len({t.name for t in tensors}) != len(tensors):
        raise ValueError("duplicate output tensor names")
    groups: list[list[OutputTensor]] = [[]]
    used = 0
    for t in tensors:
        if groups[-1] and used + t.nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += t.nbytes
    shards = []
    for i, group in enumerate(groups):
        members = tuple(group)
        header, offsets = build_header(members)
        size = len(header) + sum(t.nbytes for t in members)
        filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shards.append(ShardFile(filename, members, header, offsets, size))
    return ShardLayout(tuple(shards))
