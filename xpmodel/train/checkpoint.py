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
unpickled. A header is read once (`read_checkpoint_header`): choosing among
a run's checkpoints works on their headers, then the chosen one's tensors
are read from the same file (`CheckpointHeader.load`).

For tests of crash safety, the environment variable XPMODEL_TEST_SLOW_SAVE
(seconds) makes every checkpoint write pause between the fsync of its
temporary file and the rename, widening the window a kill can land in.
"""
import json
import math
import os
import re
from pathlib import Path

import numpy
from safetensors.numpy import save as safetensors_bytes

from ..atomic import atomic_write_bytes
from ..errors import CheckpointError, quote
from ..files import MAX_JSON_COUNT, finite_json_number, parse_json
from ..data.batching import SamplerStateError, check_sampler_state
from ..hf.safetensors_file import SafetensorsFile, header_metadata

FORMAT = "xpmodel-checkpoint"
FORMAT_VERSION = 1
_META_KEY = "xpmodel"   # the safetensors metadata entry that holds the JSON document
STEP_FILE = re.compile(r"^step-(\d{8,})\.safetensors$")
_SLOW_SAVE_ENV = "XPMODEL_TEST_SLOW_SAVE"


def _test_pause():
    """Seconds to pause before each checkpoint's rename (XPMODEL_TEST_SLOW_SAVE; 0 unset or bad)."""
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
    data = safetensors_bytes(tensors, metadata={_META_KEY: json.dumps(document)})
    atomic_write_bytes(path, data, pause=_test_pause())


class CheckpointHeader:
    """A checkpoint whose header was read and checked once: its JSON document
    (`meta`) and its tensors' names, shapes and dtypes. `load` reads the
    tensors later from the same file, refusing one replaced or changed since."""

    def __init__(self, file, meta):
        self.path, self.meta, self._file = file.path, meta, file

    def param_count(self):
        """The weights the file holds (elements of its param/ tensors), from the header."""
        file = self._file
        return sum(math.prod(file.shape(key)) for key in file.names if key.startswith("param/"))

    def unchanged(self):
        """Whether the path still names the file this header was read from, unchanged."""
        return self._file.unchanged()

    def load(self, param_shapes, optimizer_sizes):
        """(meta, params name -> array, optimizer name -> array), checking the
        file holds exactly the expected tensors before reading any.

        param_shapes: name -> shape; optimizer_sizes: name -> flat length, or
        None to read the weights alone (whatever optimizer state the file holds).
        """
        with self._file.reopen() as file:
            params, optim = _read_tensors(file, self.path, param_shapes, optimizer_sizes)
        for name, value in {**params, **optim}.items():
            if not numpy.all(numpy.isfinite(value)):
                raise CheckpointError(f"{self.path}: {name} holds NaN or Inf")
        if "v" in optim and numpy.any(optim["v"] < 0):
            raise CheckpointError(f"{self.path}: v holds negative values (Adam's second moment "
                                  f"cannot)")
        return self.meta, params, optim


def read_checkpoint_header(path):
    """The checkpoint at `path` as a CheckpointHeader, after checking the
    file's framing (every tensor's dtype, shape and byte range against the
    file's size) and the JSON document's fields (types, ranges, and the step
    its name says)."""
    path = Path(path)
    with SafetensorsFile(path, CheckpointError, "checkpoint") as file:
        return CheckpointHeader(file, _checked_meta(file, path))


def names_itself_a_checkpoint(path):
    """Whether the safetensors header of the file at `path` says xpmodel wrote
    it as a checkpoint (its tensors may be damaged); CheckpointError when
    there is no readable header."""
    return _META_KEY in header_metadata(path, CheckpointError, "checkpoint")


def read_checkpoint_meta(path):
    """The checked JSON document of the checkpoint at `path` (read_checkpoint_header)."""
    return read_checkpoint_header(path).meta


def load_checkpoint(path, param_shapes, optimizer_sizes):
    """`CheckpointHeader.load` of the checkpoint at `path`."""
    return read_checkpoint_header(path).load(param_shapes, optimizer_sizes)


