"""Input checkpoints: HF folders (sharded or single-file safetensors), single `.safetensors` files
and in-memory state dicts, behind one `ModelSource` interface.

Headers are parsed here (8-byte little-endian length + JSON), because the checker needs shapes,
dtypes *and* byte offsets (for read ordering and memory planning) without touching tensor data,
and safetensors' Python API does not expose offsets. Tensor data is read with `safetensors`.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open

from .diagnostics import CompileError, Span, did_you_mean, error
from .types import ST_TO_TORCH, TORCH_TO_ST, dtype_name, itemsize

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".pkl")


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


TORCH_TO_ST_NAME = {dtype_name(k): v for k, v in TORCH_TO_ST.items()}


class CheckpointError(Exception):
    """A problem with a checkpoint file; becomes an E303 diagnostic at the model's declaration."""

    def __init__(self, message: str, help: str | None = None, code: str = "E303"):
        super().__init__(message)
        self.help = help
        self.code = code


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header; never reads tensor data."""
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file too short to be safetensors ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: bad header length {n} (file is {size} bytes)",
                                      "the file is truncated or not a safetensors file")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    base = 8 + n
    data_len = size - base
    out: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            st_dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from None
        if st_dtype not in ST_TO_TORCH:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {st_dtype}",
                                  f"supported: {', '.join(sorted(ST_TO_TORCH))}", "E206")
        if any(d < 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has a negative dimension")
        dtype = dtype_name(ST_TO_TORCH[st_dtype])
        info = TensorInfo(name, shape, dtype, path, base + begin, base + end)
        if begin < 0 or end < begin or end > data_len:
            raise CheckpointError(f"{path}: tensor {name!r} has offsets {begin}..{end} outside the "
                                  f"data ({data_len} bytes)", "the file is truncated or corrupt")
        if end - begin != info.nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} occupies {end - begin} bytes, but "
                                  f"{st_dtype}{list(shape)} needs {info.nbytes}")
        spans.append((begin, end, name))
        out[name] = info
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file")
    return out


class ModelSource:
    """A checkpoint: an ordered table of tensors (headers only) and a way to load one tensor."""

    label: str = ""
    folder: Path | None = None  # the HF folder (config.json, tokenizer) when there is one

    def tensors(self) -> Mapping[str, TensorInfo]:
        raise NotImplementedError

    def load(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def load_as(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor converted to `dtype` (None: as stored), in memory it owns."""
        t = self.load(name)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def close(self) -> None:
        pass

    def config(self) -> dict | None:
        if self.folder is not None and (self.folder / "config.json").is_file():
            try:
                return json.loads((self.folder / "config.json").read_text())
            except (OSError, json.JSONDecodeError):
                return None
        return None


class SafetensorsSource(ModelSource):
    """One or more safetensors files (an HF folder's shards, or a single file)."""

    def __init__(self, label: str, files: list[Path], folder: Path | None):
        self.label = label
        self.folder = folder
        self.files = files
        table: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_header(f).items():
                if name in table:
                    raise CheckpointError(f"tensor {name!r} appears in both {table[name].file} and {f}")
                table[name] = info
        # read order: file order, then offset within a file (sequential reads)
        rank = {str(f): i for i, f in enumerate(files)}
        self._table = dict(sorted(table.items(), key=lambda kv: (rank[kv[1].file], kv[1].begin)))
        self._handles: dict[str, object] = {}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._table

    def _handle(self, file: str):
        h = self._handles.get(file)
        if h is None:
            with self._lock:
                h = self._handles.get(file)
                if h is None:
                    h = self._handles[file] = safe_open(file, framework="pt", device="cpu")
        return h

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file)
                if fd is None:
                    fd = self._fds[file] = os.open(file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return fd

    def load(self, name: str) -> torch.Tensor:
        """One tensor, thread-safe. Default: safetensors' `get_tensor`, a view of the mmapped
        file, so the float32 upcast that follows reads the page cache directly (one pass over
        the bytes). `READER = "pread"` reads into a fresh buffer with positional reads instead:
        measured slower here (1B bf16 base, warm cache, load + upcast: pread 11-15 s,
        safetensors 8-10 s on the shared 2-core machine), kept for cold-cache / network disks."""
        info = self._table[name]
        if READER != "pread":
            return self._handle(info.file).get_tensor(name)
        n = info.end - info.begin
        buf = torch.empty(n, dtype=torch.uint8)
        if n:
            read_into(self._fd(info.file), memoryview(buf.numpy()), info.begin, info.file)
        return buf.view(ST_TO_TORCH[TORCH_TO_ST_NAME[info.dtype]]).reshape(info.shape)

    def load_as(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, converted to `dtype`, through a private mmap of just its bytes that is
        unmapped before returning: the conversion reads the page cache directly (one pass), and
        resident memory holds only the result (a long-lived mmap of the whole file, as
        safetensors keeps, counts every page read so far in the process's RSS)."""
        if READER != "mmap":
            return super().load_as(name, dtype)
        info = self._table[name]
        stored = ST_TO_TORCH[TORCH_TO_ST_NAME[info.dtype]]
        n = info.end - info.begin
        if n == 0:
            return torch.empty(info.shape, dtype=dtype or stored)
        start = info.begin - info.begin % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(self._fd(info.file), info.end - start, offset=start, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{info.file}: cannot map tensor {name!r}: {e}",
                                  "the file was truncated or replaced after its header was read") from None
        try:
            view = torch.frombuffer(mm, dtype=stored, count=n // itemsize(info.dtype),
                                    offset=info.begin - start).reshape(info.shape)
            out = view.to(dtype) if dtype is not None and dtype != stored else view.clone()
            del view
        finally:
            mm.close()
        return out

    def close(self) -> None:
        self._handles.clear()
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


#: how `SafetensorsSource` reads tensor data: "mmap" (default; per-tensor maps, `load_as`),
#: "safetensors" (`get_tensor`) or "pread" (positional reads into a fresh buffer)
READER = os.environ.get("MERGELANG_READER", "mmap")


def read_into(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Fill `view` from `fd` at `offset` (os.preadv where available; a file lock-free loop)."""
    done, n = 0, len(view)
    while done < n:
        if hasattr(os, "preadv"):
            k = os.preadv(fd, [view[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, n - done, offset + done)
            view[done:done + len(data)] = data
            k = len(data)
        if k <= 0:
            raise CheckpointError(f"{path}: unexpected end of file at byte {offset + done}",
                                  "the file was truncated after its header was read")
        done += k


class DictSource(ModelSource):
    """An in-memory state dict (`ml.merge`, `ml.compile(..., base=state_dict)`)."""

    def __init__(self, label: str, tensors: Mapping[str, torch.Tensor]):
        self.label = label
        self._tensors = dict(tensors)
        self._table = {}
        for name, t in self._tensors.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"value for {name!r} is a {type(t).__name__}, not a torch.Tensor")
            self._table[name] = TensorInfo(name, tuple(t.shape), dtype_name(t.dtype))

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._table

    def load(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            data = json.loads(index.read_text())
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a `weight_map`)") from None
        files: list[Path] = []
        root = folder.resolve()
        for fname in dict.fromkeys(weight_map.values()):
            p = (folder / str(fname)).resolve()
            if root not in p.parents:
                raise CheckpointError(f"{index}: refers to {fname!r}, outside the model folder",
                                      "index files may only name shards inside their folder")
            if not p.is_file():
                raise CheckpointError(f"{index}: shard {fname!r} is missing")
            files.append(p)
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def open_model(label: str, path: str | Path) -> ModelSource:
    """Open an HF folder or a `.safetensors` file (headers only); raises CheckpointError."""
    p = Path(path)
    if p.is_file():
        if p.suffix != ".safetensors":
            if p.suffix in WEIGHT_SUFFIXES:
                raise CheckpointError(f"{p} is a pickle-based checkpoint; mergelang reads safetensors",
                                      "convert it to safetensors first (pickle files can run code)", "E306")
            raise CheckpointError(f"{p} is not a .safetensors file or a model folder")
        return SafetensorsSource(label, [p.resolve()], p.resolve().parent if (p.parent / "config.json").is_file() else None)
    if p.is_dir():
        files = _weight_files(p)
        if not files:
            pickles = [f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            if pickles:
                raise CheckpointError(f"{p} holds only pickle checkpoints ({', '.join(sorted(pickles)[:3])})",
                                      "convert them to safetensors first (pickle files can run code)", "E306")
            raise CheckpointError(f"{p} has no .safetensors weights")
        return SafetensorsSource(label, files, p.resolve())
    raise FileNotFoundError(str(p))


def missing_path_help(path: Path) -> str | None:
    parent = path.parent if str(path.parent) else Path(".")
    if parent.is_dir():
        names = [c.name for c in parent.iterdir()]
        hint = did_you_mean(path.name, names)
        if hint:
            return hint
    if not parent.exists():
        return f"the folder {parent} does not exist either"
    return None


def model_error(label: str, path: str, exc: Exception, span: Span | None) -> CompileError:
    if isinstance(exc, FileNotFoundError):
        return CompileError(error("E301", f"model `{label}`: path {path} does not exist", span,
                                  missing_path_help(Path(path))))
    if isinstance(exc, CheckpointError):
        return CompileError(error(exc.code, f"model `{label}`: {exc}", span, exc.help))
    return CompileError(error("E303", f"model `{label}`: cannot open {path}: {exc}", span))


def names_like(name: str, names: Iterable[str]) -> str | None:
    return did_you_mean(name, names)
