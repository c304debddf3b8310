"""`BPETokenizer.encode_chunks` in worker processes, each holding its own copy
of the tokenizer rebuilt from its JSON."""
import json
import multiprocessing
import signal
from collections import deque

_worker_tokenizer = None  # set in each worker by _install_worker_tokenizer
_WORKER_TIMEOUT_S = 600   # one chunk (about a megabyte) takes well under a second


def encode_in_workers(tokenizer_class, document, chunks, workers):
    """Yield the uint32 ids array of each (text, continued) chunk, in order,
    encoded by `workers` processes that rebuild the tokenizer with
    `tokenizer_class._from_document` from its JSON `document`.

    Only strings and arrays cross the process boundary, and at most two
    chunks per worker are in flight. Workers are started by a fork server (or
    spawned), never forked from this process, whose other threads may hold
    locks a forked child would wait on forever.
    """
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    pool = context.Pool(workers, initializer=_install_worker_tokenizer,
                        initargs=(tokenizer_class, document))
    try:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get(_WORKER_TIMEOUT_S)
        while pending:
            yield pending.popleft().get(_WORKER_TIMEOUT_S)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _install_worker_tokenizer(tokenizer_class, document):
    global _worker_tokenizer
    # Ctrl-C reaches the whole process group: the command stops the workers
    # itself (pool.terminate), so a worker does not print its own traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_tokenizer = tokenizer_class._from_document(json.loads(document))


def _encode_in_worker(text, continued):
    return _worker_tokenizer._encode_to_array(text, continued)
