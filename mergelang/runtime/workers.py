"""Worker threads for the CPU kernels (the generated numba loops and the numpy / numba calls of
cpu_exact.py release the GIL, so threads run them in parallel).

A run keeps one pool for its whole length (`run_pool`, entered by `execute.execute`): started
lazily, joined when the run ends, so no worker thread outlives a run. Starting threads per call
instead cost ~1.5 ms a thread on a busy 2-core machine (the caller waits for each to be
scheduled): measured 0.8 s of a 1B ties merge, over ~530 kernel calls. Outside a run (a kernel
called directly) a pool is made for the call. The pool belongs to the thread that runs the
merge, so runs in different threads of one process never share (or shut down) each other's."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any, Callable, Iterator

_local = threading.local()


def _mark_worker() -> None:
    _local.worker = True


def _new_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(threads, 1), thread_name_prefix="mergelang-kernel",
                              initializer=_mark_worker)


@contextmanager
def run_pool(threads: int) -> Iterator[None]:
    """Kernels called from this thread share one pool until exit: `threads` - 1 workers, as the
    calling thread runs a share of each call itself (a nested run, e.g. a statistics pre-pass,
    reuses the outer pool)."""
    if getattr(_local, "pool", None) is not None:
        yield
        return
    pool = _local.pool = _new_pool(threads - 1)
    try:
        yield
    finally:
        _local.pool = None
        pool.shutdown(wait=True)


def parallel_map(fn: Callable[..., Any], *columns: list, threads: int) -> list:
    """[fn(*row) for row in zip(*columns)], the rows run on up to `threads` threads: this one and
    workers of the run's pool (or, outside a run, of a pool for this call). From a worker thread
    (a kernel inside a kernel), the rows run in the caller: waiting on the pool there could
    deadlock it."""
    rows = list(zip(*columns))
    helpers = min(threads, len(rows)) - 1
    if helpers <= 0 or getattr(_local, "worker", False):
        return [fn(*row) for row in rows]
    pool = getattr(_local, "pool", None)
    if pool is None:
        with _new_pool(helpers) as tmp:
            return _run(tmp, fn, rows, helpers)
    return _run(pool, fn, rows, helpers)


def _run(pool: ThreadPoolExecutor, fn: Callable[..., Any], rows: list[tuple], helpers: int) -> list:
    """The rows taken in order, one at a time, by this thread and `helpers` pool tasks, until none
    is left: the calling thread works too (one hand-off fewer: on a busy machine, waking a worker
    and waking this thread back can each wait for a time slice), and a thread that finishes early
    takes the next row (3 models on 2 cores: no core idles while one thread does two rows)."""
    results: list[Any] = [None] * len(rows)
    taken = itertools.count()  # next() on it is atomic under the GIL

    def drain() -> None:
        for i in taken:
            if i >= len(rows):
                return
            results[i] = fn(*rows[i])

    tasks = [pool.submit(drain) for _ in range(helpers)]
    try:
        drain()
    finally:
        wait(tasks)  # even when a row raised here: nothing is left running
    for t in tasks:
        t.result()  # a helper's error
    return results
