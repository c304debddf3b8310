"""Outputs written as a pair of files: a token file and its `.json` sidecar
(data/tokenfile.py), lr-find's plot and its `.json` numbers, a run's plot and
its `-health.png` (tune/). Each file is written atomically (atomic.py), but a
pair takes two renames, and a process killed between them leaves one file.

So a pair is written in one order (`write_pair`). Both files' data goes to
their temporaries first, so that a full disk stops the write before anything
is replaced; then the last file (the one named by `--out`: the token file,
the plot) is removed if it exists (`remove_last_file`); the first file is put
in place, carrying a stamp that names the last one (`stamp`: the key
COMPLETED_BY of a JSON object, or a PNG text chunk of that keyword); then the
last file. A last file's presence therefore means its pair is
whole, and it is never found beside the first file of another write. A first
file stamped as the first of a given last file (`is_first_of`) whose last
file is missing is the leftover of an interrupted write of that pair
(`is_interrupted_pair`): train/outputs.py lets the command writing that same
pair replace it without --overwrite. To any other output, and without the
stamp (a user's own file), it is a file like any other.
"""
import os
import struct
from pathlib import Path

from .atomic import atomic_writer, is_new_output, refuse_if_written_meanwhile
from .errors import UsageError
from .files import open_regular, parse_json

COMPLETED_BY = "xpmodel_completed_by"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# the largest JSON first file of a pair: lr-find's numbers of its longest ramp
# are a few MB, a sidecar far less; a larger file is no pair's, and is not read
MAX_JSON_BYTES = 64 << 20
# a PNG's text chunks come before its image data, within its first bytes
_MAX_PNG_HEAD_BYTES = 1 << 16


def stamp(last):
    """The stamp of a first file whose pair ends with the file `last`: JSON
    keys to add to its document, or a PNG's text chunks (savefig's metadata)."""
    return {COMPLETED_BY: Path(last).name}


def write_pair(first, last, write_first, write_last, last_matches=None):
    """Write the pair (first, last) in this module's order: write_last(file),
    then write_first(file), each given an atomic_writer file to fill (the
    first one's data stamped by the caller), both synced to disk; then the
    old last file is removed, unless `last_matches()` says it holds what the
    new first file describes, the first file is put in place, and the last."""
    with atomic_writer(last) as last_file:
        write_last(last_file)
        last_file.sync()
        with atomic_writer(first) as first_file:
            write_first(first_file)
            first_file.sync()
            refuse_if_written_meanwhile(first)   # before the old last file goes
            if last_matches is None or not last_matches():
                remove_last_file(last)


def remove_last_file(last):
    """Remove the pair's existing last file, before its first file is written.
    A last file the command found absent when it checked its outputs
    (atomic.note_output) is not removed: one there now is another process's,
    and an error says so."""
    refuse_if_written_meanwhile(last)
    if not is_new_output(last):
        Path(last).unlink(missing_ok=True)


def is_first_of(first, last):
    """Whether `first` is a regular file (not a link) stamped as the first file
    of the pair whose last file is `last`, a file of the same folder."""
    first, last = Path(first), Path(last)
    return first.parent == last.parent and not first.is_symlink() \
        and _stamped_last_name(first) == last.name


def is_interrupted_pair(first, last):
    """Whether `first` is the leftover of a write of the pair (`first`, `last`)
    that stopped before its last file was written: `first` is stamped as its
    first file (`is_first_of`) and `last` does not exist."""
    return is_first_of(first, last) and not os.path.lexists(last)


def _stamped_last_name(path):
    """The value of the stamp in the JSON object or PNG `path`, or None."""
    try:
        with open_regular(path, UsageError, "output") as file:
            head = file.read(_MAX_PNG_HEAD_BYTES)
            if head.startswith(PNG_SIGNATURE):
                return _png_text(head, COMPLETED_BY.encode("latin-1"))
            if not head.lstrip().startswith(b"{") or \
                    os.fstat(file.fileno()).st_size > MAX_JSON_BYTES:
                return None
            document = parse_json(head + file.read())
    except (UsageError, OSError, ValueError):
        return None
    return document.get(COMPLETED_BY) if isinstance(document, dict) else None


def _png_text(data, keyword):
    """The text of the chunk `keyword` among the PNG bytes `data` (tEXt, or
    uncompressed iTXt) before its image data, or None."""
    at = len(PNG_SIGNATURE)
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        if kind == b"IDAT" or len(body) < length:
            return None
        key, _, text = body.partition(b"\0")
        try:
            if key == keyword and kind == b"tEXt":
                return text.decode("latin-1")
            if key == keyword and kind == b"iTXt" and text[:1] == b"\0":   # not compressed
                _language, _, text = text[2:].partition(b"\0")
                _translated_keyword, _, text = text.partition(b"\0")
                return text.decode("utf-8")
        except UnicodeDecodeError:
            return None
        at += 12 + length
    return None
