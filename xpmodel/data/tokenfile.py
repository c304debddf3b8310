"""The token file: a 64-byte header, then the token ids, plus a readable JSON sidecar.

Header layout (little-endian, `struct` format `<8sIIQI32s4x`):

    offset  size  field
         0     8  magic b"XPMTOK\\0\\0"
         8     4  format version (uint32), FORMAT_VERSION
        12     4  dtype code (uint32): 1 = uint16 ids, 2 = uint32 ids
        16     8  token count (uint64)
        24     4  vocab size (uint32)
        28    32  tokenizer fingerprint (the raw sha256 bytes)
        60     4  zero padding, so the ids start 64-byte aligned

The ids follow immediately: uint16 when the vocab has at most 65536 entries,
else uint32. The sidecar `<file>.json` repeats these facts in readable form
and adds the sha256 of the id bytes (`ids_sha256`) and the caller's `meta`
(the corpus description, the cache key). The checksum catches what the other
checks cannot: ids overwritten in place with other in-range ids (zeros, say).
`check_token_checksum` compares it (about 2 GB/s); sidecars written before it
existed have none.

Writes are atomic (`atomic.atomic_writer`): ids stream into a temporary file
next to the target, the count is patched into its header at the end, and the
file is renamed over the target only when complete. The two files are a pair
written in file_pairs.py's order, once the new ids and sidecar are written:
the old token file is removed, the sidecar (stamped with the token file's
name) lands, then the token file, so a token file is always beside a sidecar that describes it,
and a write killed in between leaves a sidecar alone that the next prepare
replaces. A write that fails before then (a full disk, Ctrl-C) leaves the old
pair as it was. An old token file holding the same ids as the new one (the
sidecar beside it records them) is not removed: it is whole beside the new
sidecar too, and stays readable to whoever uses it meanwhile, as two trials of
a parallel sweep filling one cache entry do. Reads check every header field
and that the file size matches the count before anything is mapped, so a
corrupt or crafted header cannot trigger a large allocation.
"""

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy

from ..errors import DataError, UsageError
from ..file_pairs import stamp, write_pair
from ..files import open_regular, read_json

MAGIC = b"XPMTOK\0\0"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQI32s4x")
HEADER_BYTES = HEADER.size  # 64
_COUNT_OFFSET = 16
_DTYPE_CODES = {1: numpy.dtype("<u2"), 2: numpy.dtype("<u4")}
MAX_VOCAB_SIZE = 2**32 - 1  # the largest value the uint32 header field holds
_CHECK_CHUNK = 1 << 24  # ids checked against the vocab per pass
_MAX_SIDECAR_BYTES = 1 << 20
_HASH_CHUNK = 1 << 24  # bytes hashed per read
CHECKSUM_KEY = "ids_sha256"
# the sidecar's facts that tell two token files' ids apart
_ID_FACTS = ("format", "version", "dtype", "count", "vocab_size", "tokenizer_fingerprint",
             CHECKSUM_KEY)


@dataclass(frozen=True)
class TokenFileHeader:
    """The facts stored in a token file's header."""

    version: int
    dtype: numpy.dtype
    count: int
    vocab_size: int
    tokenizer_fingerprint: str  # hex


