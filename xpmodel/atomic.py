"""Atomic file writes: readers see a file's old contents or its new ones, never a mix.

Every file xpmodel writes goes through `atomic_writer` (or its one-call form
`atomic_write_bytes`): the data goes, unbuffered, to a temporary file beside
the target, is fsynced, and is renamed over the target; the folder is fsynced
so the rename itself survives a power cut. A failure, or a signal,
removes the temporary file. New files get the permissions the user's umask
allows (0644 under the usual 022), like any file a shell command writes.
Missing folders above the target are created at the write, not before: a
command checks its outputs first (train/outputs.py), and one that fails
before writing leaves no empty folder behind.

Temporary files are named `.NAME.tmp-PID`; `is_temporary_name` recognises
them (`temporary_target` reads NAME and PID back), so a folder's leftovers
from a killed process can be told apart from the user's own files:
`dead_temporaries` finds them, and a write of NAME removes those of NAME
(`remove_stale_temporaries`).

An output a command found absent when it checked it (train/outputs.py
calls `note_output`) is put in place only while it is still absent: by a hard
link, which fails if another process wrote the same file meanwhile (two
commands started with the same --out), so that the later one stops with an
error instead of replacing the other's file.

A folder written as a whole goes through folder_write.py, which builds on
these writes.
"""
import contextlib
import contextvars
import errno
import json
import os
import re
import time
from pathlib import Path

from .errors import XpmodelError
from .files import make_folders, process_alive, remove_made_folders

# Temporary files being written right now, so that a second Ctrl-C, which
# leaves at once, can remove them on its way out (see `abandon_partial_writes`).
_in_flight = set()
# The `staged_writes` block this thread's writes are held in, if any.
_stage = contextvars.ContextVar("xpmodel_staged_writes", default=None)
# Outputs found absent when the command checked them (absolute paths; `note_output`).
_new_outputs = set()
# A temporary this recent may be another machine's write in a shared folder.
STALE_TEMPORARY_S = 60
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)\Z")


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
    """`document` as `json_bytes`, written as atomic_write_bytes writes."""
    atomic_write_bytes(path, json_bytes(document))


