"""Turn a corpus spec (file, folder, glob or built-in name) into an ordered list of files.

A spec is read as, in this order:

1. a built-in name, `shakespeare` or `pystdlib` (see `builtin_corpora.py`),
   when given as a string spelled exactly so; write `./shakespeare` to mean
   a local folder of that name;
2. an existing file: the corpus is that one file;
3. an existing folder: every `*.txt` file below it, recursively, skipping
   hidden files and folders (names starting with "."), sorted by path
   relative to the folder so the order does not depend on the file system;
4. a glob pattern (`*`, `?`, `[`; `**` matches across folders): the matching
   files, sorted by path.

Folders and globs walk alike: links to folders are followed, but each real
folder is read once (by device and inode), so a second link to the same folder
adds nothing and the walk cannot be endless; a link to the walk's own folder
or one above it (to `..`, say) is a loop and adds nothing either, not even
the files beside the walk's folder; and each real file is read once, however
many links or hard links reach it. At most `_MAX_WALK_ENTRIES` entries are
looked at. What a walk passes over that it might have read (a link that
points nowhere, a folder or file reached again, a folder it cannot list) is
named in one line on stderr, once per process.

A spec that names a FIFO, a device or a socket is refused: reading one could
block or never end. `resolve_given` tells a spec that names nothing (a usage
mistake, exit 2) from one that is there but cannot be used (bad data, exit 1).

Nothing here reads file contents except `corpus_fingerprint`; decoding and
the UTF-8 / binary checks happen while reading (`reading.py`).
"""

import fnmatch
import hashlib
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from .builtin_corpora import BUILTIN_NAMES, SHAKESPEARE, builtin_files, builtin_root
from .play_markdown import PLAY_TEXT_VERSION
from ..errors import DataError, UsageError, shown_path
from ..files import file_kind, inside

PLAIN_TEXT = "plain"
PLAY_MARKDOWN = "play-markdown"

# Files up to this size are hashed whole for the fingerprint; larger ones by
# their first and last `_EDGE_HASH_BYTES` plus size and nanosecond mtime.
# Any ordinary write to a large file moves its mtime, so only an edit that
# keeps the size and deliberately resets the mtime escapes the fingerprint.
_FULL_HASH_LIMIT = 4 << 20
_EDGE_HASH_BYTES = 1 << 20
_GLOB_CHARACTERS = frozenset("*?[")
_MAX_WALK_ENTRIES = 1_000_000
_noted = set()   # (real folder, kind of spec, what was skipped) noted by this process
_DANGLING = ("a link that points nowhere", "links that point nowhere")
_AGAIN = ("a folder reached again through a link", "folders reached again through links")
_LOOP = ("a link back to the walk's folder or above it", "links back to the walk's folder or above it")
_FILE_AGAIN = ("a file reached again through a link", "files reached again through links")
_UNLISTABLE = ("a folder that cannot be listed", "folders that cannot be listed")


@dataclass(frozen=True)
class Source:
    """A resolved corpus: its files in reading order and how to read them."""

    spec: str
    kind: str  # "builtin", "file", "folder" or "glob"
    files: tuple[Path, ...]
    root: Path | None  # what document names are relative to; None for globs
    text_format: str  # PLAIN_TEXT, or PLAY_MARKDOWN for the shakespeare built-in

    def document_name(self, path: Path) -> str:
        """A short, stable name for one file of the corpus (used in messages)."""
        if self.kind == "builtin":
            return f"{self.spec}/{path.relative_to(self.root).as_posix()}"
        if self.kind == "folder":
            return path.relative_to(self.root).as_posix()
        return str(path)

    def total_bytes(self) -> int:
        """The size of all files on disk, the denominator for progress reports."""
        return sum(path.stat().st_size for path in self.files)

    def size_text(self) -> str:
        """The files' size for messages ("44,942 bytes"), said to be Markdown where
        the text is drawn out of it (the built-in plays), so fewer bytes are text."""
        size = f"{self.total_bytes():,} bytes"
        return size + " of Markdown" if self.text_format == PLAY_MARKDOWN else size

    def describe(self) -> dict:
        """The facts a token file's sidecar records about where its tokens came from."""
        return {
            "spec": self.spec,
            "kind": self.kind,
            "root": str(self.root) if self.root is not None else None,
            "files": len(self.files),
            "bytes": self.total_bytes(),
            "text_format": self.text_format,
        }


