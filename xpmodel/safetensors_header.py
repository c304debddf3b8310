"""The header of a safetensors file, read before any tensor so that a damaged
or crafted file is refused without allocating what it claims to hold."""
import os
import struct
from pathlib import Path

from .files import open_regular, parse_json

MAX_HEADER_BYTES = 100 * 2**20   # a real header is a few hundred bytes per tensor


def read_safetensors_header(path, error, what):
    """(header dict, data start offset, data length) of the file at `path`.

    The header's length is checked against the file's size before it is read;
    any problem raises `error` with a one-line message calling the file `what`.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise error(f"{path}: {what} not found")
    try:
        # A regular file only: a FIFO or a device would block or never end.
        with open_regular(path, error, what) as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise error(f"{path}: truncated {what} ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise error(f"{path}: corrupt {what} header (length {header_len})")
            header = parse_json(f.read(header_len))
    except ValueError:   # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise error(f"{path}: corrupt {what} header") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    if not isinstance(header, dict):
        raise error(f"{path}: corrupt {what} header")
    return header, 8 + header_len, size - 8 - header_len