def _checked_meta(file, path):
    try:
        document = parse_json(file.metadata.get(_META_KEY, ""))
    except (ValueError, AttributeError, TypeError):
        raise CheckpointError(f"{path}: not an xpmodel checkpoint (no xpmodel metadata)") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an xpmodel checkpoint")
    version = document.get("format_version")
    if type(version) is not int or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {quote(version, 40)} is newer "
                              f"than this xpmodel reads ({FORMAT_VERSION}); upgrade xpmodel")
    _check_meta_types(document, path)
    _check_meta_values(document, path)
    return document


def step_of_name(name):
    """The step of a step checkpoint's file name (`step-00000012.safetensors`
    -> 12; nine digits and more from step 10**8), or None for any other name,
    a non-canonical spelling of a step included."""
    match = STEP_FILE.match(name)
    if match is None:
        return None
    step = int(match.group(1))
    return step if name == step_file_name(step) else None


def step_file_name(step):
    return f"step-{step:08d}.safetensors"


# The type of each field of the JSON document that a run reads back; checked
# here so that a damaged or hand-edited document is named, not an AttributeError.
_META_TYPES = {
    "step": "count", "tokens_seen": "count", "optimizer_steps": "count", "dropout_calls": "count",
    "evals_without_improvement": "count", "world_size": "count", "shards": "count",
    "vocab_size": "count", "total_steps": "count",
    "elapsed": "number", "best_val": "number or null", "last_val": "number or null",
    "sampler": "object", "loss_scaler": "object or null", "config": "object",
    "tokenizer_fingerprint": "string", "data_fingerprint": "string", "kind": "string",
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
            ok = _is_count(value)
        elif kind.startswith("number"):
            ok = type(value) in (int, float)
        elif kind.startswith("object"):
            ok = isinstance(value, dict)
        else:
            ok = isinstance(value, str)
        if not ok:
            expected = "an integer from 0 to 2**63-1" if kind == "count" else f"a JSON {kind}"
            raise CheckpointError(f"{path}: damaged checkpoint metadata: {key} must be {expected}, "
                                  f"got {quote(value, 60)}")


def _is_count(value):
    """Counts (step, tokens_seen, ...) are integers in [0, 2**63 - 1]."""
    return type(value) is int and 0 <= value <= MAX_JSON_COUNT


# Fields that are never negative (losses are cross-entropies); no number may
# be NaN or infinite (a best_val of -Infinity would stop best.safetensors from
# ever being replaced).
_NON_NEGATIVE = ("elapsed", "best_val", "last_val", "epoch", "train_loss", "val_loss",
                 "val_loss_step", "interval_train_loss_sum")
_LOSS_SCALER_COUNTS = ("good_steps", "skipped_in_a_row", "skipped_total")


def _check_meta_values(document, path):
    def damaged(key, why, value):
        return CheckpointError(f"{path}: damaged checkpoint metadata: {key} {why}, "
                               f"got {quote(value, 60)}")

    for key, kind in _META_TYPES.items():
        value = document.get(key)
        if not kind.startswith("number") or value is None:
            continue
        if not finite_json_number(value):
            raise damaged(key, "must be a finite number", value)
        if key in _NON_NEGATIVE and value < 0:
            raise damaged(key, "cannot be negative", value)
    step = step_of_name(path.name)
    if step is not None and "step" in document and document["step"] != step:
        raise damaged("step", f"must be {step}, the step in the file's name", document["step"])
    if "sampler" in document:
        try:
            check_sampler_state(document["sampler"])
        except SamplerStateError as exc:
            raise damaged(f"sampler.{exc.key}", exc.why, exc.value) from None
    scaler = document.get("loss_scaler")
    if scaler is not None:
        scale = scaler.get("scale")
        if type(scale) not in (int, float) or not (finite_json_number(scale) and scale >= 1):
            raise damaged("loss_scaler.scale", "must be a finite number >= 1", scale)
        for key in _LOSS_SCALER_COUNTS:
            if not _is_count(scaler.get(key)):
                raise damaged(f"loss_scaler.{key}", "must be an integer from 0 to 2**63-1",
                              scaler.get(key))


def _read_tensors(file, path, param_shapes, optimizer_sizes):
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
    return params, optim

