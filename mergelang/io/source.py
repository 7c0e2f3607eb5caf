"""The model-source protocol: `TensorInfo` (a tensor's header entry), `ModelSource` (a checkpoint:
a table of tensors and a way to load each, plus optional features whose defaults say "none") and
`WrappedSource` (a source that changes how another is read, forwarding all the rest). The
readers are in io/checkpoint.py; derived sources in sources/.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from mergelang.io.inputs import model_root
from mergelang.ir.types import itemsize

if TYPE_CHECKING:  # torch is imported where tensors are read: checking reads headers only
    import torch


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "bfloat16"
    file: str = ""  # shard path ("" for in-memory)
    begin: int = 0  # absolute byte offset of the data in the file
    end: int = 0

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * itemsize(self.dtype)


class ModelSource:
    """A checkpoint: an ordered table of tensors (headers only) and a way to load one tensor."""

    label: str = ""
    folder: Path | None = None  # the HF folder (config.json, tokenizer) when there is one
    #: (block index, output index) when this "model" is a merge block's output (`output(...)`):
    #: the elaborator substitutes that block's rules instead of loading tensors
    block_output: tuple[int, int] | None = None

    def tensors(self) -> Mapping[str, TensorInfo]:
        raise NotImplementedError

    def load(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def load_as(self, name: str, dtype: torch.dtype | None = None, *, view: bool = False) -> torch.Tensor:
        """The tensor converted to `dtype` (None: as stored), in memory it owns. `view`: the
        caller only reads the result, so a source may hand out a view of the file's bytes as
        stored (no copy) instead; this default always copies."""
        t = self.load(name)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def load_rows(self, name: str, dtype: torch.dtype | None, start: int, stop: int, *,
                  view: bool = False) -> torch.Tensor:
        """Rows `start:stop` (axis 0) of the tensor, converted to `dtype`, in memory it owns
        (`view`: as in :meth:`load_as`). This default reads the whole tensor; safetensors files
        read just those rows."""
        return self.load_as(name, dtype)[start:stop].clone()

    def load_stored(self, name: str, *, view: bool = False) -> torch.Tensor:
        """The tensor exactly as the file stores it, for kernels that decode it themselves: a
        block-scaled FP8 weight's codes, or (by its name) its scale tensor, which a model that
        dequantizes hides from `tensors()` (sources/fp8.BlockFp8). Here: `load_as` as stored."""
        return self.load_as(name, None, view=view)

    def close(self) -> None:
        pass

    def input_paths(self) -> list[Path]:
        """The folders and files this model reads (an output may not overlap any of them): its
        folder (and Hugging Face cache repository) and every file a tensor is read from."""
        out: list[Path] = []
        if self.folder is not None:
            out += [Path(self.folder), model_root(Path(self.folder))]
        out += [Path(f) for f in dict.fromkeys(i.file for i in self.tensors().values() if i.file)]
        return out

    def prepare(self, device: object = None) -> None:
        """Model-level work before any tensor is streamed (e.g. solving an alignment)."""

    # ---- optional features: the defaults say "none"; wrappers forward them (WrappedSource)
    def block_scale(self, name: str) -> tuple[str, tuple[int, int], float] | None:
        """(scale tensor name, block, largest value) when reading `name` from this source can
        give its block-scaled FP8 codes and scales (`load_stored`; sources/fp8.BlockFp8), else
        None."""
        return None

    def stored_block_scale(self, name: str) -> tuple[str, tuple[int, int], float] | None:
        """Like `block_scale`, for how the checkpoint under this source stores `name` (an output
        merged from it is quantized alike), also through wrappers that read it otherwise."""
        return self.block_scale(name)

    @property
    def block_scaled(self) -> bool:
        """This source is, or wraps, a block-scaled FP8 checkpoint seen dequantized."""
        return False

    def config_patch(self) -> dict[str, Any] | None:
        """Keys this source changes in its checkpoint's config.json (e.g. stacked layers' count),
        applied to an output merged from it; None: unchanged."""
        return None

    def tokenizer_files(self) -> dict[str, str | Path] | None:
        """The tokenizer files an output merged from this source gets instead of the folder's
        (tokenizer_source: the chosen tokenizer's), else None."""
        return None

    def config(self) -> dict | None:
        if self.folder is not None and (self.folder / "config.json").is_file():
            try:
                from mergelang.io.textfile import read_json

                return read_json(self.folder / "config.json")
            except (OSError, ValueError):
                return None
        return None


class WrappedSource(ModelSource):
    """A source that changes how another one (`inner`) is read: its label, folder, tensor
    table, files, config, optional features (block scales, config patch, tokenizer files),
    model-level work and closing are the inner source's unless overridden."""

    def __init__(self, inner: ModelSource):
        self.inner = inner
        self.label, self.folder = inner.label, inner.folder

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self.inner.tensors()

    def load(self, name: str) -> torch.Tensor:
        return self.load_as(name, None)

    def input_paths(self) -> list[Path]:
        return self.inner.input_paths()

    def prepare(self, device: object = None) -> None:
        self.inner.prepare(device)

    def block_scale(self, name: str) -> tuple[str, tuple[int, int], float] | None:
        return self.inner.block_scale(name)

    def stored_block_scale(self, name: str) -> tuple[str, tuple[int, int], float] | None:
        return self.inner.stored_block_scale(name)

    @property
    def block_scaled(self) -> bool:
        return self.inner.block_scaled

    def config_patch(self) -> dict[str, Any] | None:
        return self.inner.config_patch()

    def tokenizer_files(self) -> dict[str, str | Path] | None:
        return self.inner.tokenizer_files()

    def config(self) -> dict | None:
        return self.inner.config()

    def close(self) -> None:
        self.inner.close()