def sidecar_path(path: "str | os.PathLike") -> Path:
    """Where the JSON sidecar of the token file `path` lives."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def token_dtype(vocab_size: int) -> numpy.dtype:
    """The narrowest id type that holds every id of a vocab of `vocab_size`."""
    if not 1 <= vocab_size <= MAX_VOCAB_SIZE:
        raise DataError(f"vocab size {vocab_size} does not fit a token file (1 to {MAX_VOCAB_SIZE})")
    return _DTYPE_CODES[1] if vocab_size <= 2**16 else _DTYPE_CODES[2]


def write_token_file(
    path: "str | os.PathLike",
    chunks: Iterable,
    vocab_size: int,
    tokenizer_fingerprint: str,
    meta: dict | None = None,
) -> Path:
    """Stream integer id arrays from `chunks` into the token file `path`, atomically."""
    path = Path(path)
    dtype = token_dtype(vocab_size)
    fingerprint = _fingerprint_bytes(tokenizer_fingerprint)
    dtype_code = next(code for code, known in _DTYPE_CODES.items() if known == dtype)
    sidecar = {}

    def write_ids(file):
        count = 0
        digest = hashlib.sha256()
        file.write(HEADER.pack(MAGIC, FORMAT_VERSION, dtype_code, 0, vocab_size, fingerprint))
        for chunk in chunks:
            ids = numpy.asarray(chunk)  # (n,)
            if ids.size == 0:
                continue
            _check_ids(ids, vocab_size, path)
            data = ids.astype(dtype, copy=False).tobytes()
            digest.update(data)
            file.write(data)
            count += ids.size
        file.seek(_COUNT_OFFSET)
        file.write(struct.pack("<Q", count))
        sidecar.update({
            "format": "xpmodel-tokens",
            "version": FORMAT_VERSION,
            "dtype": dtype.name,
            "count": count,
            "vocab_size": vocab_size,
            "tokenizer_fingerprint": tokenizer_fingerprint,
            CHECKSUM_KEY: digest.hexdigest(),
            "meta": meta or {},
            **stamp(path),
        })

    def write_sidecar(file):
        file.write((json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode("utf-8"))

    write_pair(sidecar_path(path), path, write_sidecar, write_ids,
               last_matches=lambda: _holds_same_ids(path, sidecar))
    return path


def _holds_same_ids(path, sidecar):
    """Whether the sidecar beside the token file `path` records the ids that
    `sidecar` describes (their type, count, vocab, tokenizer and checksum)."""
    try:
        old = read_sidecar(path)
    except DataError:
        return False
    return all(old.get(key) == sidecar[key] for key in _ID_FACTS)


def read_token_header(path: "str | os.PathLike") -> TokenFileHeader:
    """The validated header of the token file `path`; DataError naming it if anything is off."""
    path = Path(path)
    try:
        with open_regular(path, DataError, "token file") as file:
            size = os.fstat(file.fileno()).st_size
            raw = file.read(HEADER_BYTES)
    except OSError as error:
        raise DataError(f"{path}: cannot read token file ({error.strerror})") from None
    if len(raw) < len(MAGIC) or raw[: len(MAGIC)] != MAGIC:
        raise DataError(f"{path}: not an xpmodel token file (bad magic bytes)")
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: truncated token file ({size} bytes, shorter than its {HEADER_BYTES}-byte header)")
    _, version, dtype_code, count, vocab_size, fingerprint = HEADER.unpack(raw)
    if version > FORMAT_VERSION:
        raise DataError(
            f"{path}: token file format version {version} is newer than this xpmodel reads "
            f"(up to {FORMAT_VERSION}); upgrade xpmodel or re-run prepare"
        )
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: unknown token file format version {version}")
    if dtype_code not in _DTYPE_CODES:
        raise DataError(f"{path}: unknown token dtype code {dtype_code} in header")
    dtype = _DTYPE_CODES[dtype_code]
    expected_size = HEADER_BYTES + count * dtype.itemsize  # Python ints: no overflow
    if size != expected_size:
        raise DataError(
            f"{path}: token file is {size} bytes but its header promises {count} {dtype.name} ids "
            f"({expected_size} bytes); the file is truncated or corrupt"
        )
    if vocab_size == 0 or vocab_size > numpy.iinfo(dtype).max + 1:
        raise DataError(f"{path}: vocab size {vocab_size} in header does not fit its {dtype.name} ids")
    return TokenFileHeader(version, dtype, count, vocab_size, fingerprint.hex())


def read_token_file(
    path: "str | os.PathLike",
    expected_fingerprint: str | None = None,
    vocab_size: int | None = None,
    verify_checksum: bool = False,
) -> numpy.ndarray:
    """The ids of the token file `path` as a read-only memmap (N,), after validating it.

    With `vocab_size`, every id is checked to be below it (one pass over the
    file), so a damaged file is named here rather than failing deep in a model.
    With `verify_checksum`, the ids are compared with the sidecar's checksum
    (a file whose sidecar records none passes).
    """
    path = Path(path)
    header = read_token_header(path)
    if verify_checksum and check_token_checksum(path) is False:
        raise DataError(damaged_message(path))
    if expected_fingerprint is not None and header.tokenizer_fingerprint != expected_fingerprint:
        raise DataError(
            f"{path}: tokenized by a different tokenizer (fingerprint {header.tokenizer_fingerprint[:12]}…, "
            f"expected {expected_fingerprint[:12]}…); re-run prepare with this tokenizer"
        )
    if header.count == 0:
        # mmap cannot map zero bytes; an empty array behaves the same for readers.
        return numpy.empty(0, dtype=header.dtype)
    tokens = numpy.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_BYTES, shape=(header.count,))
    if vocab_size is not None:
        limit = min(vocab_size, header.vocab_size)
        for start in range(0, header.count, _CHECK_CHUNK):
            highest = int(tokens[start : start + _CHECK_CHUNK].max())
            if highest >= limit:
                raise DataError(
                    f"{path}: token id {highest} is outside the vocabulary of {limit} ids; the file is "
                    f"damaged: delete it and {sidecar_path(path).name} to have it rebuilt (or re-run "
                    f"xpmodel prepare)"
                )
    return tokens


def ids_checksum(path: "str | os.PathLike") -> str:
    """The hex sha256 of the id bytes of the token file `path` (after its header),
    read in bounded chunks."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with open_regular(path, DataError, "token file") as file:
            file.seek(HEADER_BYTES)
            while True:
                data = file.read(_HASH_CHUNK)
                if not data:
                    break
                digest.update(data)
    except OSError as error:
        raise DataError(f"{path}: cannot read token file ({error.strerror})") from None
    return digest.hexdigest()


