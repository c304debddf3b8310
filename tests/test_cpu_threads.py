"""xpmodel's CPU threads: a batch's shards, split evenly and run concurrently
under the calling thread's NumPy error handling."""
import platform
import re
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

from xpmodel.cpu_threads import (CACHE_ELEMENTS, run_elementwise, run_parallel, split, thread_count,
                                 usable_cores)
from xpmodel.errors import UsageError


@pytest.mark.parametrize("n,parts", [(10, 3), (2, 5), (7, 1), (16, 2)])
def test_split_covers_the_range_in_contiguous_nonempty_slices(n, parts):
    slices = split(n, parts)
    assert len(slices) == min(n, parts)
    assert [i for s in slices for i in range(n)[s]] == list(range(n))
    sizes = [s.stop - s.start for s in slices]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_the_thread_count_comes_from_the_environment_and_a_bad_own_value_is_named(monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("XPMODEL_NUM_THREADS", "5")
    assert thread_count() == 5
    monkeypatch.delenv("XPMODEL_NUM_THREADS")
    assert thread_count() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "many")       # another program's variable: passed over
    assert thread_count() == usable_cores()
    for bad in ("abc", "0", "-2", "1.5"):
        monkeypatch.setenv("XPMODEL_NUM_THREADS", bad)
        with pytest.raises(UsageError, match=f"XPMODEL_NUM_THREADS='{re.escape(bad)}': expected a "
                                             f"positive whole number"):
            thread_count()


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


_FREED_MEMORY_SCRIPT = """
import resource, numpy
from xpmodel import cpu_threads
cpu_threads.keep_freed_memory()
def shard():
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        activations = [numpy.ones(n) for n in (1 << 20, 3 << 20, 2 << 20, 5 << 20)]   # 8-40 MB
        del activations
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    return faults
print(cpu_threads.run_parallel([lambda: None, shard])[1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory tunes glibc's allocator")
def test_a_shard_thread_reuses_freed_memory_without_page_faults():
    # a worker thread's own glibc arena page-faulted in about 2 MB every round
    # before keep_freed_memory put every thread on the main heap
    out = subprocess.run([sys.executable, "-c", _FREED_MEMORY_SCRIPT], capture_output=True,
                         text=True, check=True).stdout
    faults = [int(f) for f in out.strip(" []\n").split(",")]
    assert faults[0] > 1000                  # the first round touches its memory
    assert sum(faults[1:]) < 100, faults     # later rounds reuse it


@pytest.mark.parametrize("size,on_gpu", [(10, False), (3 * CACHE_ELEMENTS + 5, False), (3 * CACHE_ELEMENTS, True)])
def test_elementwise_work_covers_the_buffer_once_in_cache_sized_chunks(size, on_gpu):
    seen, lock = [], threading.Lock()

    def task(part):
        with lock:
            seen.append(part)
    run_elementwise(size, task, on_gpu)
    covered = sorted(i for part in seen for i in range(size)[part])
    assert covered == list(range(size))
    if on_gpu:
        assert seen == [slice(0, size)]
    else:
        assert max(part.stop - part.start for part in seen) <= CACHE_ELEMENTS


def test_chunked_optimizer_steps_equal_whole_buffer_steps(monkeypatch):
    import xpmodel
    from xpmodel import cpu_threads
    config = xpmodel.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 64, (4, 16)), rng.integers(0, 64, (4, 16))

    def train(chunk, optimizer):
        monkeypatch.setattr(cpu_threads, "CACHE_ELEMENTS", chunk)
        model = xpmodel.GPT(config, seed=0)
        opt = xpmodel.AdamW(model, lr=1e-2, weight_decay=0.5) if optimizer == "adamw" else \
            xpmodel.Muon(model, lr=1e-2, muon_lr=0.02, weight_decay=0.5, muon_weight_decay=0.5)
        for step in range(3):
            model.zero_grad()
            model.forward_backward(idx, targets)
            opt.step(grad_scale=1.0 if step == 0 else 0.5)   # scaled in the chunks, and not
        return model.flat_params.copy()
    for optimizer in ("adamw", "muon"):
        # 97 does not divide the decayed matrices' length: a chunk straddles their end
        assert np.array_equal(train(97, optimizer), train(10**9, optimizer))


def test_shards_in_turn_repeat_a_threaded_pass_on_the_calling_thread(monkeypatch):
    """The NaN finder re-runs a step with GPT.shards_in_turn(): the same shards,
    dropout masks and embedding noise as the threaded pass, so the same loss
    and gradients bit for bit, with every shard on the calling thread."""
    import xpmodel
    monkeypatch.setenv("XPMODEL_NUM_THREADS", "2")
    config = xpmodel.GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16,
                               dropout=0.3)
    model = xpmodel.GPT(config, seed=0)
    model.embedding_noise = (5.0, "gaussian")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 32, (4, 8))
    y = np.roll(x, -1, axis=1)
    threaded = float(model.forward_backward(x, y))
    grads = model.flat_grads.copy()
    threads = set()
    shard_pass = model._shard_pass
    monkeypatch.setattr(model, "_shard_pass", lambda *a, **k: threads.add(
        threading.current_thread().name) or shard_pass(*a, **k))
    model.dropout_calls -= 1
    model.zero_grad()
    with model.shards_in_turn():
        assert float(model.forward_backward(x, y)) == threaded
    np.testing.assert_array_equal(model.flat_grads, grads)
    assert model.shard_count(4) == 2 and threads == {threading.current_thread().name}
    model._threads = 1          # one shard draws other masks: not the step that was taken
    model.dropout_calls -= 1
    assert float(model.forward_backward(x, y)) != threaded
