"""Short stretches of work that a signal must not cut in two: a folder's few
renames, the removal of what a failed start wrote. `deferred_signals` holds
SIGINT, SIGTERM and SIGHUP until the stretch ends, then lets the first one
that came act as it would have (a KeyboardInterrupt, the trainer's stop, the
default exit). Python runs signal handlers in the main thread whichever
thread the signal reached, so the handlers are swapped, not the thread's
signal mask; elsewhere than the main thread nothing is held.
"""
import contextlib
import signal
import threading

_HELD = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
              if hasattr(signal, name))


@contextlib.contextmanager
def deferred_signals():
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends; the first that
    came meanwhile is raised again then, to the handler it would have met."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum))
                for signum in _HELD}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            signal.raise_signal(caught[0])
