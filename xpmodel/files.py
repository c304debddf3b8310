"""Reading small files a user or a run supplies, with their sizes bounded;
comparing paths and telling files apart; whether a folder can be made and
written in; whether a process is alive, or holds a lock.

Config, tokenizer and run files are read whole, so each is first checked to
be a regular file (a FIFO or a device such as /dev/zero would block or never
end) no larger than a limit, and JSON is parsed so that absurd nesting is a
one-line error rather than a RecursionError.
"""
import fcntl
import json
import math
import os
import stat
from pathlib import Path

from .errors import UsageError, one_line, shown_path


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode):
    """What an entry of this st_mode that is not a regular file is, for a
    message: "a directory", "a symbolic link", "a FIFO", a device, "a socket"."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path, error, what):
    """A binary file object for the regular file `path`; anything else
    (missing, a folder, a FIFO, a device) raises `error` naming the file."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{path}: is {file_kind(mode)}, not a {_file_noun(what)}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_noun(what):
    """"config file" stays so; "sweep state" becomes "sweep state file"."""
    return what if what.endswith("file") else f"{what} file"


def read_bounded(path, limit, error, what):
    """The bytes of the regular file `path`, refused when larger than `limit`."""
    path = Path(path)
    with open_regular(path, error, what) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            data = f.read(size + 1) if size <= limit else b""   # size + 1: a file that grew is seen
        except OSError as exc:   # a failing disk, /proc/self/mem: named, as open names it
            raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    if size > limit or len(data) > limit:
        raise error(f"{path}: {what} is {max(size, len(data)):,} bytes, more than the "
                    f"{limit:,} xpmodel reads")
    return data


def parse_json(text):
    """json.loads, raising ValueError also for nesting too deep to parse."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


# The largest count (a step, tokens seen) xpmodel's JSON files may hold.
MAX_JSON_COUNT = 2**63 - 1


def finite_json_number(value):
    """A JSON number that converts to a finite float: not a bool, NaN or an
    infinity, no integer beyond MAX_JSON_COUNT."""
    if type(value) is float:
        return math.isfinite(value)
    return type(value) is int and -MAX_JSON_COUNT <= value <= MAX_JSON_COUNT


def read_json(path, limit, error, what, advice=""):
    """The JSON object in the regular file `path` of at most `limit` bytes
    (read_bounded). Anything else raises `error` in one line naming the file
    and calling it `what`: missing, a FIFO or a device, too large, not JSON,
    or JSON that is not an object; `advice` (what to do about it, e.g. "; move
    it away") ends the last two."""
    data = read_bounded(path, limit, error, what)
    try:
        document = parse_json(data)
    except ValueError as exc:   # JSONDecodeError, UnicodeDecodeError, nesting too deep, huge ints
        detail = "an integer of more than 4300 digits" if "integer string conversion" in str(exc) \
            else one_line(exc, 200)
        raise error(f"{path}: {what} is not valid JSON ({detail}){advice}") from None
    if not isinstance(document, dict):
        raise error(f"{path}: {what} is not a JSON object{advice}")
    return document


def file_identity(status, content=False):
    """Which file an os.stat result is: its device and inode; with content,
    also its size and last write, which change when the file is rewritten
    in place (another file renamed over its path changes the inode)."""
    identity = status.st_dev, status.st_ino
    return (identity + (status.st_size, status.st_mtime_ns)) if content else identity


def same_file(a, b):
    """Whether two paths name the same file (links resolved, hard links too)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return False


def overlaps(a, b):
    """Whether one of two folders is the other or lies below it (links resolved)."""
    return inside(a, b) or inside(b, a)


def inside(path, folder):
    """Whether `path` is `folder` or lies below it (links resolved)."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except (OSError, RuntimeError, ValueError):
        return False


def missing_folders(path):
    """(the existing folder that the first missing one would be made in, or
    `path` itself when nothing is missing; the folders that writing into
    `path` would create, deepest first, each spelled as in `path`). A link
    counts as existing, even one that points nowhere.

    The walk follows `path` as the system resolves it: a `..` after a folder
    still to be made leads back to where that folder would be made, so with
    `b` there and `a` not, "a/../b" needs only `a` (for the path to be
    reachable as written) and lists neither `b` nor "a/.."."""
    path = Path(path)
    parts = path.parts[1:] if path.anchor else path.parts
    written = existing = Path(path.anchor) if path.anchor else Path()
    missing, below = [], []   # below: the folders to make that the walk is inside
    first_made_in = None
    for part in parts:
        written = written / part
        if below and part == "..":
            below.pop()   # back in the folder the popped one would be made in
        elif below or not os.path.lexists(existing / part):
            first_made_in = first_made_in or existing
            below.append(written)
            missing.append(written)
        else:
            existing = existing / part
    return first_made_in or existing, missing[::-1]


def make_folders(path):
    """Create the missing folders of `path`, outermost first, one level at a
    time; returns [(folder, identity)] of those made here, deepest first (a
    folder another process made meanwhile is not among them), for
    `remove_made_folders`. An OSError when one cannot be made, those made
    before it removed again."""
    made = []
    for folder in reversed(missing_folders(path)[1]):
        try:
            os.mkdir(folder)
        except FileExistsError:
            continue
        except OSError:
            remove_made_folders(made)
            raise
        made.insert(0, (folder, entry_identity(folder)))
    return made


def remove_made_folders(made):
    """Remove the folders `make_folders` made, deepest first, while empty and
    still the ones made (not another folder a link now leads to)."""
    for folder, identity in made:
        if entry_identity(folder) == identity:
            try:
                os.rmdir(folder)
            except OSError:
                pass   # not empty (or gone): kept


def entry_identity(path):
    """(device, inode) of the entry `path` itself (a link is not followed), or None."""
    try:
        return file_identity(os.lstat(path))
    except OSError:
        return None


def existing_file(path, given_as, what):
    """Refuse a file given as `given_as` (a flag or key) that names nothing
    ("data.tokenizer tok.json: no such tokenizer file", a UsageError, exit 2)
    or a folder; what else is there is for its reader to check."""
    if not os.path.exists(path):
        raise UsageError(f"{given_as} {shown_path(path)}: no such {what}")
    if os.path.isdir(path):
        raise UsageError(f"{given_as} {shown_path(path)}: is a directory, not a {what}")


def folder_problem(folder):
    """None when files can be written in `folder`: the existing folder its
    first missing part would be made in (see `missing_folders`) is one this
    process may write in; else what stands in the way, e.g. "notes.txt is
    not a folder"."""
    existing, _ = missing_folders(folder)
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {existing}"
    return None


def process_alive(pid):
    """Whether a process with this id runs on this machine (the writer of a
    temporary file or the holder of a lock named by its pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:   # alive, but another user's
        return True
    return True


def try_exclusive_lock(path, create=False):
    """An open descriptor of `path` (a file, made if missing with create, or a
    folder) holding flock(2)'s exclusive lock, which the kernel drops when the
    process dies; None while another process holds it. An OSError where the
    file system has no locks."""
    flags = (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd
