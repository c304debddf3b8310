"""Reading small files a user or a run supplies, with their sizes bounded, and
checking where a command may write.

Config, tokenizer and run files are read whole, so each is first checked to
be a regular file (a FIFO or a device such as /dev/zero would block or never
end) no larger than a limit, and JSON is parsed so that absurd nesting is a
one-line error rather than a RecursionError.

Every output a user names (`--out FILE`, `--export-hf DIR`) goes through
`check_output` or `check_output_dir` before any slow work: a command never
writes over one of its own inputs or a run directory's own files, and
replaces an existing file only when asked to with --overwrite.
"""
import json
import os
import stat
from pathlib import Path

from .errors import UsageError

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


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
        if stat.S_ISDIR(mode):
            raise error(f"{path}: is a directory, not a {_file_noun(what)}")
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise error(f"{path}: is {kind}, not a {_file_noun(what)}")
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
        data = f.read(size + 1) if size <= limit else b""   # size + 1: a file that grew is seen
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


def check_output(path, flag, inputs=(), overwrite=False):
    """Refuse to write the file `path` (given as `flag`, e.g. "--out") with a
    one-line UsageError naming it: always when it is one of `inputs` (files the
    command reads) or one of a run directory's own files (see `_run_file`);
    when it exists, unless `overwrite`. Returns `path` as a Path."""
    path = Path(path)
    for source in inputs:
        if same_file(path, source):
            raise UsageError(f"{flag} {path}: is also an input of this command ({source}); "
                             f"writing it would destroy what is being read; choose another {flag}")
    run = _run_file(path)
    if run is not None:
        raise UsageError(f"{flag} {path}: is one of the files of the run {run}; xpmodel will not "
                         f"write over it, even with --overwrite; choose another {flag}")
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; give a file path")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UsageError(f"{flag} {path}: already exists; pass --overwrite to replace it, or "
                         f"choose another {flag}")
    return path


def check_output_dir(path, flag, inputs=(), overwrite=False):
    """Refuse to write files into the folder `path` (given as `flag`) with a
    one-line UsageError naming it: always when it is a run directory or inside
    one's checkpoints, a model folder (Hugging Face weights or config, or an
    xpmodel export), or holds one of `inputs`; when it is a non-empty folder,
    unless `overwrite` (its other files are kept). Returns `path` as a Path."""
    from .hf.convert import EXPORT_MARKER, WEIGHTS_FILE, WEIGHTS_INDEX
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    run = _run_file(path / "run.json")
    if run is not None:
        where = "is the run directory" if same_file(path, run) else "is inside the run"
        raise UsageError(f"{flag} {path}: {where} {run}; xpmodel will not write over a run's "
                         f"files, even with --overwrite; choose another {flag}")
    model = [name for name in ("config.json", WEIGHTS_FILE, WEIGHTS_INDEX, EXPORT_MARKER)
             if (path / name).exists()]
    if model:
        raise UsageError(f"{flag} {path}: holds a model ({model[0]}), whose tokenizer files "
                         f"belong to it; xpmodel will not replace them, even with --overwrite; "
                         f"choose another {flag}")
    for source in inputs:
        if inside(source, path):
            raise UsageError(f"{flag} {path}: holds {source}, an input of this command; "
                             f"choose another {flag}")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"{flag} {path}: is not empty; pass --overwrite to write into it "
                         f"(files of other names are kept), or choose another {flag}")
    return path


def _run_file(path):
    """The run directory whose own file `path` would be (run.json, config.yaml,
    tokenizer.json, metrics.jsonl, its lock, anything under checkpoints/), or None.
    A run is a folder holding run.json; links are resolved."""
    from .train.rundir import RunDir   # rundir reads its files through this module
    try:
        resolved = Path(os.path.abspath(path)).resolve()
    except (OSError, RuntimeError):
        return None
    run = RunDir(resolved.parent)
    if run.is_run() and resolved in (run.marker, run.config_path, run.tokenizer_path,
                                     run.metrics_path, run.lock_path, run.checkpoint_dir):
        return run.path
    for folder in resolved.parents:
        if folder.name == "checkpoints" and RunDir(folder.parent).is_run():
            return folder.parent
    return None


def same_file(a, b):
    """Whether two paths name the same file (links resolved, hard links too)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return False


def inside(path, folder):
    """Whether `path` is `folder` or lies below it (links resolved)."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except (OSError, RuntimeError, ValueError):
        return False


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
