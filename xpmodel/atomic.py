"""Atomic file writes: readers see a file's old contents or its new ones, never a mix.

Every file xpmodel writes goes through `atomic_writer` (or its one-call form
`atomic_write_bytes`): the data goes to a temporary file beside the target,
is flushed and fsynced, and is renamed over the target; the folder is
fsynced so the rename itself survives a power cut. A failure, or a signal,
removes the temporary file. New files get the permissions the user's umask
allows (0644 under the usual 022), like any file a shell command writes.
Missing folders above the target are created at the write, not before: a
command checks its outputs first (train/outputs.py), and one that fails
before writing leaves no empty folder behind.

Temporary files are named `.NAME.tmp-PID`; `is_temporary_name` recognises
them (`temporary_target` reads NAME and PID back), so a folder's leftovers from a killed process can be told apart from
the user's own files.

A folder written as a whole (a Hugging Face export) goes through
`write_folder_atomically`: its files are written into a new folder beside the
target, synced, and the folder is renamed into place.
"""
import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from .errors import XpmodelError

# Temporary files being written right now, so that a second Ctrl-C, which
# leaves at once, can remove them on its way out (see `abandon_partial_writes`).
_in_flight = set()
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)$")


def temporary_path(path):
    """Where the new contents of `path` are written before the rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_temporary_name(name):
    """True for the name of a temporary file that `atomic_writer` writes."""
    return bool(_TEMPORARY.match(name))


def temporary_target(name):
    """(target name, writer's pid) of a temporary file's name
    (`.NAME.tmp-PID` -> ("NAME", PID)), or None for any other name."""
    match = _TEMPORARY.match(name)
    return (match["target"], int(match["pid"])) if match else None


def atomic_write_bytes(path, data, pause=0.0):
    """Write `data` to `path` so that readers see the old file or the new one.

    pause: seconds to wait between the fsync and the rename (crash tests only).
    """
    with atomic_writer(path, pause=pause) as f:
        f.write(data)



def atomic_write_json(path, document):
    """`document` as indented UTF-8 JSON ending in a newline, written as
    atomic_write_bytes writes."""
    atomic_write_bytes(path, (json.dumps(document, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))

@contextlib.contextmanager
def atomic_writer(path, pause=0.0):
    """A binary file that replaces `path` when the `with` block ends without
    error; missing folders above `path` are created first.

    An OSError of the write itself (a full disk, say) names `path`, not the
    temporary file; an exception from the block removes the temporary file
    and leaves `path` as it was.
    """
    path = Path(path)
    tmp = temporary_path(path)
    _in_flight.add(tmp)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise _naming(exc, path) from None
        with open(fd, "wb") as raw:
            yield _TargetFile(raw, path)
            try:
                raw.flush()
                os.fsync(raw.fileno())
            except OSError as exc:
                raise _naming(exc, path) from None
        if pause > 0:
            time.sleep(pause)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise _naming(exc, path) from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        _in_flight.discard(tmp)
    _fsync_dir(path.parent)


class _TargetFile:
    """The temporary file, with write errors reported against the target."""

    def __init__(self, raw, target):
        self._raw, self._target = raw, target

    def write(self, data):
        try:
            return self._raw.write(data)
        except OSError as exc:
            raise _naming(exc, self._target) from None

    def seek(self, offset, whence=os.SEEK_SET):
        return self._raw.seek(offset, whence)

    def tell(self):
        return self._raw.tell()


def _naming(exc, path):
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


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


def write_folder_atomically(out_dir, write, owned_names):
    """Call write(folder) on a new folder beside out_dir, then rename it to
    out_dir. A previous folder there, holding only `owned_names` (files this
    kind of folder holds), is set aside and its files removed after. On a
    failure the new folder is removed and out_dir is left as it was; the error
    names the file that could not be written."""
    target = Path(os.path.abspath(out_dir))   # "out/.." or "." named by a real name
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = temporary_path(target)   # a killed process's leftover is recognisable
        staging.mkdir()
    except OSError as exc:
        raise XpmodelError(f"cannot create {exc.filename or parent}: "
                           f"{exc.strerror or exc}") from None
    try:
        try:
            write(staging)
            for path in staging.iterdir():
                _fsync_file(path)
        except OSError as exc:
            name = Path(exc.filename).name if exc.filename else "the folder"
            raise XpmodelError(f"cannot write {Path(out_dir) / name}: {exc.strerror or exc}; "
                               f"nothing was written to {out_dir}") from None
        try:
            _put_in_place(staging, target, owned_names)
        except OSError as exc:
            raise XpmodelError(f"cannot move the new folder into {out_dir}: "
                               f"{exc.strerror or exc}; nothing was written there") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _put_in_place(staging, out_dir, owned_names):
    if not out_dir.exists():
        os.rename(staging, out_dir)
    else:
        old = staging.with_name(staging.name + ".old")
        os.rename(out_dir, old)
        try:
            os.rename(staging, out_dir)
        except BaseException:   # an error, or Ctrl-C between the two renames
            os.rename(old, out_dir)
            raise
        for name in owned_names:   # nothing else was there when the write began
            (old / name).unlink(missing_ok=True)
        try:
            old.rmdir()
        except OSError:   # a file appeared there meanwhile: left for its owner
            pass
    _fsync_dir(out_dir.parent)


def _fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)
