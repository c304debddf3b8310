"""metrics.jsonl, a run's log: one JSON object per logged step, evaluation,
health check or warning, appended as training goes (RunDir.append_metrics and
friends call these with the run's path).

Readers are `runs`, `compare`, `plot` and a resume. A line is read only up to
_MAX_LINE bytes; a record whose fields those readers use have the wrong type
or range is skipped with one warning naming the file, as is a line that is not
JSON. The last line, cut short by a kill, is dropped quietly.

A write that fails (a full disk) is an OSError naming the file and saying the
run's checkpoints are intact: the record is lost, a resume continues from the
last checkpoint and cuts the file back to it (a half-written line included).
"""
import contextlib
import json
import math
import os
import sys

from ..atomic import atomic_write_bytes
from ..errors import counted
from ..files import MAX_JSON_COUNT, finite_json_number, open_regular, parse_json
from .checkpoint import CheckpointError

_MAX_LINE = 1 << 16
# Fields of records that `runs`, `compare` and `plot` read: each is null or a
# finite number (time and epoch not negative), else the record is damaged.
_NUMBERS = ("time", "epoch", "loss", "lr", "val_loss", "train_loss", "gap")
_HEALTH_SERIES = ("grad_norm", "update_ratio", "weight_norm")


@contextlib.contextmanager
def appending(path):
    """The file at `path` open for `append_record` while a run trains. A
    failure closing it is reported as a failed write, unless the block ends
    with an error already: that first error is the one to report (after a
    full disk failed a write, the close fails too, flushing what is left)."""
    handle = open(path, "a")
    try:
        yield handle
    except BaseException:
        with contextlib.suppress(OSError):
            handle.close()
        raise
    try:
        handle.close()
    except OSError as exc:
        raise _write_error(exc, path) from None


def append_record(path, record, handle=None):
    """Add one record as a JSON line (to the open `handle`, else to `path`);
    NaN and infinities are written as null."""
    line = json.dumps({k: _json_number(v) for k, v in record.items()}, allow_nan=False) + "\n"
    try:
        if handle is not None:
            handle.write(line)
            handle.flush()
        else:
            with open(path, "a") as f:
                f.write(line)
    except OSError as exc:
        raise _write_error(exc, path) from None


def _write_error(exc, path):
    """A failed write of the metrics file at `path`: an OSError naming it, its
    reason followed by what it means for the run."""
    return OSError(exc.errno, f"{exc.strerror or exc}; the run's checkpoints are intact and "
                              f"train --resume continues from the last one", str(path))


def read_records(path, warn=None, checked=True):
    """The records of the metrics file at `path` ([] when there is none). A
    line cut short by a kill (the last, without its newline) is dropped
    quietly; any other line that is not a JSON object with an integer step
    (and, `checked`, whose fields pass `record_problem`) is skipped with one
    `warn`ing (default: to stderr) naming the file and the lines."""
    if not os.path.lexists(path):
        return []
    warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr))
    records, damaged = [], []
    with open_regular(path, CheckpointError, "metrics file") as f:
        number = 0
        while True:
            line = f.readline(_MAX_LINE)
            if not line:
                break
            number += 1
            complete = line.endswith(b"\n")
            if not complete and len(line) >= _MAX_LINE:
                while line and not line.endswith(b"\n"):   # skip the rest of an overlong line
                    line = f.readline(_MAX_LINE)
                damaged.append(number)
                continue
            try:
                record = parse_json(line)
            except ValueError:   # UnicodeDecodeError included
                if complete:
                    damaged.append(number)
                continue
            if not isinstance(record, dict) or type(record.get("step")) is not int or (
                    checked and record_problem(record)):
                damaged.append(number)
                continue
            records.append(record)
    if damaged:
        lines = ", ".join(map(str, damaged[:5])) + (", ..." if len(damaged) > 5 else "")
        warn(f"{path}: skipped {counted(len(damaged), 'damaged line')} (line {lines})")
    return records


def truncate_records(path, step):
    """Drop records past `step`: a resumed run logs those steps again.
    Records that read_records skips for their fields' types are kept."""
    records = [r for r in read_records(path, checked=False) if r.get("step", 0) <= step]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def record_problem(record):
    """True when a record (an object with an integer step) holds a field
    `runs`, `compare` or `plot` reads with a type or range they cannot use: a
    step outside [0, 2**63), a type that is not a string, a number field
    (_NUMBERS) that is not null or a finite number, a warning without a
    string kind, a health record whose series do not match its groups."""
    if not 0 <= record["step"] <= MAX_JSON_COUNT:
        return True
    kind = record.get("type")
    if kind is not None and not isinstance(kind, str):
        return True
    for key in _NUMBERS:
        value = record.get(key)
        if value is not None and not (finite_json_number(value)
                                      and (key not in ("time", "epoch") or value >= 0)):
            return True
    if kind == "warning":
        return not isinstance(record.get("kind"), str)
    if kind == "health":
        groups = record.get("groups")
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            return True
        for key in _HEALTH_SERIES:
            series = record.get(key)
            if series is None and key == "weight_norm":
                continue
            if not isinstance(series, list) or len(series) != len(groups) or not all(
                    v is None or finite_json_number(v) for v in series):
                return True
    return False


def _json_number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value
