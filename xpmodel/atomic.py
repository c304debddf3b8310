"""Atomic file writes: readers see a file's old contents or its new ones, never a mix.

The data goes to a temporary file beside the target, is flushed and fsynced,
and is renamed over the target; the folder is fsynced so the rename itself
survives a power cut. A failure, or a signal, removes the temporary file.
"""
import os
import time
from pathlib import Path

# Temporary files being written right now, so that a second Ctrl-C, which
# leaves at once, can remove them on its way out (see `abandon_partial_writes`).
_in_flight = set()


def atomic_write_bytes(path, data, pause=0.0):
    """Write `data` to `path` so that readers see the old file or the new one.

    pause: seconds to wait between the fsync and the rename (crash tests only).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _in_flight.add(tmp)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if pause > 0:
            time.sleep(pause)
        os.replace(tmp, path)
    except OSError as exc:   # reported against the file the caller named, not the temporary
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _in_flight.discard(tmp)
    _fsync_dir(path.parent)


def abandon_partial_writes():
    """Remove the temporary files of writes in progress; for a process about
    to exit without finishing them. The targets keep their previous contents."""
    for tmp in list(_in_flight):
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