def check_token_checksum(path: "str | os.PathLike", sidecar: dict | None = None) -> bool | None:
    """Whether the ids of the token file `path` match the checksum its sidecar
    records (True or False), or None when the sidecar records none (written
    before xpmodel kept one) or an unusable one."""
    facts = read_sidecar(path) if sidecar is None else sidecar
    recorded = facts.get(CHECKSUM_KEY)
    if not isinstance(recorded, str) or len(recorded) != 64:
        return None
    return ids_checksum(path) == recorded


def read_sidecar(path: "str | os.PathLike") -> dict:
    """The JSON sidecar of the token file `path`; DataError naming the sidecar if unreadable."""
    sidecar = sidecar_path(path)
    if not os.path.lexists(sidecar):
        raise DataError(f"{sidecar}: token file sidecar is missing")
    return read_json(sidecar, _MAX_SIDECAR_BYTES, DataError, "token file sidecar")


def damaged_message(path: Path) -> str:
    return (f"{path}: the token ids do not match the checksum in {sidecar_path(path).name}; the "
            f"file is damaged: delete it and {sidecar_path(path).name}, then re-run xpmodel prepare")


def _fingerprint_bytes(fingerprint: str) -> bytes:
    try:
        raw = bytes.fromhex(fingerprint)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != 32:
        raise UsageError(f"tokenizer fingerprint must be 64 hex digits (a sha256), got {fingerprint!r}")
    return raw


def _check_ids(ids: numpy.ndarray, vocab_size: int, path: Path) -> None:
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise UsageError(f"{path}: token chunks must be 1-D integer arrays, got {ids.dtype} {ids.shape}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise DataError(f"{path}: token id {bad} is outside the vocab of {vocab_size}")


