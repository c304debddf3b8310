"""Checkpoint files: one safetensors file per checkpoint, written atomically.

A checkpoint holds the fp32 master weights under their GPT-2 names, the
AdamW moments as two flat tensors, and a JSON document (in the safetensors
metadata) with everything else a run needs to continue exactly: step,
optimizer step count, dropout pass count, data sampler position, loss-scaler
state, best validation loss, the config and the tokenizer's fingerprint.

Writing goes to a temporary file in the same folder, is flushed and fsynced,
then renamed over the target, so a crash at any instant leaves either the old
file or the new one. Reading checks the header's framing (every tensor's
dtype, shape and byte range against the file's size) and then its names and
shapes against what the caller expects before loading any tensor, so a
crafted file cannot make xpmodel allocate what it describes; nothing is
unpickled.

For tests of crash safety, the environment variable XPMODEL_TEST_SLOW_SAVE
(seconds) makes every checkpoint write pause between the fsync of its
temporary file and the rename, widening the window a kill can land in.
"""
import json
import math
import os
from pathlib import Path

import numpy
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes

from .atomic import atomic_write_bytes
from .errors import CheckpointError, quote
from .files import parse_json
from .safetensors_header import read_safetensors_header

FORMAT = "xpmodel-checkpoint"
FORMAT_VERSION = 1
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_SLOW_SAVE_ENV = "XPMODEL_TEST_SLOW_SAVE"

def _test_pause():
    try:
        return max(0.0, float(os.environ.get(_SLOW_SAVE_ENV, "0") or 0))
    except ValueError:
        return 0.0


def save_checkpoint(path, params, optimizer_state, meta):
    """params: name -> host array; optimizer_state: name -> host flat array;
    meta: JSON-serialisable dict (format and version are added here)."""
    tensors = {f"param/{name}": numpy.ascontiguousarray(value) for name, value in params.items()}
    tensors.update({f"optim/{name}": numpy.ascontiguousarray(value)
                    for name, value in optimizer_state.items()})
    document = dict(meta, format=FORMAT, format_version=FORMAT_VERSION)
    data = safetensors_bytes(tensors, metadata={"xpmodel": json.dumps(document)})
    atomic_write_bytes(path, data, pause=_test_pause())


def read_checkpoint_meta(path):
    """The JSON document of a checkpoint, after checking the file's framing."""
    path = Path(path)
    header = read_checkpoint_header(path)
    try:
        document = parse_json(header.get("__metadata__", {}).get("xpmodel", ""))
    except (ValueError, AttributeError, TypeError):
        raise CheckpointError(f"{path}: not an xpmodel checkpoint (no xpmodel metadata)") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an xpmodel checkpoint")
    version = document.get("format_version")
    if type(version) is not int or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {quote(version, 40)} is newer "
                              f"than this xpmodel reads ({FORMAT_VERSION}); upgrade xpmodel")
    _check_meta_types(document, path)
    return document


# The type of each field of the JSON document that a run reads back; checked
# here so that a damaged or hand-edited document is named, not an AttributeError.
_META_TYPES = {
    "step": "count", "tokens_seen": "count", "optimizer_steps": "count", "dropout_calls": "count",
    "evals_without_improvement": "count", "world_size": "count", "vocab_size": "count",
    "elapsed": "number", "best_val": "number or null", "last_val": "number or null",
    "sampler": "object", "loss_scaler": "object or null", "config": "object",
    "tokenizer_fingerprint": "string", "kind": "string",
    "epoch": "number", "train_loss": "number or null", "val_loss": "number or null",
    "val_loss_step": "number or null", "interval_train_loss_sum": "number",
    "interval_train_steps": "count",
}


def _check_meta_types(document, path):
    for key, kind in _META_TYPES.items():
        if key not in document:
            continue
        value = document[key]
        if value is None and kind.endswith("or null"):
            continue
        if kind == "count":
            ok = type(value) is int and value >= 0
        elif kind.startswith("number"):
            ok = type(value) in (int, float)
        elif kind.startswith("object"):
            ok = isinstance(value, dict)
        else:
            ok = isinstance(value, str)
        if not ok:
            expected = "a non-negative integer" if kind == "count" else f"a JSON {kind}"
            raise CheckpointError(f"{path}: damaged checkpoint metadata: {key} must be {expected}, "
                                  f"got {quote(value, 60)}")


def load_checkpoint(path, param_shapes, optimizer_sizes):
    """Read a checkpoint, checking it holds exactly the expected tensors.

    param_shapes: name -> shape; optimizer_sizes: name -> flat length, or
    None to read the weights alone (whatever optimizer state the file holds).
    Returns (meta, params name -> array, optimizer name -> array).
    """
    path = Path(path)
    meta = read_checkpoint_meta(path)
    header = read_checkpoint_header(path)
    expected = {f"param/{n}": tuple(s) for n, s in param_shapes.items()}
    found = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    if optimizer_sizes is None:
        found = {k: v for k, v in found.items() if not k.startswith("optim/")}
    else:
        expected.update({f"optim/{n}": (size,) for n, size in optimizer_sizes.items()})
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
    header, _, data_len = read_safetensors_header(path, CheckpointError, "checkpoint")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt checkpoint header (metadata)")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not _entry_fits(entry, data_len):
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint (tensor {name})")
    return header


def _entry_fits(entry, data_len):
    """True when a header entry has a known dtype, a shape of non-negative ints,
    and a byte range inside the data that is exactly the shape's size."""
    if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPE_BYTES:
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        return False
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1] <= data_len):
        return False
    return math.prod(shape) * _DTYPE_BYTES[entry["dtype"]] == offsets[1] - offsets[0]