def json_bytes(document):
    """`document` as indented UTF-8 JSON ending in a newline, as xpmodel writes JSON."""
    return (json.dumps(document, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


@contextlib.contextmanager
def atomic_writer(path, pause=0.0):
    """A binary file that replaces `path` when the `with` block ends without
    error; missing folders above `path` are created first.

    An OSError of the write itself (a full disk, say) names `path`, not the
    temporary file; an exception from the block removes the temporary file
    and the folders made for it, and leaves `path` as it was. The file is
    unbuffered, so that an error is met where the data is written, and once.
    """
    path = Path(path)
    tmp = Path(os.path.abspath(temporary_path(path)))   # as `dead_temporaries` compares it
    made = []
    try:
        try:
            made = make_folders(path.parent)
            remove_stale_temporaries(path.parent, path.name.__eq__)   # a killed write's of path
            # one under this name now is a killed process's that had this id (a
            # container's first process has): never written through, as it may be
            # a second name of the file it was put in place as (_place_new)
            tmp.unlink(missing_ok=True)
            _in_flight.add(tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                         0o666)
        except OSError as exc:
            raise _naming(exc, path) from None
        with open(fd, "wb", buffering=0) as raw:
            yield _TargetFile(raw, path)
            try:
                os.fsync(raw.fileno())
            except OSError as exc:
                raise _naming(exc, path) from None
        if pause > 0:
            time.sleep(pause)
        stage = _stage.get()
        if stage is not None:
            stage.append((tmp, path))   # placed by the stage, or removed with it
            return
        _put_in_place(tmp, path)
    except BaseException:
        if tmp in _in_flight:
            tmp.unlink(missing_ok=True)
        remove_made_folders(made)   # those still empty: a file another process put there stays
        _in_flight.discard(tmp)
        raise


def _put_in_place(tmp, path):
    """Rename the written temporary `tmp` to `path` (`_place_new` for a new output)."""
    try:
        if is_new_output(path):
            _place_new(tmp, path)
        else:
            os.replace(tmp, path)
    except OSError as exc:
        raise _naming(exc, path) from None   # the caller removes `tmp`
    _in_flight.discard(tmp)
    fsync_folder(path.parent)


class _Stage(list):
    """The (temporary, target) pairs written inside a `staged_writes` block."""

    def place(self, placed):
        """Put every staged file in place, in the order written, appending each
        target to the list `placed` as it lands."""
        while self:
            tmp, path = self[0]
            _put_in_place(tmp, path)
            del self[0]
            placed.append(path)


@contextlib.contextmanager
def staged_writes():
    """Writes inside the block are written and synced but put in place only
    when the block calls `place` on what it yields: so a full disk stops the
    block before any of its files replaces another. Staged files not placed
    when the block ends are removed. For one thread's writes (a context variable)."""
    stage = _Stage()
    token = _stage.set(stage)
    try:
        yield stage
    finally:
        _stage.reset(token)
        for tmp, _ in stage:
            tmp.unlink(missing_ok=True)
            _in_flight.discard(tmp)


def note_output(path):
    """Record whether the output `path` exists now, as a command checks it:
    if not, it is new, and this process's next write of it puts it in place
    only while it is still absent (until `forget_outputs`)."""
    if os.path.lexists(path):
        _new_outputs.discard(_output_key(path))
    else:
        _new_outputs.add(_output_key(path))


def is_new_output(path):
    """Whether `path` is an output noted as new (`note_output`) and not yet written."""
    return _output_key(path) in _new_outputs


def forget_outputs():
    """Forget the outputs noted: the command that checked them has ended."""
    _new_outputs.clear()


def refuse_if_written_meanwhile(path):
    """An error when the new output `path` (`note_output`) exists now:
    another process wrote it after this one checked its outputs."""
    if is_new_output(path) and os.path.lexists(path):
        raise XpmodelError(f"{path}: another process wrote this file while this command ran; "
                           f"it is kept, and nothing was written over it")


def _output_key(path):
    """`path` as the file it names: its folder's real path, and its name."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


# link() errors of file systems without hard links (FUSE mounts answer ENOSYS or EIO)
_NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS,
                  errno.EIO)


def _place_new(tmp, path):
    """Put the written temporary `tmp` at the new output `path`, unless another
    process wrote `path` meanwhile: a hard link does not replace a file. Where
    the file system has no hard links, a check just before the rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        refuse_if_written_meanwhile(path)
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        refuse_if_written_meanwhile(path)
        os.replace(tmp, path)
    else:
        os.unlink(tmp)
    _new_outputs.discard(_output_key(path))   # written: this process's own file now


class _TargetFile:
    """The temporary file, with write errors reported against the target."""

    def __init__(self, raw, target):
        self._raw, self._target = raw, target

    def write(self, data):
        """Write all of `data` (an unbuffered write may take part of it)."""
        view = memoryview(data).cast("B")
        size = view.nbytes
        try:
            while view:
                view = view[self._raw.write(view):]
        except OSError as exc:
            raise _naming(exc, self._target) from None
        return size

    def seek(self, offset, whence=os.SEEK_SET):
        return self._raw.seek(offset, whence)

    def tell(self):
        return self._raw.tell()

    def sync(self):
        """Put what was written so far on disk now, before the block ends (which
        syncs and renames): a writer that must know its data is safe first."""
        try:
            os.fsync(self._raw.fileno())
        except OSError as exc:
            raise _naming(exc, self._target) from None


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


def fsync_folder(directory):
    """Sync a folder's entries (a rename in it) to disk, where the system can."""
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


def dead_temporaries(folder, is_target):
    """[(path, NAME)] of the temporaries `.NAME.tmp-PID` in `folder` (files,
    or a folder write's folders; never a link) whose NAME `is_target` accepts
    and whose writer is gone: no process has its id, or this process has it
    and is not writing that file (an earlier process had the id, as the first
    process of every new container has)."""
    found = []
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError:
        return found
    for entry in entries:
        temporary = temporary_target(entry.name)
        if temporary is None or not is_target(temporary[0]) or entry.is_symlink():
            continue
        path, pid = Path(os.path.abspath(entry.path)), temporary[1]
        if (pid == os.getpid() and path not in _in_flight) or \
                (pid != os.getpid() and not process_alive(pid)):
            found.append((path, temporary[0]))
    return found


def remove_stale_temporaries(folder, is_target):
    """Remove the temporary files in `folder` of targets NAME that
    `is_target(NAME)` accepts, whose writer is gone (`dead_temporaries`) and
    which nothing has touched for STALE_TEMPORARY_S (in a folder several
    machines share, a process id says nothing of another machine's writer);
    regular files only. Returns what was removed."""
    removed = []
    now = time.time()
    for path, _ in dead_temporaries(folder, is_target):
        try:
            if not path.is_file() or now - path.stat().st_mtime < STALE_TEMPORARY_S:
                continue
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed
