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
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from mergelang.errors import CheckpointError
from mergelang.io.source import ModelSource, TensorInfo, WrappedSource  # noqa: F401  (public here too)
from mergelang.ir.types import ITEMSIZE, ST_TO_NAME, dtype_name, itemsize, torch_dtype

if TYPE_CHECKING:  # torch is imported where tensors are read: checking reads headers only
    import torch

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_HELP = ("pickle files can run code when loaded: convert them to safetensors, or pass "
               "--allow-pickle (ml.compile(..., allow_pickle=True)) to read them with "
               "torch.load(weights_only=True)")


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
    except RecursionError:
        raise CheckpointError(f"{path}: header JSON is nested too deeply") from None
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
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CheckpointError(f"{path}: __metadata__ must map names to strings")
            continue
        try:
            st_dtype, shape, begin, end = _entry(entry)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}",
                                  "each tensor needs dtype (a string), shape (a list of integers) "
                                  "and data_offsets (two integers)") from None
        if st_dtype not in ST_TO_NAME:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {st_dtype}",
                                  f"supported: {', '.join(sorted(ST_TO_NAME))}", "E206")
        if any(d < 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has a negative dimension")
        if not _shape_fits(shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(shape)}, too large for "
                                  "any tensor library (sizes and strides must fit in 63 bits)",
                                  "the file is corrupt or hostile")
        dtype = ST_TO_NAME[st_dtype]
        info = TensorInfo(name, shape, dtype, path, base + begin, base + end)
        if begin < 0 or end < begin or end > data_len:
            raise CheckpointError(f"{path}: tensor {name!r} has offsets {begin}..{end} outside the "
                                  f"data ({data_len} bytes)", "the file is truncated or corrupt")
        if end - begin != info.nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} occupies {end - begin} bytes, but "
                                  f"{st_dtype}{list(shape)} needs {info.nbytes}")
        spans.append((begin, end, name))
        out[name] = info
    # as safetensors itself requires: tensors back to back from 0, covering all the data
    spans.sort()
    pos, prev = 0, None
    for b, e, name in spans:
        if b < pos:
            raise CheckpointError(f"{path}: tensors {prev!r} and {name!r} overlap in the file")
        if b > pos:
            raise CheckpointError(f"{path}: tensor {name!r} starts at {b}, not at {pos} (the data "
                                  "has a gap)", "the file is corrupt")
        pos, prev = e, name
    if pos != data_len:
        raise CheckpointError(f"{path}: {data_len - pos} bytes after the last tensor are not "
                              "covered by the header", "the file is corrupt or has trailing data")
    return out


def _shape_fits(shape: tuple[int, ...]) -> bool:
    """Every dimension, and the product of the non-zero ones (the largest stride), below 2**62."""
    total = 1
    for d in shape:
        if d >= 1 << 62:
            return False
        total *= max(d, 1)
        if total >= 1 << 62:
            return False
    return len(shape) <= 64


