"""A setting's rules, and checking a value against them.

Each section of the run config is a dataclass whose fields are settings: a
type annotation (int, float, bool, str, a list of one of them, each optionally
None) and, made by setting, a range the value must lie `within` or the
`choices` it must be one of. check_field converts a value to its field's type
where that loses nothing (an int or a numeric string for a float) and checks it,
raising a one-line UsageError that names the dotted key. The sections
themselves are in sections.py; this file knows nothing of them.
"""
import dataclasses
import functools
import math
import typing
from dataclasses import field

from ..errors import UsageError, quote

# The longest a string setting may be (YAML's other bounds are in yaml_files.py).
_MAX_STRING_CHARS = 1 << 16
# String keys that mean nothing when empty (null says "none" for the optional ones).
_NON_EMPTY = {"data.source", "train.init_from", "data.cache_dir"}


def setting(default, within=None, choices=None):
    """A dataclass field whose value must lie `within` a range or be one of `choices`."""
    return field(default=default, metadata={"within": within, "choices": choices})


def check_fields(config, section):
    """Type-check, convert and range-check every field of one section in place."""
    for spec in dataclasses.fields(config):
        value = check_field(type(config), spec.name, getattr(config, spec.name), f"{section}.{spec.name}")
        object.__setattr__(config, spec.name, value)


def check_field(cls, key, value, dotted):
    """Return `value` converted to the type of the field `key` of the dataclass
    `cls`, or raise UsageError naming it `dotted` (section.key)."""
    spec = fields_of(cls)[key]
    value = _convert(dotted, value, types_of(cls)[key])
    if value is None:
        return None
    within, choices = spec.metadata.get("within"), spec.metadata.get("choices")
    if within is not None and not within.contains(value):
        raise UsageError(f"{dotted} must be {within.describe()}, got {quote(value, 60)}")
    for item in value if isinstance(value, list) else [value]:
        if choices is not None and item not in choices:
            raise UsageError(f"{dotted} must be one of {', '.join(choices)}; got {quote(item, 60)}")
    return value


@functools.cache
def fields_of(cls):
    return {spec.name: spec for spec in dataclasses.fields(cls)}


@functools.cache
def types_of(cls):
    # Annotations are strings under `from __future__ import annotations`.
    return typing.get_type_hints(cls)


def _convert(dotted, value, annotation):
    """Check `value` against a field type such as `int` or `int | None`, converting where lossless."""
    if typing.get_origin(annotation) is list:
        return _convert_list(dotted, value, typing.get_args(annotation)[0])
    kinds = typing.get_args(annotation) or (annotation,)
    optional = type(None) in kinds
    kind = next(k for k in kinds if k is not type(None))
    if value is None:
        if optional:
            return None
        raise UsageError(f"{dotted} must be {_DESCRIPTIONS[kind]}, not null")
    if kind is bool and isinstance(value, bool):
        return value
    # bool is a subclass of int, but `n_layer: true` is a mistake, not a 1.
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float:
        number = _as_float(value)
        if number is not None:
            if not math.isfinite(number):
                raise UsageError(f"{dotted} must be a finite number, got {value!r}")
            return number
    if kind is str and isinstance(value, str):
        if len(value) > _MAX_STRING_CHARS:
            raise UsageError(f"{dotted} is {len(value):,} characters long, more than the "
                             f"{_MAX_STRING_CHARS:,} a setting may be")
        # No file name can hold a NUL (open() fails far from the key): no setting may.
        if "\0" in value:
            raise UsageError(f"{dotted} holds a NUL character (\\0), which no setting may hold; "
                             f"got {quote(value, 60)}")
        if dotted in _NON_EMPTY and not value.strip():
            raise UsageError(f"{dotted} must not be empty")
        return value
    expected = _DESCRIPTIONS[kind] + (" or null" if optional else "")
    raise UsageError(f"{dotted} must be {expected}, got {quote(value, 60)} ({type(value).__name__})")


_DESCRIPTIONS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _convert_list(dotted, value, kind):
    """A list of `kind` from a YAML list, a comma-separated string (`a,b`, as an
    override gives it) or null / an empty string (the empty list); no repeats."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, str):
        value = [item.strip() for item in value.split(",")]
    if not isinstance(value, (list, tuple)):
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}[kind]
        raise UsageError(f"{dotted} must be a list of {plural}, got {quote(value, 60)} "
                         f"({type(value).__name__})")
    items = [_convert(f"{dotted}[{i}]", item, kind) for i, item in enumerate(value)]
    repeated = sorted({str(item) for item in items if items.count(item) > 1})
    if repeated:
        raise UsageError(f"{dotted} names {', '.join(repeated)} more than once")
    return items


def _as_float(value):
    """A float for an int, float or numeric string; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:   # an int past float's range: refused as not finite
            return math.inf
    # YAML 1.1 reads `3e-4` (no dot) as a string, so numeric strings are accepted.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None

