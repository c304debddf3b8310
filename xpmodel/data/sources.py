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

Nothing here reads file contents except `corpus_fingerprint`; decoding and
the UTF-8 / binary checks happen while reading (`reading.py`).
"""

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from xpmodel.data.builtin_corpora import BUILTIN_NAMES, SHAKESPEARE, builtin_files, builtin_root
from xpmodel.data.play_markdown import PLAY_TEXT_VERSION
from xpmodel.errors import DataError

PLAIN_TEXT = "plain"
PLAY_MARKDOWN = "play-markdown"

# Files up to this size are hashed whole for the fingerprint; larger ones by
# their first and last `_EDGE_HASH_BYTES` plus size and nanosecond mtime.
# Any ordinary write to a large file moves its mtime, so only an edit that
# keeps the size and deliberately resets the mtime escapes the fingerprint.
_FULL_HASH_LIMIT = 4 << 20
_EDGE_HASH_BYTES = 1 << 20
_GLOB_CHARACTERS = frozenset("*?[")


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


def corpus_fingerprint(spec: "str | os.PathLike | Source") -> str:
    """A hex sha256 that changes whenever any file of the corpus, its order or its reading changes."""
    source = resolve_source(spec)
    digest = hashlib.sha256()
    reading = {"kind": source.kind, "text_format": source.text_format}
    if source.text_format == PLAY_MARKDOWN:
        reading["play_text_version"] = PLAY_TEXT_VERSION
    digest.update(json.dumps(reading, sort_keys=True).encode())
    for path in source.files:
        stat = path.stat()
        digest.update(f"\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        digest.update(_content_digest(path, stat.st_size))
    return digest.hexdigest()


def _resolve_path_spec(spec: str) -> Source:
    path = Path(spec).expanduser()
    if path.is_file():
        return Source(spec, "file", (path,), path.parent, PLAIN_TEXT)
    if path.is_dir():
        return Source(spec, "folder", tuple(_text_files_below(path)), path, PLAIN_TEXT)
    if _GLOB_CHARACTERS.intersection(spec):
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        files = tuple(Path(match) for match in matches if os.path.isfile(match))
        if not files:
            raise DataError(f"{spec}: glob matched no files")
        return Source(spec, "glob", files, None, PLAIN_TEXT)
    raise DataError(f"{spec}: no such file or folder")


def _text_files_below(folder: Path) -> list[Path]:
    files = []
    for path in folder.rglob("*.txt"):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append(path)
    return sorted(files, key=lambda path: path.relative_to(folder).as_posix())


def _require_text(source: Source) -> None:
    if not source.files:
        raise DataError(f"{source.spec}: empty corpus: no .txt files in this folder")
    if source.total_bytes() == 0:
        if len(source.files) == 1:
            raise DataError(f"{source.files[0]}: empty corpus: the file is empty")
        raise DataError(f"{source.spec}: empty corpus: all {len(source.files)} files are empty")


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