def _entry(entry: object) -> tuple[str, tuple[int, ...], int, int]:
    """dtype, shape and data offsets of one header entry; TypeError/ValueError if malformed."""
    if not isinstance(entry, dict) or not isinstance(entry["dtype"], str):
        raise TypeError
    shape, offsets = entry["shape"], entry["data_offsets"]
    ints = (shape if isinstance(shape, list) else [None]) + (offsets if isinstance(offsets, list) else [None])
    if len(offsets) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in ints):
        raise TypeError
    return entry["dtype"], tuple(shape), offsets[0], offsets[1]


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
        #: each file's size when its header was read: a read re-checks it (E508, not SIGBUS)
        self._sizes = {str(f): os.path.getsize(f) for f in files}
        self._handles: dict[str, object] = {}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        from mergelang.io.digests import ReadLog

        #: the CRC-32C of each tensor read, computed on the bytes read (the manifest's digests)
        self.reads = ReadLog()

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._table

    def _handle(self, file: str):
        h = self._handles.get(file)
        if h is None:
            with self._lock:
                h = self._handles.get(file)
                if h is None:
                    from safetensors import safe_open

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
        self._unchanged(info.file, name)
        if READER != "pread":
            try:
                t = self._handle(info.file).get_tensor(name)
                self._log(name, info, info.begin, info.end, _raw(t))
                return t
            except Exception as exc:  # the file changed or broke since its header was read
                raise CheckpointError(f"{info.file}: cannot read tensor {name!r}: {exc}",
                                      "was the file modified or truncated during the merge?") from None
        import torch

        n = info.end - info.begin
        buf = torch.empty(n, dtype=torch.uint8)
        if n:
            read_into(self._fd(info.file), memoryview(buf.numpy()), info.begin, info.file)
        self._log(name, info, info.begin, info.end, buf.numpy())
        return buf.view(torch_dtype(info.dtype)).reshape(info.shape)

    def load_as(self, name: str, dtype: torch.dtype | None = None, *, view: bool = False) -> torch.Tensor:
        """One tensor, converted to `dtype`, through a private mmap of just its bytes that is
        unmapped before returning: the conversion reads the page cache directly (one pass), and
        resident memory holds only the result (a long-lived mmap of the whole file, as
        safetensors keeps, counts every page read so far in the process's RSS). With `view` and
        no conversion, the tensor *is* the mapping (unmapped when the tensor is freed): no copy
        at all, the kernel that uses it reads the page cache (read-ahead is requested now)."""
        if READER != "mmap":
            return super().load_as(name, dtype)
        info = self._table[name]
        return self._map(name, info, dtype, info.begin, info.end, info.shape, view)

    def load_rows(self, name: str, dtype: torch.dtype | None, start: int, stop: int, *,
                  view: bool = False) -> torch.Tensor:
        """Rows `start:stop` through a private mmap of just their bytes (a contiguous range of
        the stored tensor)."""
        if READER != "mmap":
            return super().load_rows(name, dtype, start, stop)
        info = self._table[name]
        row = (info.end - info.begin) // info.shape[0] if info.shape and info.shape[0] else 0
        stop = min(stop, info.shape[0])
        return self._map(name, info, dtype, info.begin + start * row, info.begin + stop * row,
                         (max(0, stop - start), *info.shape[1:]), view)

    def _map(self, name: str, info: TensorInfo, dtype: torch.dtype | None, begin: int, end: int,
             shape: tuple[int, ...], view: bool = False) -> torch.Tensor:
        import torch

        stored = torch_dtype(info.dtype)
        n = end - begin
        if n == 0:
            self._log(name, info, begin, end, b"")
            return torch.empty(shape, dtype=dtype or stored)
        if n < SMALL_READ:  # a map costs more than reading a few pages (27 us against ~5 us)
            buf = torch.empty(n, dtype=torch.uint8)
            try:
                read_into(self._fd(info.file), memoryview(buf.numpy()), begin, info.file)
            except CheckpointError as e:
                raise CheckpointError(f"{info.file}: cannot read tensor {name!r}: "
                                      f"{str(e).removeprefix(info.file + ': ')}", e.help) from None
            self._log(name, info, begin, end, buf.numpy())
            t = buf.view(stored).reshape(shape)
            return t.to(dtype) if dtype is not None and dtype != stored else t
        self._unchanged(info.file, name)
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(self._fd(info.file), end - start, offset=start, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{info.file}: cannot map tensor {name!r}: {e}",
                                  "the file was truncated or replaced after its header was read") from None
        self._log_map(name, info, begin, end, mm, begin - start)
        try:
            mapped = torch.frombuffer(mm, dtype=stored, count=n // itemsize(info.dtype),
                                      offset=begin - start).reshape(shape)
        except BaseException:
            mm.close()
            raise
        if view and (dtype is None or dtype == stored):
            # a copy-on-write map: a stray write never reaches the file; the tensor holds the
            # map (torch.frombuffer keeps a reference to it), which is unmapped with it
            if hasattr(mmap, "MADV_WILLNEED"):
                mm.madvise(mmap.MADV_WILLNEED)
            return mapped
        try:
            return mapped.to(dtype) if dtype is not None and dtype != stored else mapped.clone()
        finally:
            del mapped
            mm.close()

    def _log(self, name: str, info: TensorInfo, begin: int, end: int, data: object) -> None:
        """Note the CRC-32C of bytes [begin, end) of tensor `name`, just read (`data`)."""
        seed = self.reads.seed(name, info.begin, begin)
        if seed is not None:
            from mergelang.io.digests import crc

            self.reads.note(name, end, info.end, crc(data, seed))

    def _log_map(self, name: str, info: TensorInfo, begin: int, end: int, mm: mmap.mmap,
                 offset: int) -> None:
        if self.reads.seed(name, info.begin, begin) is None:
            return
        whole = memoryview(mm)
        try:
            part = whole[offset:offset + end - begin]
            try:
                self._log(name, info, begin, end, part)
            finally:
                part.release()
        finally:
            whole.release()
    def _unchanged(self, file: str, name: str) -> None:
        """E508 when `file` is now shorter than when its header was read: mapping or reading it
        would end in SIGBUS or a short read (the open descriptor's size: a file replaced by a
        rename keeps the old one, read whole)."""
        size = os.fstat(self._fd(file)).st_size
        if size < self._sizes.get(file, 0):
            raise CheckpointError(f"{file}: the file shrank from {self._sizes[file]} to {size} bytes "
                                  f"since its header was read (reading tensor {name!r})",
                                  "an input was truncated or rewritten during the merge: rerun once "
                                  "it is complete", "E508")

    def close(self) -> None:
        self._handles.clear()
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


