"""Tokenise a corpus once into a token file, and reuse it while nothing has changed.

The token file is found again by a cache key: the sha256 of the token file
format version, the corpus fingerprint (files, sizes, mtimes, contents; see
`sources.corpus_fingerprint`) and the tokenizer fingerprint. Any change to
the corpus or the tokenizer gives a new key and so a fresh file; an
unchanged pair reuses the existing file without reading the corpus.

A reused file's ids are checked against the sha256 its sidecar records
(tokenfile.py): a cached file that fails, or whose sidecar predates the
checksum, is rebuilt (a damaged one with a note on stderr); an `out_path`
file that fails is a DataError (it is the user's file), one without a
checksum is reused as before.

Where token files live: `out_path` when given (reused only if its sidecar
carries the same key), else `<cache_dir>/<name>-<key>.tok` with `cache_dir`
taken from the argument, else `$XPMODEL_CACHE/tokens`, else
`~/.cache/xpmodel/tokens`.

Documents (files, or plays for the shakespeare corpus) are joined with the
tokenizer's end-of-text id between them, when the tokenizer has one
(`eot_id` not None), so a model learns where one document stops; nothing is
added before the first or after the last.

Memory stays bounded: files are read piece by piece (`reading.py`), encoded
by `tokenizer.encode_chunks` (parallel over `workers` processes) and written
as the ids come back.
"""

import collections
import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy

from .reading import DEFAULT_CHUNK_BYTES, TextPiece, iter_text_pieces
from .sources import corpus_fingerprint, resolve_source
from .tokenfile import (
    FORMAT_VERSION,
    MAX_VOCAB_SIZE,
    check_token_checksum,
    damaged_message,
    read_sidecar,
    read_token_header,
    write_token_file,
)
from ..atomic import remove_stale_temporaries
from ..errors import DataError, UsageError, quote
from ..files import folder_problem

ProgressCallback = Callable[[int, int], None]  # (bytes_done, bytes_total)

MIN_VOCAB_SIZE = 256


def cache_root(cache_dir: "str | os.PathLike | None" = None) -> Path:
    """The one place xpmodel caches into: `cache_dir` when given (data.cache_dir),
    else $XPMODEL_CACHE, else ~/.cache/xpmodel. Tokenizers and token files live
    in folders below it. Checked before anything is trained or tokenized: a
    folder that is a file, lies below one, or cannot be written to is a one-line
    UsageError naming the key or variable that chose it."""
    if cache_dir:
        root, named = Path(cache_dir).expanduser(), f"data.cache_dir={quote(str(cache_dir), 120)}"
    elif os.environ.get("XPMODEL_CACHE"):
        value = os.environ["XPMODEL_CACHE"]
        root, named = Path(value).expanduser(), f"XPMODEL_CACHE={quote(value, 120)}"
    else:
        root = Path.home() / ".cache" / "xpmodel"
        named = f"the cache folder {root} (XPMODEL_CACHE or data.cache_dir move it)"
    problem = folder_problem(root)
    if problem is not None:
        raise UsageError(f"{named}: {problem}; point it at a folder xpmodel may write in")
    return root


def default_cache_dir() -> Path:
    """Where token files go when no folder is named: `cache_root() / "tokens"`."""
    return cache_root() / "tokens"


def token_cache_key(source, tokenizer) -> str:
    """The hex key under which the tokens of `source` by `tokenizer` are cached."""
    facts = f"tokens-v{FORMAT_VERSION}\0{corpus_fingerprint(source)}\0{tokenizer.fingerprint()}"
    return hashlib.sha256(facts.encode()).hexdigest()


def prepare(
    source,
    tokenizer,
    out_path: "str | os.PathLike | None" = None,
    cache_dir: "str | os.PathLike | None" = None,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    rebuild: bool = False,
) -> Path:
    """The path of a token file holding `source` encoded by `tokenizer`, built only if
    needed, or always with `rebuild` (prepare --overwrite: a damaged `out_path` too)."""
    vocab_size = int(tokenizer.vocab_size)
    if vocab_size < MIN_VOCAB_SIZE:
        raise UsageError(f"vocab size {vocab_size} is below {MIN_VOCAB_SIZE}: a byte-level "
                         f"tokenizer needs one id per byte")
    if vocab_size > MAX_VOCAB_SIZE:
        raise DataError(f"vocab size {vocab_size} does not fit a token file (at most {MAX_VOCAB_SIZE})")
    source = resolve_source(source)
    key = token_cache_key(source, tokenizer)
    if out_path is not None:
        target = Path(out_path)
    else:
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        target = folder / f"{_file_stem(source.spec)}-{key[:24]}.tok"
    if out_path is None:
        remove_stale_temporaries(target.parent, CACHED_TOKEN_FILE.match)
    if not rebuild and _is_current(target, key, own_cache=out_path is None):
        return target
    total = source.total_bytes()
    eot_id = getattr(tokenizer, "eot_id", None)
    meta = {"cache_key": key, "source": source.describe(), "eot_between_documents": eot_id is not None}
    chunks = _encoded_chunks(source, tokenizer, eot_id, workers, chunk_bytes, progress, total)
    write_token_file(target, chunks, vocab_size, tokenizer.fingerprint(), meta)
    if progress is not None:
        progress(total, total)
    return target


def _encoded_chunks(source, tokenizer, eot_id, workers, chunk_bytes, progress, total) -> Iterator[numpy.ndarray]:
    # encode_chunks returns one id array per piece, in order; a document's
    # pieces after its first continue it, so its arrays join into the ids of
    # the whole document. The pieces' bookkeeping waits in a queue until their
    # ids come back (the tokenizer may read ahead of what it has returned).
    waiting: collections.deque[TextPiece] = collections.deque()

    def texts() -> Iterator[tuple[str, bool]]:
        for piece in iter_text_pieces(source, chunk_bytes):
            waiting.append(piece)
            yield piece.text, not piece.first_in_document

    eot = None if eot_id is None else numpy.array([eot_id], dtype=numpy.uint32)
    done = 0
    if progress is not None:
        progress(done, total)
    for ids in tokenizer.encode_chunks(texts(), workers=workers):
        piece = waiting.popleft()
        if eot is not None and piece.first_in_document and piece.document > 0:
            yield eot
        yield ids
        done += piece.source_bytes
        if progress is not None:
            progress(done, total)


def _is_current(target: Path, key: str, own_cache: bool = True) -> bool:
    """Whether `target` holds these tokens, whole: its sidecar names the key and
    the header, and its ids match the sidecar's checksum. In xpmodel's own cache
    (`own_cache`) a file without a checksum is stale and a damaged one is rebuilt
    with a note; a user's file (prepare's out_path) that is damaged is an error."""
    if not target.is_file():
        return False
    try:
        header = read_token_header(target)
        sidecar = read_sidecar(target)
    except DataError:
        return False  # an unreadable old file is rebuilt, not reported
    meta = sidecar.get("meta")
    if not (
        isinstance(meta, dict)
        and meta.get("cache_key") == key
        and sidecar.get("count") == header.count
        and sidecar.get("tokenizer_fingerprint") == header.tokenizer_fingerprint
    ):
        return False
    intact = check_token_checksum(target, sidecar)
    if intact is None:
        return not own_cache  # a cache entry from before checksums: rebuilt
    if not intact:
        if not own_cache:
            raise DataError(damaged_message(target))
        print(f"note: {target}: cached token ids do not match their checksum; rebuilding the "
              f"file", file=sys.stderr, flush=True)
    return intact


# The names xpmodel gives its cache files (prepare's token files and their
# sidecars, corpus.py's tokenizers); only their temporaries are ever removed.
CACHED_TOKEN_FILE = re.compile(r"^[A-Za-z0-9._-]*-[0-9a-f]{24}\.tok(\.json)?$")
CACHED_TOKENIZER = re.compile(r"^bpe-\d+-[0-9a-f]{24}\.json$")


def _file_stem(spec: str) -> str:
    # A readable hint of the corpus in the file name; the key makes it unique.
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(spec).name.replace("*", "all")).strip("._")
    return stem[:40] or "corpus"
