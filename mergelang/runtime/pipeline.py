"""The overlapped executor's threads: readers prefetch LOADs, a writer drains outputs to the sink.

    readers (1..n) --ready[nid]--> compute (caller's thread) --queue--> writer --> sink

* Readers claim LOADs strictly in plan order and reserve their bytes in a shared `ByteBudget`
  before reading, so prefetching stops when the lookahead is full; the compute loop releases a
  load's bytes when it takes the value (from then on it is a live value, counted in the plan).
* `put` reserves an output's bytes until the writer has handed it to the sink; outputs reach the
  sink in output order (one writer thread), exactly like the sequential interpreter.
* Progress is always possible: a reservation succeeds when nothing else is reserved (readers) or
  no write is pending (put), so a tensor larger than the whole lookahead still goes through,
  alone. Hence the bound: reserved bytes <= max(lookahead, largest load) + one output. The compute loop never waits for a reader that waits for the compute loop: the reserved
  bytes a reader waits on belong to earlier loads (taken before the one compute waits for) or to
  pending writes (drained by the writer on its own).
* The first exception in any thread stops every stage and is re-raised, unchanged, in the
  caller's thread (from `take`/`put`, or when the `with` block ends).
* On CUDA, readers copy from pinned host memory on their own stream (non-blocking) and upcast
  there; `take` makes the compute stream wait for that copy's event. Not exercised by the CPU
  test suite (no GPU there); the CPU path runs the same control flow.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Mapping

import torch

from mergelang.io.checkpoint import ModelSource
from mergelang.runtime.rows import RowAssembler, tensor_done
from mergelang.ir.ops import Op
from mergelang.passes.plan import ExecutionPlan


class _Stopped(Exception):
    """Raised inside a stage when another stage failed (never escapes the pipeline)."""


class ByteBudget:
    """A byte counter with a cap; one condition variable for all waiters."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.pending_writes = 0
        self.peak = 0
        self.cv = threading.Condition()
        self.stopped = False

    def _wait(self, blocked: Callable[[], bool]) -> None:
        while blocked() and not self.stopped:
            self.cv.wait()
        if self.stopped:
            raise _Stopped

    def reserve_read(self, n: int) -> None:
        with self.cv:
            self._wait(lambda: self.used > 0 and self.used + n > self.limit)
            self.used += n
            self.peak = max(self.peak, self.used)

    def reserve_write(self, n: int) -> None:
        with self.cv:
            self._wait(lambda: self.pending_writes > 0 and self.used + n > self.limit)
            self.used += n
            self.pending_writes += 1
            self.peak = max(self.peak, self.used)

    def release(self, n: int, write: bool = False) -> None:
        with self.cv:
            self.used -= n
            if write:
                self.pending_writes -= 1
            self.cv.notify_all()

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify_all()


class Pipeline:
    """Context manager running the reader and writer threads around the caller's compute loop."""

    def __init__(self, plan: ExecutionPlan, models: Mapping[str, ModelSource | None],
                 sink: Callable[[str, torch.Tensor], None], dev: torch.device,
                 progress: Callable[[int], None] | None, lookahead: int, readers: int = 1):
        from mergelang.runtime.loads import read_value, upcast

        self._read_value, self._upcast = read_value, upcast
        self.plan, self.models, self.sink, self.dev, self.progress = plan, models, sink, dev, progress
        self.emit = RowAssembler(sink)  # row chunks: to the sink's write_rows, or reassembled
        g = plan.graph
        self.loads = [s.nid for s in plan.steps if g.node(s.nid).op is Op.LOAD]
        self.size = {nid: g.node(nid).type.nbytes for nid in self.loads}
        self.budget = ByteBudget(lookahead)
        self.cv = self.budget.cv  # one lock for everything: simple, and contention is per tensor
        self.ready: dict[int, tuple[torch.Tensor, object]] = {}
        self.queue: deque[tuple[str, torch.Tensor, int, int, tuple[int, int, int] | None]] = deque()
        self.closing = False
        self.error: BaseException | None = None
        self._next = 0
        self._claim = threading.Lock()
        self._copy_stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self.threads = [threading.Thread(target=self._guard, args=(self._reader,), daemon=True,
                                         name=f"mergelang-reader-{i}") for i in range(max(1, readers))]
        self.threads.append(threading.Thread(target=self._guard, args=(self._writer,), daemon=True,
                                             name="mergelang-writer"))

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> "Pipeline":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            with self.cv:
                self.closing = True
                self.cv.notify_all()
        else:
            self.budget.stop()
        for t in self.threads:
            t.join()
        if exc_type is None and self.error is not None:
            raise self.error

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            with self.cv:
                if self.error is None:
                    self.error = e
            self.budget.stop()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        if self.budget.stopped:
            raise RuntimeError("internal: pipeline stopped without an error")

    # ---------------------------------------------------------------- readers
    def _reader(self) -> None:
        while True:
            with self._claim:  # claims and reservations happen in plan order
                if self._next >= len(self.loads):
                    return
                nid = self.loads[self._next]
                self._next += 1
                self.budget.reserve_read(self.size[nid])
            value, event = self._read(nid)
            with self.cv:
                self.ready[nid] = (value, event)
                self.cv.notify_all()

    def _read(self, nid: int) -> tuple[torch.Tensor, object]:
        if self._copy_stream is None:
            return self._read_value(self.plan, self.models, nid), None
        raw = self._read_value(self.plan, self.models, nid, upcast=False).pin_memory()
        with torch.cuda.stream(self._copy_stream):
            value = self._upcast(self.plan, nid, raw.to(self.dev, non_blocking=True))
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return value, event

    def take(self, nid: int) -> torch.Tensor:
        """The value of LOAD `nid` (waits for its reader); called in plan order."""
        with self.cv:
            while nid not in self.ready:
                self._check()
                self.cv.wait()
            value, event = self.ready.pop(nid)
        self.budget.release(self.size[nid])
        if event is not None:
            stream = torch.cuda.current_stream(self.dev)
            stream.wait_event(event)  # type: ignore[arg-type]
            value.record_stream(stream)
        return value

    # ---------------------------------------------------------------- writer
    def put(self, name: str, tensor: torch.Tensor, nbytes: int,
            rows: tuple[int, int, int] | None = None) -> None:
        """Queue one output (or row chunk of one) for the sink (waits while the lookahead is
        full of pending writes)."""
        held = tensor.numel() * tensor.element_size()
        with self.cv:
            self._check()
        try:
            self.budget.reserve_write(held)
        except _Stopped:
            with self.cv:
                self._check()
            raise  # pragma: no cover - _check always raises once stopped
        with self.cv:
            self.queue.append((name, tensor, held, nbytes, rows))
            self.cv.notify_all()

    def _writer(self) -> None:
        while True:
            with self.cv:
                while True:
                    if self.budget.stopped:
                        raise _Stopped
                    if self.queue:
                        break
                    if self.closing:
                        return
                    self.cv.wait()
                name, tensor, held, nbytes, rows = self.queue.popleft()
            self.emit(name, tensor, rows)
            del tensor
            self.budget.release(held, write=True)
            done = tensor_done(nbytes, rows)
            if self.progress is not None and done:
                self.progress(done)
