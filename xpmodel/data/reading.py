"""Read a corpus as text, file by file, in pieces small enough to keep memory bounded.

Every file must be UTF-8 text: a NUL byte marks it as binary (an xpmodel token
file is named as one), and bytes that do not decode are reported with the byte
offset where decoding failed. A UTF-8 byte order mark at the start of a file is
dropped.

Large files are cut into pieces of about `chunk_bytes`. A cut is made just
after a newline, which never falls inside a multi-byte UTF-8 character. When
it can, the cut picks a newline with non-space bytes on both sides: GPT-2
style pre-tokenisation then yields the same tokens as for the uncut text,
because a lone newline between two words is a token of its own either way.
A file with no newline in a whole window is cut at a character boundary,
found by looking back at most 3 bytes (a UTF-8 character is at most 4): bytes
that are not UTF-8 are then reported in the piece that holds them, never
carried from window to window.
"""

import codecs
from dataclasses import dataclass
from typing import Iterator

from .play_markdown import play_markdown_to_text
from .sources import PLAY_MARKDOWN, Source, resolve_source
from .tokenfile import MAGIC as TOKEN_FILE_MAGIC
from ..errors import DataError
from ..files import open_regular

DEFAULT_CHUNK_BYTES = 1 << 20
_CLEAN_CUT_SEARCH_BYTES = 1 << 16


@dataclass(frozen=True)
class TextPiece:
    """A run of text from one document, with what a consumer needs to stitch documents."""

    text: str
    document: int  # index among the corpus's non-empty documents
    first_in_document: bool
    source_bytes: int  # bytes of the file this piece consumed, for progress
    name: str  # the document's name within the corpus


def iter_text_pieces(spec, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[TextPiece]:
    """The corpus as pieces of text, in order; documents that hold no text are skipped."""
    source = resolve_source(spec)
    document = 0
    for path in source.files:
        name = source.document_name(path)
        pieces = _play_pieces(path) if source.text_format == PLAY_MARKDOWN else _plain_pieces(path, chunk_bytes)
        first = True
        for text, source_bytes in pieces:
            if text:
                yield TextPiece(text, document, first, source_bytes, name)
                first = False
        if not first:
            document += 1


def iter_texts(spec) -> Iterator[tuple[str, str]]:
    """(name, text) for each non-empty document of the corpus, whole."""
    source: Source = resolve_source(spec)
    name, parts = None, []
    for piece in iter_text_pieces(source):
        if piece.first_in_document and parts:
            yield name, "".join(parts)
            parts = []
        name = piece.name
        parts.append(piece.text)
    if parts:
        yield name, "".join(parts)


def _play_pieces(path) -> Iterator[tuple[str, int]]:
    # Plays are a few hundred kB each, so they are converted whole.
    with open_regular(path, DataError, "text file") as file:
        raw = file.read()
    yield play_markdown_to_text(_decode(raw, path, 0)), len(raw)


def _plain_pieces(path, chunk_bytes: int) -> Iterator[tuple[str, int]]:
    offset = 0  # file offset of carry[0]
    carry = b""
    with open_regular(path, DataError, "text file") as file:
        while True:
            fresh = file.read(chunk_bytes)
            window = carry + fresh
            if not window:
                return
            cut = _cut_point(window) if fresh else len(window)
            if cut == 0:
                carry = window  # one character so far: read on
                continue
            piece, carry = window[:cut], window[cut:]
            yield _decode(piece, path, offset), len(piece)
            offset += cut


def _cut_point(window: bytes) -> int:
    last_newline = window.rfind(b"\n")
    position = last_newline
    # The search for a clean cut is bounded, so indented text (every newline
    # followed by spaces) costs little before falling back to the last newline.
    floor = max(len(window) // 2, len(window) - _CLEAN_CUT_SEARCH_BYTES)
    while position >= floor:
        before, after = window[position - 1 : position], window[position + 1 : position + 2]
        if before and after and not before.isspace() and not after.isspace():
            return position + 1
        position = window.rfind(b"\n", 0, position)
    if last_newline >= 0:
        return last_newline + 1
    # No newline at all: keep the last character, which may be incomplete,
    # for the next window (0 when the window holds just that character). A
    # character has at most 3 continuation bytes, so the walk back stops there:
    # more of them are not UTF-8, and decoding the piece reports where.
    start = len(window) - 1
    while start > max(0, len(window) - 4) and window[start] & 0xC0 == 0x80:
        start -= 1
    return start


def _decode(raw: bytes, path, offset: int) -> str:
    if offset == 0 and raw.startswith(TOKEN_FILE_MAGIC):
        raise DataError(f"{path}: is an xpmodel token file (from xpmodel prepare), not text; name the "
                        f"text it was prepared from: xpmodel tokenizes and caches a corpus itself")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path}: binary file, not text (NUL byte at byte offset {offset + nul})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (decoding failed at byte offset {offset + error.start})") from None
    if offset == 0 and raw.startswith(codecs.BOM_UTF8):
        text = text[1:]
    return text
