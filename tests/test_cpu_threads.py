"""xpmodel's CPU threads: a batch's shards, split evenly and run concurrently
under the calling thread's NumPy error handling."""
import threading
import warnings

import numpy as np
import pytest

from xpmodel.cpu_threads import run_parallel, split


@pytest.mark.parametrize("n,parts", [(10, 3), (2, 5), (7, 1), (16, 2)])
def test_split_covers_the_range_in_contiguous_nonempty_slices(n, parts):
    slices = split(n, parts)
    assert len(slices) == min(n, parts)
    assert [i for s in slices for i in range(n)[s]] == list(range(n))
    sizes = [s.stop - s.start for s in slices]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_tasks_run_concurrently_and_results_come_back_in_order():
    meeting = threading.Barrier(3, timeout=10)     # broken (an error) unless all three run at once

    def task(i):
        meeting.wait()
        return i, threading.current_thread().name
    results = run_parallel([lambda i=i: task(i) for i in range(3)])
    assert [i for i, _ in results] == [0, 1, 2]
    assert results[0][1] == threading.current_thread().name   # the caller takes the first itself


def test_workers_keep_the_callers_error_handling():
    def overflow():
        return np.float32(3e38) * np.float32(10)
    with warnings.catch_warnings(), np.errstate(over="ignore"):
        warnings.simplefilter("error")
        results = run_parallel([overflow, overflow, overflow])
    assert all(np.isinf(r) for r in results)
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        run_parallel([overflow, overflow])
