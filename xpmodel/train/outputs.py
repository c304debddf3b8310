"""Where a command may write. Every output a user names (`--out FILE`,
`--export-hf DIR`) goes through `check_output` or `check_output_dir` before any
slow work: a command never writes over one of its own inputs or a run
directory's own files, and replaces an existing file only when asked to with
--overwrite, or, for a command writing a pair of files (file_pairs.py), when
it is the leftover of an interrupted write of that same pair, which the rerun
finishes. An output's missing folders are allowed when they can be created;
they are created only when the output is written (atomic.py), so a command
that fails before then leaves no empty folder behind.
"""
import os
from pathlib import Path

from ..atomic import note_output
from ..errors import UsageError
from ..file_pairs import is_interrupted_pair
from ..files import folder_problem, inside, same_file
from ..hf.convert import EXPORT_MARKER, WEIGHTS_FILE, WEIGHTS_INDEX
from .rundir import RunDir


def check_output(path, flag, inputs=(), overwrite=False, partner=None):
    """Refuse to write the file `path` (given as `flag`, e.g. "--out") with a
    one-line UsageError naming it: always when it is one of `inputs` (files the
    command reads; a folder among them, such as train.init_from's model folder,
    stands for every file in it) or one of a run directory's own files (see
    `_run_file`); when its folder cannot be created or written in (see
    `_check_folder`); when it exists, unless `overwrite`. `partner`: when
    `path` is the first file of a pair the command writes (file_pairs.py), the
    pair's last file, written after it; an existing `path` stamped as the
    first file of that very pair, with `partner` missing, is the leftover of
    an interrupted write of it (`is_interrupted_pair`) and needs no
    `overwrite`. A `path` absent now is written only while it is still
    absent (atomic.note_output): two commands given the same new output at
    once never replace each other's file. Returns `path` as a Path."""
    path = Path(path)
    for source in inputs:
        _check_not_an_input(path, flag, source)
    run = _run_file(path)
    if run is not None:
        raise UsageError(f"{flag} {path}: is one of the files of the run {run}; xpmodel will not "
                         f"write over it, even with --overwrite; choose another {flag}")
    _check_folder(path.parent, path, flag)
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; give a file path")
    note_output(path)   # one absent now is written only while still absent: never over another's
    if os.path.lexists(path) and not overwrite and \
            not (partner is not None and is_interrupted_pair(path, partner)):
        raise UsageError(f"{flag} {path}: already exists; pass --overwrite to replace it, or "
                         f"choose another {flag}")
    return path


def check_output_dir(path, flag, inputs=(), overwrite=False):
    """Refuse to write files into the folder `path` (given as `flag`) with a
    one-line UsageError naming it: always when it is a run directory or inside
    one's checkpoints, a model folder (Hugging Face weights or config, or an
    xpmodel export), or holds one of `inputs`; when it cannot be created or
    written in (see `_check_folder`); when it is a non-empty folder, unless
    `overwrite` (its other files are kept). Returns `path` as a Path."""
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
    check_holds_no_input(path, flag, inputs)
    _check_folder(path, path, flag)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"{flag} {path}: is not empty; pass --overwrite to write into it "
                         f"(files of other names are kept), or choose another {flag}")
    return path


def _check_folder(folder, output, flag):
    """Refuse, with a one-line UsageError naming `output` (given as `flag`), a
    `folder` to write it in that cannot be made (see `folder_problem`)."""
    problem = folder_problem(folder)
    if problem is not None:
        raise UsageError(f"{flag} {output}: {problem}; choose another {flag}")


# An input folder holding more files than this (a run or a model directory
# holds a few dozen) is not listed: no output may go inside it at all.
_MAX_INPUT_FOLDER_FILES = 10_000


def _check_not_an_input(path, flag, source):
    """Refuse an output `path` (given as `flag`) that is the input `source`,
    or, when `source` is a folder, one of the files in it; a new file beside
    them is allowed. Links are resolved; --overwrite changes nothing."""
    if not os.path.isdir(source):
        if same_file(path, source):
            raise UsageError(f"{flag} {path}: is also an input of this command ({source}); "
                             f"writing it would destroy what is being read; choose another {flag}")
        return
    if not inside(path, source) and not os.path.lexists(path):
        return     # a new file elsewhere: none of the folder's
    files = []
    for folder, _, names in os.walk(source):
        files += [Path(folder) / name for name in names]
        if len(files) > _MAX_INPUT_FOLDER_FILES:
            if inside(path, source):
                raise UsageError(f"{flag} {path}: is inside {source}, an input of this command; "
                                 f"choose another {flag}")
            return
    for held in files:
        if same_file(path, held):
            raise UsageError(f"{flag} {path}: is {held}, a file of {source}, an input of this "
                             f"command; writing it would destroy what is being read, even with "
                             f"--overwrite; choose another {flag}")


def check_holds_no_input(folder, flag, inputs):
    """Refuse, with a one-line UsageError naming it, a folder a command writes
    into (given as `flag`) that holds one of `inputs` (files it reads)."""
    for source in inputs:
        if inside(source, folder):
            raise UsageError(f"{flag} {folder}: holds {source}, an input of this command; "
                             f"choose another {flag}")


def _run_file(path):
    """The run directory whose own file `path` would be (see `RunDir.owns`), or
    None. A run is a folder holding run.json; links are resolved."""
    try:
        resolved = Path(os.path.abspath(path)).resolve()
    except (OSError, RuntimeError):
        return None
    for folder in resolved.parents:
        run = RunDir(folder)
        if run.is_run() and run.owns(resolved):
            return run.path
    return None
