"""Checkpoint files: one safetensors file per checkpoint, written atomically.

A checkpoint holds the fp32 master weights under their GPT-2 names, the
AdamW moments as two flat tensors, and a JSON document (in the safetensors
metadata) with everything else a run needs to continue exactly: step,
optimizer step count, dropout pass count, data sampler position, loss-scaler
state, best validation loss, the config and the tokenizer's fingerprint.

Writing goes to a temporary file in the same folder, is flushed and fsynced,
then renamed over the target, so a crash at any instant leaves either the old
file or the new one. Reading checks the header's names, shapes and dtypes
against what the caller expects before loading any tensor, so a crafted file
cannot make xpmodel allocate what it describes; nothing is unpickled.
"""
import json
import os
import struct
from pathlib import Path

import numpy
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes

from .errors import CheckpointError

FORMAT = "xpmodel-checkpoint"
FORMAT_VERSION = 1
_MAX_HEADER_BYTES = 100 * 2**20   # a real header is a few KB per parameter


def atomic_write_bytes(path, data):
    """Write `data` to `path` so that readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path, params, optimizer_state, meta):
    """params: name -> host array; optimizer_state: name -> host flat array;
    meta: JSON-serialisable dict (format and version are added here)."""
    tensors = {f"param/{name}": numpy.ascontiguousarray(value) for name, value in params.items()}
    tensors.update({f"optim/{name}": numpy.ascontiguousarray(value)
                    for name, value in optimizer_state.items()})
    document = dict(meta, format=FORMAT, format_version=FORMAT_VERSION)
    data = safetensors_bytes(tensors, metadata={"xpmodel": json.dumps(document)})
    atomic_write_bytes(path, data)


def read_checkpoint_meta(path):
    """The JSON document of a checkpoint, after checking the file's framing."""
    path = Path(path)
    header = read_checkpoint_header(path)
    try:
        document = json.loads(header.get("__metadata__", {}).get("xpmodel", ""))
    except (json.JSONDecodeError, AttributeError):
        raise CheckpointError(f"{path}: not an xpmodel checkpoint (no xpmodel metadata)") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an xpmodel checkpoint")
    version = document.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this "
                              f"xpmodel reads ({FORMAT_VERSION}); upgrade xpmodel")
    return document


def load_checkpoint(path, param_shapes, optimizer_sizes):
    """Read a checkpoint, checking it holds exactly the expected tensors.

    param_shapes: name -> shape; optimizer_sizes: name -> flat length.
    Returns (meta, params name -> array, optimizer name -> array).
    """
    path = Path(path)
    meta = read_checkpoint_meta(path)
    header = read_checkpoint_header(path)
    expected = {f"param/{n}": tuple(s) for n, s in param_shapes.items()}
    expected.update({f"optim/{n}": (size,) for n, size in optimizer_sizes.items()})
    found = {k: tuple(v.get("shape", ())) for k, v in header.items() if k != "__metadata__"}
    if set(found) != set(expected):
        missing = sorted(set(expected) - set(found))[:3]
        extra = sorted(set(found) - set(expected))[:3]
        raise CheckpointError(f"{path}: tensors do not match this model's config "
                              f"(missing {missing}, unexpected {extra})")
    for name, shape in expected.items():
        if found[name] != shape:
            raise CheckpointError(f"{path}: {name} has shape {found[name]}, the config needs {shape}")
        if header[name].get("dtype") not in ("F32", "F64"):
            raise CheckpointError(f"{path}: {name} has dtype {header[name].get('dtype')}, "
                                  f"expected F32 or F64")
    params, optim = {}, {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for key in expected:
                kind, name = key.split("/", 1)
                (params if kind == "param" else optim)[name] = f.get_tensor(key)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from None
    for name, value in {**params, **optim}.items():
        if not numpy.all(numpy.isfinite(value)):
            raise CheckpointError(f"{path}: {name} holds NaN or Inf")
    return meta, params, optim


def read_checkpoint_header(path):
    """The safetensors JSON header, with its length and offsets checked against the file size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated checkpoint ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(f"{path}: corrupt checkpoint header (length {header_len})")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt checkpoint header") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc.strerror})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt checkpoint header")
    data_len = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint (tensor {name})")
    return header