def resolve_source(spec: "str | os.PathLike | Source") -> Source:
    """The corpus that `spec` names; DataError if it is missing or holds no text."""
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, str) and spec in BUILTIN_NAMES:
        source = Source(
            spec=spec,
            kind="builtin",
            files=tuple(builtin_files(spec)),
            root=builtin_root(spec),
            text_format=PLAY_MARKDOWN if spec == SHAKESPEARE else PLAIN_TEXT,
        )
    else:
        source = _resolve_path_spec(os.fspath(spec))
    _require_text(source)
    return source


def resolve_given(spec: "str | os.PathLike", given_as: str) -> Source:
    """The corpus that `spec` names, where the user gave it as `given_as` (a
    flag such as `--data`, or a config key such as `data.source`). A spec
    that names nothing, neither a built-in corpus nor an existing path (no
    such file or folder, a glob that finds no text, an empty spec), is a mistake in what was
    asked: a UsageError naming it ("--data notes.txt: no such file or
    folder"). One that is there but cannot be used (an empty file or folder,
    a FIFO) is bad data: a DataError, named the same way."""
    try:
        return resolve_source(spec)
    except DataError as exc:
        there = spec in BUILTIN_NAMES or os.path.exists(os.path.expanduser(spec))
        raise (DataError if there else UsageError)(f"{given_as} {exc}") from None


def corpus_fingerprint(spec: "str | os.PathLike | Source") -> str:
    """A hex sha256 that changes whenever any file of the corpus, its order or its reading changes."""
    source = resolve_source(spec)
    digest = hashlib.sha256()
    reading = {"kind": source.kind, "text_format": source.text_format}
    if source.text_format == PLAY_MARKDOWN:
        reading["play_text_version"] = PLAY_TEXT_VERSION
    digest.update(json.dumps(reading, sort_keys=True).encode())
    for path in source.files:
        info = path.stat()
        # the name as the file system holds it (os.fsencode: not every name is UTF-8)
        digest.update(b"\0" + os.fsencode(path.resolve()) +
                      f"\0{info.st_size}\0{info.st_mtime_ns}\0".encode())
        digest.update(_content_digest(path, info.st_size))
    return digest.hexdigest()


def _resolve_path_spec(spec: str) -> Source:
    if not spec.strip():
        raise DataError("the corpus spec is empty: name a file, folder, glob or built-in corpus")
    path = Path(spec).expanduser()
    try:
        mode = path.stat().st_mode     # links followed
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    except OSError as exc:      # a name too long, say: nothing there can be read
        raise DataError(f"{shown_path(spec)}: {exc.strerror}") from None
    if mode is not None and stat.S_ISREG(mode):
        return Source(spec, "file", (path,), path.parent, PLAIN_TEXT)
    if mode is not None and stat.S_ISDIR(mode):
        return Source(spec, "folder", tuple(_text_files_below(path, spec)), path, PLAIN_TEXT)
    if mode is not None:
        raise DataError(f"{shown_path(spec)}: is {file_kind(mode)}, not a text file or folder")
    if _GLOB_CHARACTERS.intersection(spec):
        files = tuple(Path(match) for match in sorted(_glob_files(os.path.expanduser(spec), spec)))
        if not files:
            raise DataError(f"{shown_path(spec)}: glob matched no files")
        return Source(spec, "glob", files, None, PLAIN_TEXT)
    raise DataError(f"{shown_path(spec)}: no such file or folder")


