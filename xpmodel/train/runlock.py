"""One writer per run directory: an exclusive lock on its .xpmodel.lock.

The lock is flock(2)'s, so the kernel releases it when its process dies,
kill -9 included; the file records the holder's pid, host and command for
the message a second writer gets. Where a file system has no flock (some
network file systems), a lock whose recorded holder still runs counts as
held. Taking the lock creates the run's folder if needed, and releasing it
removes the folders it created while they are empty; a folder that was there
or that another process made meanwhile is never removed.

The lock file is opened without following a link and must then be a regular
file with one name: a symbolic link, a hard link to another file, a FIFO or a
device planted under the lock's name is refused, named, and left as it was
(nothing is written to it, and opening never waits on a FIFO).
"""
import errno
import fcntl
import json
import math
import os
import socket
import stat
import sys
import time

from ..errors import UsageError, XpmodelError, quote
from ..files import (entry_identity, file_identity, file_kind, make_folders, parse_json,
                     process_alive, remove_made_folders)

_held = {}   # (device, inode) of a run directory -> RunLock holding it in this process


def held_lock(path):
    """The RunLock this process holds on the run directory `path`, or None. A
    folder that took the inode of a held one removed since is not held: its
    lock file must be the one the lock has open."""
    key = _key(path)
    lock = None if key is None else _held.get(key)
    if lock is None or entry_identity(os.path.join(path, lock.run.lock_path.name)) != \
            file_identity(os.fstat(lock._fd)):
        return None
    return lock


class RunLock:
    """An exclusive lock on a run directory; see `RunDir.lock`."""

    folder_name = "the run directory"   # what messages call the folder

    def __init__(self, run, flag):
        self.run, self.flag = run, flag
        self.found_stale = False   # a lock file was left by a process that died
        self._fd = None
        self._depth = 0
        self._made = []            # (folder, identity) of those this lock created, deepest first
        self._key = None           # the run directory's identity while held

    def __enter__(self):
        path = self.run.path
        if os.path.lexists(path) and not path.is_dir():
            raise UsageError(f"{self.flag} {path}: exists and is not a directory")
        self._outer = held_lock(path)
        if self._outer is None:
            try:
                self._make_folders(path)
            except OSError as exc:
                self._remove_made_folders()
                raise UsageError(f"{self.flag} {path}: cannot create {self.folder_name} "
                                 f"({exc.strerror or exc})") from None
            # a/../b names b only once a exists: a lock this process holds on b
            # is found now, not taken for another process's.
            self._outer = held_lock(path)
        if self._outer is not None:
            self._remove_made_folders()
            self._outer._depth += 1
            return self._outer
        try:
            self._acquire()
        except BaseException:
            self._remove_made_folders()
            raise
        self._depth = 1
        self._key = _key(path)
        _held[self._key] = self
        return self

    def __exit__(self, *exc):
        if self._outer is not None:
            self._outer._depth -= 1
            return False
        self._depth -= 1
        if self._depth == 0:
            self.release()
        return False

    def _make_folders(self, path):
        """Create the missing folders of `path`, recording those this lock made
        (files.make_folders)."""
        self._made = make_folders(path)
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))

    def _acquire(self):
        lock_path = self.run.lock_path
        for _ in range(20):
            fd = self._open_lock_file(lock_path)
            try:
                holder = _read_holder(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UsageError(self._in_use(holder)) from None
                except OSError as exc:
                    # No flock here (some network file systems): judge by the pid.
                    if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
                    if holder and _holder_alive(holder):
                        raise UsageError(self._in_use(holder)) from None
                if file_identity(os.fstat(fd)) != entry_identity(lock_path):
                    os.close(fd)   # released and removed by its holder meanwhile: try again
                    continue
                self.found_stale = holder is not None and not self.run.is_run()
                record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                          "command": " ".join(sys.argv)[:300]}
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
                except OSError as exc:   # a full disk: the lock file, held by this process, goes
                    lock_path.unlink(missing_ok=True)
                    raise XpmodelError(f"{self.flag} {self.run.path}: cannot write its lock file "
                                       f"{lock_path} ({exc.strerror or exc}); nothing was "
                                       f"written there") from None
                self._fd = fd
                return
            except BaseException:
                if self._fd != fd:
                    os.close(fd)
                raise
        raise UsageError(f"{self.flag} {self.run.path}: could not take its lock file {lock_path}")

    def _open_lock_file(self, lock_path):
        """A descriptor of the lock file, created if missing; refused, untouched,
        unless it is a regular file with one link (see the module's docstring)."""
        problem = lock_file_problem(lock_path)   # checked before opening: opening a device may act
        if problem is None:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                             | getattr(os, "O_CLOEXEC", 0), 0o666)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise UsageError(f"{self.flag} {self.run.path}: cannot create its lock file "
                                     f"{lock_path} ({exc.strerror or exc})") from None
                problem = "is a symbolic link"   # put there since the check above
            else:
                problem = _not_a_lock_file(os.fstat(fd))
                if problem is None:
                    os.set_blocking(fd, True)
                    return fd
                os.close(fd)
        raise UsageError(f"{self.flag} {self.run.path}: its lock file {lock_path} {problem}, not a "
                         f"file xpmodel made; xpmodel writes nothing through it: move it away and "
                         f"try again")

    def _in_use(self, holder):
        return (f"{self.flag} {self.run.path}: in use by {holder_text(holder)}; one process "
                f"writes a run at a time: wait for it to finish or stop it first")

    def release(self):
        if self._fd is not None:
            try:
                if file_identity(os.fstat(self._fd)) == entry_identity(self.run.lock_path):
                    self.run.lock_path.unlink(missing_ok=True)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        if _held.get(self._key) is self:   # not a lock that took over a reused inode since
            del _held[self._key]
        self._key = None
        self._remove_made_folders()

    def _remove_made_folders(self):
        remove_made_folders(self._made)
        self._made = []


