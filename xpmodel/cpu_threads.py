"""Using every CPU core for NumPy work.

NumPy runs elementwise work on one core, and OpenBLAS's own threading costs
more than it saves on the many small per-head products of attention. So on
CPU, xpmodel splits a batch into one shard per core and runs each shard's
whole forward/backward pass in its own thread (NumPy releases the GIL inside
BLAS calls and ufunc loops), with BLAS limited to one thread meanwhile.

The thread count is XPMODEL_NUM_THREADS when set, else OMP_NUM_THREADS or
OPENBLAS_NUM_THREADS, else the cores this process may run on.

Every step allocates and frees activations of many megabytes. glibc serves
such blocks with fresh mmap()s and hands them back on free, so each step
would page-fault its whole working set in again; `keep_freed_memory` makes
it reuse freed memory instead (the process keeps its peak size). It also
keeps every thread on glibc's main heap: a worker thread's own arena grows
and shrinks its heaps with the step regardless, which cost the second shard
of a 2-core `seed` step about 14,600 page faults and a tenth of its time.
"""
import ctypes
import ctypes.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy

from .errors import UsageError

_pool = None
_controller = None
THREADS_ENV = "XPMODEL_NUM_THREADS"


def thread_count():
    """XPMODEL_NUM_THREADS (a positive whole number, or an error naming it),
    else OMP_NUM_THREADS or OPENBLAS_NUM_THREADS where they hold one, else
    the usable cores."""
    own = os.environ.get(THREADS_ENV, "").strip()
    if own and not (own.isdigit() and int(own) > 0):
        raise UsageError(f"{THREADS_ENV}={own!r}: expected a positive whole number of threads")
    others = (os.environ.get(name, "") for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"))
    for value in (own, *others):
        if value.isdigit() and int(value) > 0:
            return int(value)
    return usable_cores()


def usable_cores():
    """The CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def run_parallel(tasks):
    """Call every zero-argument callable in `tasks` concurrently; their results,
    in order. Each runs under the calling thread's NumPy error handling
    (numpy.errstate holds for one thread, so a worker would otherwise warn
    about an overflow the caller chose to ignore, as the trainer does)."""
    global _pool
    if len(tasks) == 1:
        return [tasks[0]()]
    if _pool is None or _pool._max_workers < len(tasks) - 1:
        _pool = ThreadPoolExecutor(max_workers=len(tasks) - 1, thread_name_prefix="xpmodel")
    handling = numpy.geterr()

    def under_callers_handling(task):
        with numpy.errstate(**handling):
            return task()
    futures = [_pool.submit(under_callers_handling, task) for task in tasks[1:]]
    first = tasks[0]()            # the calling thread takes a share too
    return [first] + [future.result() for future in futures]


@contextmanager
def single_threaded_blas():
    """BLAS on one thread for the duration (xpmodel's own threads share the cores)."""
    global _controller
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        yield
        return
    if _controller is None:
        _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        yield


CACHE_ELEMENTS = 1 << 16   # a chunk of elementwise work: a few arrays of it stay in a core's cache


def run_elementwise(size, task, on_gpu):
    """task(part) over slices covering range(size) of flat buffers. A GPU takes
    it whole. On the CPU each thread takes an equal share, CACHE_ELEMENTS at a
    time: NumPy makes one pass over memory per operation, and a chain of them
    over a chunk this size reads the core's cache instead of main memory
    (AdamW's update of 5.8M float32 weights on two threads: 13.5 ms whole,
    9.3 ms chunked)."""
    if on_gpu:
        task(slice(0, size))
        return

    def share(part):
        for start in range(part.start, part.stop, CACHE_ELEMENTS):
            task(slice(start, min(start + CACHE_ELEMENTS, part.stop)))
    run_parallel([lambda part=part: share(part) for part in split(size, thread_count())])


def split(n, parts):
    """`parts` contiguous slices covering range(n) as evenly as possible (none empty)."""
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8   # mallopt parameters (malloc.h)
_memory_kept = False


def keep_freed_memory():
    """Ask glibc to keep and reuse freed large blocks, in one arena for every
    thread (once per process, before the shard threads start; Linux only)."""
    global _memory_kept
    if _memory_kept or not sys.platform.startswith("linux"):
        return
    _memory_kept = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)   # mallopt takes a C int
        libc.mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass   # not glibc: its allocator keeps its own policy