def _walk(base: str, spec: str, what: str, enter, take) -> list[tuple[str, tuple]]:
    """(path, names relative to base) of the files below `base` that
    `take(names)` wants, walking the folders `enter(names)` wants: links to
    folders followed, each real folder read once; what was passed over is
    noted on stderr (see the module's docstring)."""
    found, seen, looked = [], set(), 0
    skipped = {_DANGLING: [], _AGAIN: [], _LOOP: [], _FILE_AGAIN: [], _UNLISTABLE: []}
    top = os.path.realpath(base)
    pending = [(base, ())]
    while pending:
        folder, relative = pending.pop()
        try:
            identity = os.stat(folder)
            key = (identity.st_dev, identity.st_ino)
            if key in seen:        # a loop, or a second way in: already walked
                skipped[_AGAIN].append(relative)
                continue
            seen.add(key)
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as exc:
            # a glob's own folder that is not there (or is a file) holds nothing to skip
            if relative or not isinstance(exc, (FileNotFoundError, NotADirectoryError)):
                skipped[_UNLISTABLE].append(relative)
            continue
        # Folders are walked depth first in name order (the stack pops the
        # smallest name first), so a folder reached by several paths is read
        # through the first of them by name, whatever the file system's order.
        for entry in reversed(entries):
            looked += 1
            if looked > _MAX_WALK_ENTRIES:
                raise DataError(f"{shown_path(spec)}: the {what} holds more than "
                                f"{_MAX_WALK_ENTRIES:,} files and folders; narrow it")
            names = (*relative, entry.name)
            try:
                is_dir = entry.is_dir()
                is_file = not is_dir and entry.is_file()
                dangling = not is_dir and not is_file and entry.is_symlink() and \
                    not os.path.exists(entry.path)
            except OSError:
                continue
            if is_dir and enter(names):
                if entry.is_symlink() and _is_within(top, os.path.realpath(entry.path)):
                    skipped[_LOOP].append(names)
                else:
                    pending.append((entry.path, names))
            elif is_file and take(names):
                found.append((entry.path, names))
            elif dangling and (enter(names) or take(names)):
                skipped[_DANGLING].append(names)
    found = _each_file_once(found, skipped[_FILE_AGAIN])
    _note_skipped(base, spec, what, skipped)
    return found


def _each_file_once(found, again):
    """`found` (path, names) without a second way to a real file (a link, a hard
    link): the first in path order is kept, a plain file before a link;
    the names of the others go to `again`."""
    first = {}
    for path, names in sorted(found, key=lambda item: (os.path.islink(item[0]), item[1])):
        try:
            identity = os.stat(path)
        except OSError:
            continue
        key = (identity.st_dev, identity.st_ino)
        if key in first:
            again.append(names)
        else:
            first[key] = path
    kept = set(first.values())
    return [(path, names) for path, names in found if path in kept]


