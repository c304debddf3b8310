"""A folder written as a whole (a Hugging Face export): readers, and a process
killed at any instant, see the old folder or the new one, never a mix.

`write_folder_atomically` writes the files into a new folder beside the
target (`.NAME.tmp-PID`, named as atomic.py names temporaries), syncs them,
and renames the folder into place; over an existing folder, it swaps the two
in one step where the system can (Linux's renameat2), and elsewhere sets the
old folder aside first (`.NAME.tmp-PID.old`) and renames the new one in.

The writer holds an flock on its new folder until the folder is in place. A
folder beside the target, named as a write names these, that no process holds
locked is what a killed writer left: the next write puts a set-aside old
folder back where the target is missing, and removes the rest when they hold
nothing but the folder's own files. A lock, unlike a process id, is not fooled
by another process that has the same id (every first process of a new
container has).
"""
import ctypes
import errno
import os
from pathlib import Path

from .atomic import fsync_folder, temporary_path, temporary_target
from .errors import XpmodelError
from .files import process_alive, try_exclusive_lock

# The suffix of an old folder set aside: no folder being written ends so.
_SET_ASIDE = ".old"


def write_folder_atomically(out_dir, write, owned_names):
    """Call write(folder) on a new folder beside out_dir, then put it in
    out_dir's place. A previous folder there, holding only `owned_names`
    (files this kind of folder holds), is swapped out and those files removed
    after; anything else found in it then is left there for its owner. On a
    failure the new folder is removed and out_dir is left as it was; the error
    names the file that could not be written."""
    target = Path(os.path.abspath(out_dir))   # "out/.." or "." named by a real name
    parent = target.parent
    if os.path.lexists(target) and (target.is_symlink() or not target.is_dir()):
        raise XpmodelError(f"{out_dir}: exists and is not a folder; nothing was written there")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        restored = _clear_leftovers(target, owned_names)
        if restored:
            raise XpmodelError(f"{out_dir}: put back as it was before an interrupted write, which "
                               f"had set it aside; it holds files this write would set aside "
                               f"again ({', '.join(restored[:3])}): check them, then run again")
        staging = temporary_path(target)
        for leftover in (staging, staging.with_name(staging.name + _SET_ASIDE)):
            _refuse_in_the_way(leftover, owned_names)
        staging.mkdir()
    except OSError as exc:
        raise XpmodelError(f"cannot create {exc.filename or parent}: "
                           f"{exc.strerror or exc}") from None
    lock, placed, old = _hold(staging, out_dir), False, None
    try:
        try:
            write(staging)
            for path in staging.iterdir():
                _fsync_file(path)
        except OSError as exc:
            where = Path(out_dir) / Path(exc.filename).name if exc.filename else f"into {out_dir}"
            raise XpmodelError(f"cannot write {where}: {exc.strerror or exc}; "
                               f"nothing was written to {out_dir}") from None
        try:
            old = _put_in_place(staging, target)
        except OSError as exc:
            raise XpmodelError(f"cannot move the new folder into {out_dir}: "
                               f"{exc.strerror or exc}; nothing was written there") from None
        placed = True
        fsync_folder(parent)
    finally:
        if lock is not None:
            os.close(lock)
        # the old folder once the new one is in place; before, the new folder
        # (or, swapped but interrupted before `placed`, the old one)
        leftover = old if placed else staging
        if leftover is not None:
            _remove_owned(leftover, owned_names)


def _put_in_place(staging, out_dir):
    """Move the written folder `staging` to `out_dir`; returns where the old
    folder went (None when there was none). Over an existing folder: one
    atomic swap where renameat2 can, the old folder then under staging's
    name; elsewhere two renames, the old folder set aside first."""
    old = None
    if not out_dir.exists():
        os.rename(staging, out_dir)
    elif _exchange(staging, out_dir):
        old = staging
    else:
        old = staging.with_name(staging.name + _SET_ASIDE)
        os.rename(out_dir, old)
        try:
            os.rename(staging, out_dir)
        except BaseException:   # an error, or Ctrl-C between the two renames
            os.rename(old, out_dir)
            raise
    return old


def _owns(name, owned_names):
    """Whether `name` is one of a folder's own files, or the temporary of one."""
    temporary = temporary_target(name)
    return name in owned_names or (temporary is not None and temporary[0] in owned_names)


def _remove_owned(folder, owned_names):
    """Remove the folder's own files (and their temporaries) from `folder`,
    then the folder if that empties it; anything else is left for its owner."""
    try:
        for path in folder.iterdir():
            if _owns(path.name, owned_names) and not path.is_dir():
                path.unlink()
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


def _hold(staging, out_dir):
    """The flock on the new folder `staging`, as an open descriptor (None where
    the file system has no locks); an error when another process holds it,
    clearing it as a leftover while this one had just made it."""
    try:
        lock = try_exclusive_lock(staging)
    except OSError:
        return None
    if lock is None:
        raise XpmodelError(f"cannot write {out_dir}: another process is writing beside it; "
                           f"nothing was written there")
    return lock


def _refuse_in_the_way(leftover, owned_names):
    """An error when the folder `leftover`, where this write must make its own,
    is an interrupted write's that holds files such a write does not (which
    `_clear_leftovers` therefore kept)."""
    if os.path.lexists(leftover):
        others = sorted(path.name for path in leftover.iterdir()
                        if not _owns(path.name, owned_names) or path.is_dir())
        raise XpmodelError(f"{leftover}: an interrupted write left this folder, holding files it "
                           f"does not write ({', '.join(others[:3]) or 'none'}); move them out "
                           f"of it and remove it, then run again")


def _clear_leftovers(target, owned_names):
    """Before a folder write to `target`: of the folders a killed writer left
    beside it (`.NAME.tmp-PID`, `.NAME.tmp-PID.old`) that no process holds
    locked and whose writer's id is this process's or no live one's, put a
    set-aside old folder back where target is missing, and remove the rest
    when they hold nothing but the folder's own files. Returns the names of
    the files other than those in a folder put back (none: the write goes on)."""
    restored = []
    for entry in sorted(os.scandir(target.parent), key=lambda entry: entry.name):
        set_aside = entry.name.endswith(_SET_ASIDE)
        temporary = temporary_target(entry.name[:-len(_SET_ASIDE)] if set_aside else entry.name)
        if temporary is None or temporary[0] != target.name or \
                not entry.is_dir(follow_symlinks=False) or \
                (temporary[1] != os.getpid() and process_alive(temporary[1])):
            continue
        try:
            lock = try_exclusive_lock(entry.path)
        except OSError:
            continue       # no locks here: a live writer's cannot be told apart
        if lock is None:
            continue       # a live writer's
        try:
            leftover = Path(entry.path)
            if set_aside and not os.path.lexists(target):
                os.rename(leftover, target)
                restored = sorted(path.name for path in target.iterdir()
                                  if not _owns(path.name, owned_names) or path.is_dir())
            elif all(_owns(path.name, owned_names) and not path.is_dir()
                     for path in leftover.iterdir()):
                _remove_owned(leftover, owned_names)
        except OSError:
            pass
        finally:
            os.close(lock)
    return restored


def _fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)
