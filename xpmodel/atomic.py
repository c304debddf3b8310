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
target, synced, and the folder is renamed into place, or, over an existing
one, swapped with it in one step where the system can (Linux's renameat2).
"""
import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import time
from pathlib import Path

from .errors import XpmodelError
from .files import process_alive

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
    """Call write(folder) on a new folder beside out_dir, then put it in
    out_dir's place. A previous folder there, holding only `owned_names`
    (files this kind of folder holds), is swapped out and its files removed
    after. On a failure the new folder is removed and out_dir is left as it
    was; the error names the file that could not be written. What a killed
    writer left beside out_dir (see `_clear_leftovers`) is cleared first."""
    target = Path(os.path.abspath(out_dir))   # "out/.." or "." named by a real name
    parent = target.parent
    if os.path.lexists(target) and (target.is_symlink() or not target.is_dir()):
        raise XpmodelError(f"{out_dir}: exists and is not a folder; nothing was written there")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(target, owned_names)
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
    """Move the written folder `staging` to `out_dir`. Over an existing folder:
    one atomic swap where renameat2 can, so a kill at any instant leaves the
    old folder or the new one in place; elsewhere two renames, the old folder
    set aside first as STAGING.old, which `_clear_leftovers` puts back if the
    process dies between them."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
    elif _exchange(staging, out_dir):
        _remove_owned(staging, owned_names)   # the old folder, now under staging's name
    else:
        old = staging.with_name(staging.name + ".old")
        os.rename(out_dir, old)
        try:
            os.rename(staging, out_dir)
        except BaseException:   # an error, or Ctrl-C between the two renames
            os.rename(old, out_dir)
            raise
        _remove_owned(old, owned_names)
    _fsync_dir(out_dir.parent)


def _remove_owned(folder, owned_names):
    """Remove `owned_names` from `folder`, then the folder if that empties it;
    anything else found there is left for its owner."""
    for name in owned_names:
        (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a, b):
    """Swap the paths a and b in one step (Linux renameat2 RENAME_EXCHANGE);
    False where the C library, kernel or file system cannot, nothing moved."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _clear_leftovers(target, owned_names):
    """Before a folder write to `target`: of the folders a killed writer left
    beside it (`.NAME.tmp-PID`, and `.NAME.tmp-PID.old` between the two
    renames of `_put_in_place`), put a set-aside old folder back where target
    is missing, and remove the rest. Only folders holding nothing but
    `owned_names` count, and only those of a dead process or of one with this
    process's id (which has made none yet: a leftover of an earlier process
    that had the same id, as every first process of a new container has)."""
    for entry in sorted(target.parent.iterdir()):
        pid = _leftover_pid(entry.name, target.name)
        if pid is None or not entry.is_dir() or entry.is_symlink() or \
                (process_alive(pid) and pid != os.getpid()) or \
                any(path.name not in owned_names for path in entry.iterdir()):
            continue
        if entry.name.endswith(".old") and not os.path.lexists(target):
            os.rename(entry, target)
        else:
            _remove_owned(entry, owned_names)


def _leftover_pid(name, target_name):
    """The writer's pid in a leftover folder's name, or None for another name."""
    stem = name[:-len(".old")] if name.endswith(".old") else name
    found = temporary_target(stem)
    return found[1] if found is not None and found[0] == target_name else None


def _fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)