def _is_within(path: str, folder: str) -> bool:
    """Whether the real path `path` is `folder` or lies below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _note_skipped(base: str, spec: str, what: str, skipped: dict) -> None:
    """Note on stderr what a walk below `base` (the corpus `spec`, a `what`)
    passed over: once a process for each real folder, kind of spec and set of
    places, however the corpus is spelled (a run names it as given, then by
    its absolute path)."""
    parts = []
    for kind, places in skipped.items():
        if places:
            shown = ", ".join(shown_path("/".join(names) or ".", 80) for names in sorted(places)[:3])
            more = f" and {len(places) - 3} more" if len(places) > 3 else ""
            parts.append(f"{kind[0] if len(places) == 1 else f'{len(places)} {kind[1]}'} "
                         f"({shown}{more})")
    key = (os.path.realpath(base), what, tuple(parts))
    if parts and key not in _noted:
        _noted.add(key)
        print(f"note: {shown_path(spec)}: skipped {'; '.join(parts)}", file=sys.stderr, flush=True)


def reads_from(spec: str, folder) -> bool:
    """Whether the corpus `spec` reaches into `folder`: a file or folder it
    names lies in `folder` (or holds it), or a glob's fixed folder does, or
    the glob could match `folder` or files below it. (A run directory there
    would be read back as its own corpus.) Built-in corpora reach nowhere."""
    if spec in BUILTIN_NAMES:
        return False
    path = Path(spec).expanduser()
    if os.path.exists(path) or not _GLOB_CHARACTERS.intersection(spec):   # False for a name too long
        return inside(path, folder) or inside(folder, path)
    prefix, wanted = _glob_parts(os.path.expanduser(spec))
    base = Path(prefix or os.curdir)
    if inside(base, folder):
        return True
    try:
        names = Path(folder).resolve().relative_to(base.resolve()).parts
    except (OSError, RuntimeError, ValueError):
        return False
    return bool(wanted) and _could_match(names, wanted)


def _glob_parts(pattern: str) -> tuple[str, list[str]]:
    """(the folder a glob pattern starts from, its parts from the first with a wildcard)."""
    parts = pattern.split(os.sep)
    first = next(i for i, part in enumerate(parts) if _GLOB_CHARACTERS.intersection(part))
    prefix, wanted = os.sep.join(parts[:first]), [p for p in parts[first:] if p]
    if pattern.startswith(os.sep):
        prefix = prefix or os.sep
    return prefix, wanted


def _glob_files(pattern: str, spec: str) -> list[str]:
    """The files matching a glob pattern, as `glob.glob(pattern, recursive=True)`
    finds them (hidden names only where the pattern spells the dot), but
    walking each real folder once, whatever links lead back into it."""
    prefix, wanted = _glob_parts(pattern)
    if not wanted:
        return []
    base = prefix or os.curdir
    found = _walk(base, spec, "glob", lambda names: _could_match(names, wanted),
                  lambda names: _matches(names, wanted))
    return [os.path.join(prefix, *names) for _, names in found]


def _name_matches(name: str, part: str) -> bool:
    if name.startswith(".") and not part.startswith("."):
        return False   # as glob: `*` does not match hidden names
    return fnmatch.fnmatchcase(name, part)


def _matches(names: tuple, parts: list) -> bool:
    """Whether a relative path (its names) matches the pattern's parts."""
    return len(parts) in _parts_reached(names, parts)


def _could_match(names: tuple, parts: list) -> bool:
    """Whether a folder's relative path can begin a match (so it is worth walking)."""
    return bool(_parts_reached(names, parts))


def _parts_reached(names: tuple, parts: list) -> set:
    """Every k such that `names` matches `parts[:k]`, the rest of the pattern
    left for what lies below: the pattern read as an automaton, one name at a
    time. A `**` keeps its place on a name that is not hidden, or is passed
    over. At most len(parts) + 1 states, so a path of n names costs about n *
    len(parts) steps however many `**` there are (trying each way every `**`
    could match takes time exponential in their number)."""
    def passing_stars(states):
        for k in range(len(parts)):   # in order, so `**/**` passes both
            if k in states and parts[k] == "**":
                states.add(k + 1)
        return states

    states = passing_stars({0})
    for name in names:
        hidden = name.startswith(".")
        after = set()
        for k in states:
            if k == len(parts):
                continue
            if parts[k] == "**":
                if not hidden:
                    after.add(k)
            elif _name_matches(name, parts[k]):
                after.add(k + 1)
        if not after:
            return after
        states = passing_stars(after)
    return states


def _text_files_below(folder: Path, spec: str) -> list[Path]:
    """Every `*.txt` below `folder` that no hidden name leads to, sorted by its
    path relative to the folder (links to folders followed, as for globs)."""
    found = _walk(str(folder), spec, "folder", lambda names: not names[-1].startswith("."),
                  lambda names: names[-1].endswith(".txt") and not names[-1].startswith("."))
    return [folder.joinpath(*names) for _, names in sorted(found, key=lambda f: "/".join(f[1]))]


def _require_text(source: Source) -> None:
    if not source.files:
        raise DataError(f"{shown_path(source.spec)}: empty corpus: no .txt files in this folder")
    if source.total_bytes() == 0:
        if len(source.files) == 1:
            raise DataError(f"{source.files[0]}: empty corpus: the file is empty")
        raise DataError(f"{shown_path(source.spec)}: empty corpus: all {len(source.files)} files are empty")


def _content_digest(path: Path, size: int) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        if size <= _FULL_HASH_LIMIT:
            digest.update(file.read())
        else:
            digest.update(file.read(_EDGE_HASH_BYTES))
            file.seek(size - _EDGE_HASH_BYTES)
            digest.update(file.read(_EDGE_HASH_BYTES))
    return digest.digest()
