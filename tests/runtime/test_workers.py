"""The kernels' worker threads (workers.py): one pool per run, joined at its end."""

from __future__ import annotations

import threading

from mergelang.runtime import workers


def _kernel_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("mergelang-kernel")}


def test_parallel_map_is_the_plain_map_in_order():
    assert workers.parallel_map(lambda a, b: a * b, [1, 2, 3], [4, 5, 6], threads=2) == [4, 10, 18]
    assert workers.parallel_map(lambda a: a, [], threads=2) == []


def test_a_run_reuses_its_threads_and_joins_them_at_the_end():
    before = _kernel_threads()
    seen = set()
    with workers.run_pool(3):  # the caller and 2 workers
        for _ in range(20):
            workers.parallel_map(lambda _: seen.add(threading.current_thread().name), [0, 1, 2],
                                 threads=3)
        with workers.run_pool(3):  # a nested run (statistics pre-pass) shares the outer pool
            workers.parallel_map(lambda _: seen.add(threading.current_thread().name), [0, 1, 2],
                                 threads=3)
    workers_seen = seen - {threading.current_thread().name}
    assert 1 <= len(workers_seen) <= 2  # 21 calls, at most 2 worker threads ever started
    assert all(name.startswith("mergelang-kernel") for name in workers_seen)
    assert _kernel_threads() == before  # no thread outlives the run


def test_a_kernel_inside_a_kernel_runs_inline_without_deadlock():
    with workers.run_pool(2):  # one worker: waiting on the pool from inside it would hang
        out = workers.parallel_map(
            lambda a: (threading.current_thread().name,
                       workers.parallel_map(lambda b: (a, b, threading.current_thread().name),
                                            [0, 1, 2], threads=2)), [0, 1, 2], threads=2)
    for a, (outer, rows) in enumerate(out):
        assert [r[:2] for r in rows] == [(a, 0), (a, 1), (a, 2)]
        if outer.startswith("mergelang-kernel"):  # a call made on a worker ran inline there
            assert {r[2] for r in rows} == {outer}


def test_the_caller_takes_every_row_while_the_workers_are_busy():
    """Rows are taken one at a time by whichever thread is free: with the pool's only worker
    held by another task, the calling thread runs all of them."""
    release = threading.Event()
    with workers.run_pool(2):
        blocker = workers._local.pool.submit(release.wait)
        timer = threading.Timer(0.5, release.set)  # frees the worker after the rows are done
        timer.start()
        names = workers.parallel_map(lambda _: threading.current_thread().name, range(5), threads=2)
        blocker.result()
    timer.join()
    assert names == [threading.current_thread().name] * 5


def test_runs_in_two_threads_have_their_own_pools():
    pools, barrier = [], threading.Barrier(2)

    def run():
        with workers.run_pool(2):
            pools.append(workers._local.pool)
            barrier.wait()  # both runs are live at once
            workers.parallel_map(lambda x: x, [1, 2], threads=2)
            barrier.wait()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(pools) == 2 and pools[0] is not pools[1]


def test_an_error_in_any_row_propagates_after_every_row_finished():
    done = []

    def fn(x):
        if x == 0:
            raise ValueError("row 0")
        done.append(x)
        return x

    with workers.run_pool(2):
        try:
            workers.parallel_map(fn, [0, 1, 2], threads=2)
        except ValueError as e:
            assert str(e) == "row 0"
        else:
            raise AssertionError("the error was lost")
        assert sorted(done) == [1, 2]  # nothing still running when the error surfaced
        try:
            workers.parallel_map(lambda x: 1 / x, [1, 0], threads=2)  # a worker's error
        except ZeroDivisionError:
            pass
        else:
            raise AssertionError("the worker's error was lost")
