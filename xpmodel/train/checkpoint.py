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
import os
from pathlib import Path

import numpy
from safetensors.numpy import save as safetensors_bytes

from ..atomic import atomic_write_bytes
from ..errors import CheckpointError, quote
from ..files import parse_json
from ..hf.safetensors_file import SafetensorsFile

FORMAT = "xpmodel-checkpoint"
FORMAT_VERSION = 1
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
    try:
        document = parse_json(open_checkpoint(path).metadata.get("xpmodel", ""))
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
    file = open_checkpoint(path)
    expected = {f"param/{n}": tuple(s) for n, s in param_shapes.items()}
    found = {k: file.shape(k) for k in file.names}
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
        if file.dtype(name) not in ("F32", "F64"):
            raise CheckpointError(f"{path}: {name} has dtype {file.dtype(name)}, "
                                  f"expected F32 or F64")
    params, optim = {}, {}
    for key in expected:
        kind, name = key.split("/", 1)
        (params if kind == "param" else optim)[name] = file.read(key)
    for name, value in {**params, **optim}.items():
        if not numpy.all(numpy.isfinite(value)):
            raise CheckpointError(f"{path}: {name} holds NaN or Inf")
    return meta, params, optim


def open_checkpoint(path):
    """The checkpoint's safetensors file, its framing checked (every tensor's
    dtype, shape and byte range against the file's size)."""
    return SafetensorsFile(path, CheckpointError, "checkpoint")