def _key(path):
    """(device, inode) of the directory `path` leads to, or None where it leads nowhere."""
    try:
        return file_identity(os.stat(path))
    except OSError:
        return None


def lock_file_problem(lock_path):
    """None when `lock_path` is missing or could be a lock file xpmodel made (a
    regular file with one link), else what it is instead, e.g. "is a FIFO"."""
    try:
        return _not_a_lock_file(os.lstat(lock_path))
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be examined ({exc.strerror or exc})"


def _not_a_lock_file(status):
    if not stat.S_ISREG(status.st_mode):
        return f"is {file_kind(status.st_mode)}"
    if status.st_nlink != 1:
        return f"has {status.st_nlink} hard links (it is another file's too)"
    return None


def _read_holder(fd):
    """The pid/host record in a lock file, or None when it is empty or unreadable."""
    try:
        data = os.pread(fd, 4096, 0)
        if not data.strip():
            return None
        holder = parse_json(data)
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _holder_alive(holder):
    """Whether a lock's recorded holder still runs; a holder on another host
    cannot be checked and counts as alive."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    return type(pid) is int and process_alive(pid)


def holder_text(holder):
    """'another xpmodel process (pid N on HOST, since DATE)': a lock's holder,
    as its lock file records it (`lock_holder`), for a message."""
    who = "another xpmodel process"
    if holder:
        started = holder.get("started")
        since = (f", since {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}"
                 if isinstance(started, (int, float)) and math.isfinite(started) else "")
        who += f" (pid {quote(holder.get('pid'), 20)} on {quote(holder.get('host'), 80)}{since})"
    return who


def lock_is_free(lock_path):
    """True when nobody holds the lock file (its holder died)."""
    return lock_holder(lock_path) is None


def lock_holder(lock_path):
    """None when nobody holds the lock file (its holder died); else what the
    file records of the holder (pid, host, started, command), {} when that
    cannot be read. Only reads: nothing is created or written. A lock file
    that is not a regular file with one link is never one xpmodel holds
    (`lock_file_problem` says what it is); it is not opened, so never waited on."""
    if lock_file_problem(lock_path) is not None:
        return None
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        # ELOOP: replaced by a link since the check
        return None if exc.errno == errno.ELOOP else {}
    try:
        if _not_a_lock_file(os.fstat(fd)) is not None:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _read_holder(fd) or {}
    except OSError:
        holder = _read_holder(fd)
        return holder if holder and _holder_alive(holder) else None
    finally:
        os.close(fd)
