"""The kernels' worker threads (workers.py): one pool per run, joined at its end."""

from __future__ import annotations

import threading

from mergelang import workers


def _kernel_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("mergelang-kernel")}


def test_parallel_map_is_the_plain_map_in_order():
    assert workers.parallel_map(lambda a, b: a * b, [1, 2, 3], [4, 5, 6], threads=2) == [4, 10, 18]
    assert workers.parallel_map(lambda a: a, [], threads=2) == []


def test_a_run_reuses_its_threads_and_joins_them_at_the_end():
    before = _kernel_threads()
    seen = set()
    with workers.run_pool(2):
        for _ in range(20):
            workers.parallel_map(lambda _: seen.add(threading.current_thread().name), [0, 1], threads=2)
        with workers.run_pool(2):  # a nested run (statistics pre-pass) shares the outer pool
            workers.parallel_map(lambda _: seen.add(threading.current_thread().name), [0, 1], threads=2)
    assert 1 <= len(seen) <= 2  # 42 calls, at most 2 threads ever started
    assert all(name.startswith("mergelang-kernel") for name in seen)
    assert _kernel_threads() == before  # no thread outlives the run


def test_a_kernel_inside_a_kernel_runs_inline_without_deadlock():
    with workers.run_pool(1):  # one worker: waiting on the pool from inside it would hang
        out = workers.parallel_map(
            lambda a: workers.parallel_map(lambda b: (a, b, threading.current_thread().name), [0, 1],
                                           threads=2), [0, 1], threads=2)
    for a, rows in enumerate(out):
        assert [r[:2] for r in rows] == [(a, 0), (a, 1)]
        assert len({r[2] for r in rows}) == 1  # the inner rows ran in the one calling worker


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
