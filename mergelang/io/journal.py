"""Resumable output: the work folder's journal, run fingerprints, and plans restricted to the
tensors still to compute.

A resumable :class:`~mergelang.io.writer.CheckpointWriter` writes into a work folder whose name is a
pure function of the output path (:func:`work_dir_for`), so a rerun finds it. The folder holds the
preallocated shard files and ``mergelang-journal.jsonl``: a header line with the run's fingerprint,
then one line per tensor, appended and fsynced only *after* the tensor's bytes were written and
fsynced (in groups, see :class:`Journal`), recording its name and a CRC-32C of its bytes (the
`crc32c` package: the CPU's CRC instruction, ~16 GB/s; zlib's CRC-32 managed ~3.5 GB/s and cost
the writer thread over a second per 1B-parameter output). On resume, journaled tensors whose bytes
still match their checksum are kept; everything else is computed again. A torn last line (a kill
in the middle of an append) is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from crc32c import crc32c

from mergelang.errors import CodedIOError

JOURNAL_NAME = "mergelang-journal.jsonl"
JOURNAL_VERSION = 2  # 2: CRC-32C ("crc32c"); 1 had zlib's CRC-32


def work_dir_for(out_dir: str | Path) -> Path:
    """The work folder of an output folder: ``.NAME.mergelang-work`` next to it (deterministic)."""
    out = Path(os.path.abspath(out_dir))
    return out.parent / f".{out.name}.mergelang-work"


def checksum(data: Any) -> int:
    """CRC-32C of a bytes-like object (fast; detects torn and stale writes; the GIL is released)."""
    return crc32c(data) & 0xFFFFFFFF


def checksum_more(data: Any, crc: int) -> int:
    """The CRC-32C of the bytes checksummed so far (`crc`) followed by `data`."""
    return crc32c(data, crc) & 0xFFFFFFFF


def digest(parts: Iterable[str | bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode("utf-8") if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:32]


class JournalError(CodedIOError):
    """The work folder cannot be resumed from (E504 different run, E505 unreadable)."""


def read_journal(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The header and the {tensor name: crc} entries of a journal. Lines that do not parse (a torn
    append at a crash) are skipped; a missing or unreadable header is a JournalError (E505)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise JournalError("E505", f"cannot read the journal {path}: {e.strerror or e}") from None
    lines = raw.split(b"\n")
    try:
        header = json.loads(lines[0])
        if not isinstance(header, dict) or header.get("mergelang_journal") != JOURNAL_VERSION \
                or not isinstance(header.get("fingerprint"), dict):
            raise ValueError
    except (ValueError, RecursionError):
        raise JournalError("E505", f"{path} is not a mergelang journal (or is from another version)",
                           "run without --resume to start over") from None
    entries: dict[str, int] = {}
    for line in lines[1:]:
        try:
            e = json.loads(line)
            name, crc = e["name"], e["crc32c"]
            if isinstance(name, str) and isinstance(crc, int):
                entries[name] = crc
        except (ValueError, KeyError, TypeError, RecursionError):
            continue  # a torn or empty line
    return header, entries


class Journal:
    """An open journal. Thread-safe. Entries are group-committed: :meth:`record` queues a
    finished tensor; every `sync_bytes` written or `sync_seconds` elapsed (and on
    :meth:`commit`), the shard files written to are fdatasync'ed *first*, then the queued lines
    are appended and the journal fsynced. So an entry is never on disk before its bytes are, and
    a crash loses at most the last group (those tensors are simply computed again). One fsync
    per tensor would cost a disk round trip per tensor (measured: 2-3x slower on small tensors).
    """

    sync_bytes = 256 << 20
    sync_seconds = 0.5

    def __init__(self, path: Path, fd: int, sync: bool = True):
        """`sync=False` (`mergelang run --no-fsync`): lines are appended without any fsync; a
        crash of the process loses nothing (the page cache outlives it), a power loss may lose
        recent data, and resume's checksum test catches exactly those tensors."""
        self.path = path
        self.sync = sync
        self._fd = fd
        self._lock = threading.Lock()
        self._queue: list[tuple[str, int]] = []
        self._dirty: set[int] = set()
        self._bytes = 0
        self._last = time.monotonic()

    @classmethod
    def create(cls, path: Path, fingerprint: Mapping[str, str],
               entries: Mapping[str, int] | None = None, sync: bool = True) -> "Journal":
        """Write a fresh journal (header + `entries`) atomically: temp file, fsync, rename."""
        lines = [json.dumps({"mergelang_journal": JOURNAL_VERSION, "fingerprint": dict(fingerprint)},
                            sort_keys=True)]
        lines += [json.dumps({"name": n, "crc32c": c}) for n, c in (entries or {}).items()]
        tmp = path.with_name(path.name + ".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW, 0o666)
        try:
            os.write(fd, ("\n".join(lines) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return cls(path, os.open(path, os.O_WRONLY | os.O_APPEND | NOFOLLOW), sync)

    def record(self, name: str, crc: int, fd: int, nbytes: int) -> None:
        """Queue `name` (its bytes were written through `fd`); commit when a group is full."""
        with self._lock:
            self._queue.append((name, crc))
            self._dirty.add(fd)
            self._bytes += nbytes
            if self._bytes >= self.sync_bytes or time.monotonic() - self._last >= self.sync_seconds:
                self._commit()

    def commit(self) -> None:
        """Make every queued entry durable now (data first, then the journal lines)."""
        with self._lock:
            self._commit()

    def _commit(self) -> None:
        if self._fd < 0:
            return  # closed: nothing queued can be committed any more
        if self._queue:
            for fd in self._dirty if self.sync else ():
                os.fdatasync(fd)
            text = "".join(json.dumps({"name": n, "crc32c": c}) + "\n" for n, c in self._queue)
            os.write(self._fd, text.encode("utf-8"))  # O_APPEND
            if self.sync:
                os.fsync(self._fd)
        self._queue, self._dirty, self._bytes = [], set(), 0
        self._last = time.monotonic()

    def close(self) -> None:
        """Close without committing the queue (callers that keep the folder commit first)."""
        with self._lock:
            if self._fd >= 0:
                try:
                    os.close(self._fd)
                except OSError:
                    pass
                self._fd = -1


#: the file every work folder gets when mergelang creates it: an existing folder of a work
#: folder's name is reused or removed only when it carries this (or is empty), so a folder the
#: user happens to have there is never deleted
WORK_MARKER = ".mergelang-work"


def check_ours(work: Path) -> None:
    """E505 unless the existing folder `work` is empty, carries WORK_MARKER, or is a finished
    mergelang output whose final rename failed (its manifest covers it)."""
    from mergelang.io.outguard import manifest_files

    try:
        names = {e.name for e in work.iterdir()}
        known = manifest_files(work)
        ours = WORK_MARKER in names or not names or (known is not None and names <= known)
    except OSError as e:
        raise JournalError("E505", f"cannot read the work folder {work}: {e.strerror or e}") from None
    if not ours:
        raise JournalError("E505", f"{work} exists and was not made by mergelang (it has no "
                           f"{WORK_MARKER} marker); mergelang does not remove it",
                           "move or remove it by hand, or choose another -o")


def mark_ours(work: Path) -> None:
    (work / WORK_MARKER).touch()


def prepare_work(work: Path, fingerprint: Mapping[str, str], resume: bool,
                 messages: list[str]) -> dict[str, int]:
    """Get the work folder ready: replace an old one (not `resume`), or check that its journal
    is from the same run (E504) and return its entries; the folder exists afterwards. What
    happened is appended to `messages`. A folder another run is using is refused (E507)."""
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise JournalError("E505", f"the work folder {work} is not a folder", "remove it and run again")
    entries: dict[str, int] = {}
    if work.is_dir():
        check_ours(work)
        os.close(lock_dir(work))  # refuse early if another run holds it
        if not resume:
            shutil.rmtree(work, ignore_errors=True)
            if work.exists():
                raise JournalError("E505", f"cannot remove the old work folder {work}",
                                   "remove it by hand and run again")
            messages.append(f"replaced the work folder {work} left by an interrupted run "
                            "(use --resume to continue such a run instead)")
        elif _refuse_links(work) or (work / JOURNAL_NAME).is_file():
            header, entries = read_journal(work / JOURNAL_NAME)
            check_fingerprint(header["fingerprint"], fingerprint, work)
        else:  # e.g. left by a multi-output run: its files must not end up in this output
            shutil.rmtree(work, ignore_errors=True)
            messages.append(f"the work folder {work} has no journal; starting over")
    elif resume:
        messages.append(f"nothing to resume (no work folder {work}); starting from the beginning")
    work.mkdir(exist_ok=True)
    mark_ours(work)
    return entries


def _refuse_links(work: Path) -> bool:
    """E505 when the work folder holds a symbolic link (at any depth): resume reopens the files
    there for writing, and must never write through a link planted in it. Returns False."""
    for root, dirs, files in os.walk(work):
        for name in [*dirs, *files]:
            p = Path(root) / name
            if p.is_symlink():
                raise JournalError("E505", f"cannot resume: the work folder {work} holds a symbolic "
                                   f"link {p.relative_to(work)}; mergelang does not follow links there",
                                   "remove the link (or run without --resume to start over)")
    return False


#: os.open flags for files in a work folder: never through a symbolic link
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def lock_dir(path: Path) -> int:
    """An fd holding an exclusive flock on folder `path`; E507 when another process holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # pragma: no cover - not POSIX: no locking
        pass
    except OSError:
        os.close(fd)
        raise JournalError("E507", f"another mergelang run is writing to the work folder {path}",
                           "wait for it to finish, or use another output folder") from None
    return fd


def check_fingerprint(old: Mapping[str, Any], new: Mapping[str, str], work: Path) -> None:
    """Refuse (E504) to resume from a work folder made by a different run."""
    for key, what in (("plan", "recipe (its execution plan differs)"),
                      ("inputs", "set of input checkpoints (they changed since)"),
                      ("layout", "output layout (shards or dtypes differ)")):
        if old.get(key) != new.get(key):
            raise JournalError("E504", f"cannot resume: the work folder {work} was made by a "
                               f"different {what}",
                               "run without --resume to start over (the work folder is then replaced)")


def reuse_shard(path: Path, size: int, header: bytes) -> int:
    """A read-write fd for an existing shard file of the planned size and header, else -1."""
    try:
        fd = os.open(path, os.O_RDWR | NOFOLLOW)
    except OSError:
        return -1
    try:
        if os.fstat(fd).st_size == size and os.pread(fd, len(header), 0) == header:
            return fd
    except OSError:
        pass
    os.close(fd)
    return -1


def range_crc(fd: int, begin: int, end: int) -> int:
    """CRC-32C of the bytes [begin, end) of a file (-1 if the file is shorter)."""
    crc, pos = 0, begin
    while pos < end:
        chunk = os.pread(fd, min(end - pos, 64 << 20), pos)
        if not chunk:
            return -1
        crc = checksum_more(chunk, crc)
        pos += len(chunk)
    return crc


# --------------------------------------------------------------------------- fingerprints

def plan_fingerprint(plan_text: str) -> str:
    """What is computed: the stable text of the execution plan (ops, attrs, names, dtypes)."""
    return digest([plan_text])


def inputs_fingerprint(models: Mapping[str, Any]) -> str:
    """What is read: every input's tensor table, and each file's size, modification time and a
    content sample (`content_sample`) (an in-memory state dict: its tensors' bytes)."""
    import torch

    parts: list[str | bytes] = []
    for label in sorted(models):
        src = models[label]
        parts.append(f"model {label}")
        if src is None:
            continue
        files: set[str] = set()
        for name, info in src.tensors().items():
            parts.append(f"{name}|{info.shape}|{info.dtype}|{info.file}|{info.begin}|{info.end}")
            if info.file:
                files.add(info.file)
            else:
                t = src.load(name)
                if isinstance(t, torch.Tensor):
                    t = t.detach().to("cpu").contiguous().reshape(-1)
                    parts.append(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        for f in sorted(files):
            try:
                st = os.stat(f)
                parts.append(f"{f}|{st.st_size}|{st.st_mtime_ns}")
                parts.append(content_sample(f, st.st_size))
            except OSError:
                parts.append(f"{f}|missing")
    return digest(parts)


#: the content sample of an input file: its first SAMPLE_HEAD bytes (the safetensors header and
#: the first tensors), and SAMPLE_COUNT blocks of SAMPLE_BLOCK bytes spread evenly over the rest
SAMPLE_HEAD = 64 << 10
SAMPLE_COUNT = 64
SAMPLE_BLOCK = 4096


def content_sample(path: str, size: int) -> bytes:
    """A cheap check that a file's content is unchanged (a resume must not mix two versions of
    an input that kept its size and modification time): a hash of the head and of blocks
    sampled at fixed offsets; ~320 KiB read per file (a 163-shard checkpoint: ~50 MiB). A change
    confined to bytes outside the samples goes unnoticed (docs: README, "Resuming")."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_HEAD))
        rest = size - SAMPLE_HEAD
        if rest > 0:
            step = max(rest // SAMPLE_COUNT, SAMPLE_BLOCK)
            for off in range(SAMPLE_HEAD, size, step):
                f.seek(off)
                h.update(f.read(SAMPLE_BLOCK))
            f.seek(max(size - SAMPLE_BLOCK, 0))
            h.update(f.read(SAMPLE_BLOCK))
    return h.digest()


# --------------------------------------------------------------------------- plans
