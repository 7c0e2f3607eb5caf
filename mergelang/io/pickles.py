"""Pickle checkpoints (`.bin`, `.pt`), read only on request (`--allow-pickle`) and only with
`torch.load(weights_only=True)`; opened by `locate.open_model`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from mergelang.errors import CheckpointError
from mergelang.io.checkpoint import ModelSource, TensorInfo
from mergelang.ir.types import ITEMSIZE, ST_TO_NAME, dtype_name

if TYPE_CHECKING:
    import torch


class PickleSource(ModelSource):
    """Pickle checkpoints (``.bin``/``.pt``), read only on request (``--allow-pickle``) and only
    with ``torch.load(weights_only=True)``, which refuses to build anything but tensors and plain
    containers (no code runs). Each file is loaded (memory-mapped when possible) when opened,
    because pickles have no header to read shapes from."""

    def __init__(self, label: str, files: list[Path], folder: Path | None):
        self.label = label
        self.folder = folder
        self._tensors: dict[str, torch.Tensor] = {}
        self._table: dict[str, TensorInfo] = {}
        for f in files:
            for name, t in _torch_load(f).items():
                if name in self._tensors:
                    raise CheckpointError(f"tensor {name!r} appears twice (in {f} and another file)")
                if dtype_name(t.dtype) not in ITEMSIZE:
                    raise CheckpointError(f"{f}: tensor {name!r} has unsupported dtype {t.dtype}",
                                          f"supported: {', '.join(sorted(ST_TO_NAME))}", "E206")
                self._tensors[name] = t
                self._table[name] = TensorInfo(name, tuple(t.shape), dtype_name(t.dtype), str(f))

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._table

    def load(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def close(self) -> None:
        self._tensors.clear()


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    import torch

    def load(mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(True)
        except RuntimeError as exc:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            obj = load(False)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: torch.load(weights_only=True) refused the pickle: {first}",
                              "the file holds more than tensors; only plain state dicts are "
                              "read, and no code is ever run", "E309") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the pickle checkpoint: {exc}") from None
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in obj.items()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors)")
    return dict(obj)
