"""Reading safetensors files, the one validated reader of checkpoints and
Hugging Face weights: the header is read and every entry's dtype, shape and
byte range are checked against the file's size before any tensor is, so a
damaged or crafted file is refused without allocating what it claims to
hold; then tensors are read one at a time. Nothing is unpickled.

The byte ranges must tile the data section exactly, in some order: no two
tensors share a byte and no byte belongs to none (the official safetensors
library refuses such files too), so no tensor can be read out of another's
bytes.

A `SafetensorsFile` keeps one open file descriptor from its header to its
last tensor, so a file renamed over the path meanwhile (a checkpoint being
replaced, say) is never mixed with the one whose header was read. Closed, it
keeps the header: `reopen` opens the path again to read tensors without
reading the header a second time, and refuses a path that no longer names
that file as it was (one renamed over it, or the file truncated or rewritten
since)."""
import math
import os
import struct
from pathlib import Path

import numpy

from ..errors import quote
from ..files import file_identity, open_regular, parse_json

# safetensors dtype -> NumPy dtype; BF16 is read as its raw 16 bits
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
          "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
          "BOOL": "?"}
FLOAT_DTYPES = ("F32", "F64", "F16", "BF16")
# safetensors dtypes NumPy cannot hold, known by their size only: a file with
# them is checked like any other, so that a reader can refuse the dtype by name
# rather than call the file corrupt.
SIZE_ONLY_DTYPES = {"F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}

MAX_HEADER_BYTES = 100 * 2**20   # a real header is a few hundred bytes per tensor


def _open(path, error, what):
    """The regular file at `path`, opened for reading (a FIFO or a device
    would block or never end)."""
    if not os.path.lexists(path):
        raise error(f"{path}: {what} not found")
    try:
        return open_regular(path, error, what)
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


def _read_header(f, path, error, what):
    """(header dict, data start offset, data length) read from the open file `f`."""
    try:
        size = os.fstat(f.fileno()).st_size
        prefix = os.pread(f.fileno(), 8, 0)
        if len(prefix) < 8:
            raise error(f"{path}: truncated {what} ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise error(f"{path}: corrupt {what} header (length {header_len})")
        header = parse_json(os.pread(f.fileno(), header_len, 8))
    except ValueError:   # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise error(f"{path}: corrupt {what} header") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    if not isinstance(header, dict):
        raise error(f"{path}: corrupt {what} header")
    return header, 8 + header_len, size - 8 - header_len


def header_metadata(path, error, what):
    """The `__metadata__` of the safetensors file at `path` ({} when it has
    none), its header alone read: the tensors' data may be missing or damaged."""
    with _open(path, error, what) as f:
        metadata = _read_header(f, path, error, what)[0].get("__metadata__")
    return metadata if isinstance(metadata, dict) else {}


class SafetensorsFile:
    """One safetensors file, its header checked when opened, read through one
    file descriptor until `close()` (or the end of a `with` block).

    error: the exception class for every problem; what: what the messages
    call the file ("checkpoint", "safetensors file")."""

    def __init__(self, path, error, what):
        self.path, self._error, self._what = Path(path), error, what
        self._file = _open(self.path, error, what)
        try:
            self._identity = file_identity(os.fstat(self._file.fileno()), content=True)
            self._parse(*_read_header(self._file, self.path, error, what))
        except BaseException:
            self.close()
            raise

    def _parse(self, header, data_start, data_len):
        error, what = self._error, self._what
        self._data_start = data_start
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise error(f"{self.path}: corrupt {what} header (metadata)")
        self.metadata = metadata
        self._entries = {}
        for key, entry in header.items():
            if isinstance(entry, dict) and "dtype" in entry and _itemsize(entry["dtype"]) is None:
                raise error(f"{self.path}: unknown dtype {quote(entry['dtype'], 80)} of tensor "
                            f"{quote(key, 80)}")
            if not _entry_fits(entry, data_len):
                raise error(f"{self.path}: truncated or corrupt {what} (tensor {quote(key, 80)})")
            self._entries[key] = (entry["dtype"], tuple(entry["shape"]), *entry["data_offsets"])
        self._check_tiling(data_len)

    def _check_tiling(self, data_len):
        """The byte ranges, in order, start at 0, meet end to end and cover the data."""
        ranges = sorted((start, end, key) for key, (_, _, start, end) in self._entries.items())
        at = 0
        for start, end, key in ranges:
            if start != at:
                how = "overlap the tensor before" if start < at else "leave a gap after the tensor before"
                raise self._error(f"{self.path}: corrupt {self._what}: the bytes [{start}, {end}) of "
                                  f"tensor {quote(key, 80)} {how} (expected it at {at})")
            at = end
        if at != data_len:
            raise self._error(f"{self.path}: corrupt {self._what}: the tensors cover {at} bytes of "
                              f"the {data_len}-byte data section")

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def reopen(self):
        """This file, open again after `close()` to read tensors by the header
        read before (use it in a `with` block); refused (the error class) when
        the path no longer names the file whose header was read, unchanged."""
        if self._file is None:
            file = _open(self.path, self._error, self._what)
            if file_identity(os.fstat(file.fileno()), content=True) != self._identity:
                file.close()
                raise self._error(f"{self.path}: {self._what} replaced or changed since its "
                                  f"header was read")
            self._file = file
        return self

    def unchanged(self):
        """Whether the path still names the file whose header was read, unchanged."""
        try:
            return file_identity(os.stat(self.path), content=True) == self._identity
        except OSError:
            return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()

    @property
    def names(self):
        return list(self._entries)

    def shape(self, key):
        return self._entries[key][1]

    def dtype(self, key):
        return self._entries[key][0]

    def read(self, key):
        """The tensor `key` as a NumPy array of its own dtype (BF16 widened to float32)."""
        if self._file is None:
            raise ValueError(f"{self.path}: read from a closed {self._what}")
        dtype, shape, start, end = self._entries[key]
        if dtype in SIZE_ONLY_DTYPES:
            raise ValueError(f"{self.path}: {key} is {dtype}, which NumPy cannot hold")
        try:
            raw = os.pread(self._file.fileno(), end - start, self._data_start + start)
        except OSError as exc:
            raise self._error(f"{self.path}: cannot read {self._what} ({exc.strerror or exc})") from None
        if len(raw) != end - start:
            raise self._error(f"{self.path}: truncated {self._what}")
        value = numpy.frombuffer(raw, dtype=DTYPES[dtype])
        if dtype == "BF16":   # the high half of a float32
            value = (value.astype(numpy.uint32) << 16).view(numpy.float32)
        return value.reshape(shape).copy()


def _entry_fits(entry, data_len):
    """True when a header entry has a known dtype, a shape of non-negative ints,
    and a byte range inside the data that is exactly the shape's size."""
    if not isinstance(entry, dict) or _itemsize(entry.get("dtype")) is None:
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        return False
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1] <= data_len):
        return False
    return math.prod(shape) * _itemsize(entry["dtype"]) == offsets[1] - offsets[0]


def _itemsize(dtype):
    """Bytes per element of a safetensors dtype, or None for one xpmodel does not know."""
    if not isinstance(dtype, str):
        return None
    if dtype in SIZE_ONLY_DTYPES:
        return SIZE_ONLY_DTYPES[dtype]
    return numpy.dtype(DTYPES[dtype]).itemsize if dtype in DTYPES else None