#: how `SafetensorsSource` reads tensor data: "mmap" (default; per-tensor maps, `load_as`),
#: "safetensors" (`get_tensor`) or "pread" (positional reads into a fresh buffer)
READER = os.environ.get("MERGELANG_READER", "mmap")


#: tensors smaller than this are read with pread into a fresh buffer instead of being mapped
SMALL_READ = 1 << 16


def _raw(t: torch.Tensor) -> object:
    """A CPU tensor's bytes (a buffer), for their CRC."""
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


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
                                  "the file was truncated after its header was read", "E508")
        done += k


class DictSource(ModelSource):
    """An in-memory state dict (`ml.merge`, `ml.compile(..., base=state_dict)`)."""

    def __init__(self, label: str, tensors: Mapping[str, torch.Tensor]):
        self.label = label
        self._tensors = dict(tensors)
        self._table = {}
        import torch

        for name, t in self._tensors.items():
            if not isinstance(name, str):
                raise CheckpointError(f"tensor names must be strings, got the {type(name).__name__} "
                                      f"key {name!r}", "use a state dict: {name: tensor}")
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"value for {name!r} is a {type(t).__name__}, not a torch.Tensor")
            if t.layout != torch.strided:
                raise CheckpointError(f"tensor {name!r} is {str(t.layout).removeprefix('torch.')}",
                                      "pass dense tensors (tensor.to_dense())")
            if t.device.type == "meta":
                raise CheckpointError(f"tensor {name!r} is on the meta device and has no data",
                                      "load the weights first (e.g. without device_map='meta')")
            if dtype_name(t.dtype) not in ITEMSIZE:
                raise CheckpointError(f"tensor {name!r} has unsupported dtype {t.dtype}",
                                      "floating-point, integer and bool tensors are supported", "E206")
            self._table[name] = TensorInfo(name, tuple(t.shape), dtype_name(t.dtype))

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._table

    def load(self, name: str) -> torch.Tensor:
        return self._tensors[name]
