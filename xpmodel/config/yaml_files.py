"""Finding a config's YAML file and reading it, bounded and strict.

A config is named (a shipped config, in the package's `configs` data) or a
path. Its file must be a regular file of at most MAX_CONFIG_BYTES of UTF-8;
its YAML is checked against the bounds below from its parse events before
anything is built, and then loaded by a safe loader that refuses a key
repeated within one mapping and reads no number in base 60 (`1:2`), which
overrides use too. Each failure is a one-line UsageError naming the
file (and the line, for invalid YAML).
"""
import importlib.resources
import os
import re
import typing
from pathlib import Path

import yaml

from ..errors import UsageError, one_line, quote
from ..files import read_bounded
from .sections import SECTIONS, TOP_LEVEL_KEYS

_YAML_SUFFIXES = (".yaml", ".yml")
# Bounds on a YAML document, checked from its parse events before anything is
# built: a config is a few kB, two levels deep, with short values. Aliases
# count at their expanded size, so an alias bomb is refused, not expanded.
MAX_CONFIG_BYTES = 1 << 20
_MAX_YAML_DEPTH = 16
_MAX_YAML_NODES = 10_000


def shipped_dir():
    """The directory of shipped configs: the installed package, else the source tree."""
    try:
        return importlib.resources.files("xpmodel.configs")
    except (ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parent.parent.parent / "configs"


def shipped_configs():
    """Names of the configs that ship with xpmodel, sorted."""
    names = []
    for entry in shipped_dir().iterdir():
        stem, dot, suffix = entry.name.rpartition(".")
        if entry.is_file() and dot and "." + suffix in _YAML_SUFFIXES:
            names.append(stem)
    return sorted(names)


def _looks_like_path(text):
    return "/" in text or os.sep in text or text.endswith(_YAML_SUFFIXES)


def locate(name_or_path, relative_to=None):
    """Return (label, text) for a shipped config name or a YAML file path."""
    if "\0" in str(name_or_path):
        raise UsageError(f"config {quote(str(name_or_path), 200)}: no file name holds a NUL character (\\0)")
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(str(name_or_path)):
        path = Path(name_or_path)
        if relative_to is not None and not path.is_absolute():
            path = relative_to / path
        return str(path), _read_text(path, str(path))
    name = str(name_or_path)
    if name in shipped_configs():
        entry = shipped_dir().joinpath(name + ".yaml")
        return str(entry), _read_text(entry, str(entry))
    path = Path(name) if relative_to is None else relative_to / name
    if path.is_file():
        return str(path), _read_text(path, str(path))
    if path.is_dir():
        raise UsageError(f"config {quote(name, 200)}: {path} is a directory, not a config file "
                         f"(a YAML file or a shipped config's name)")
    with_suffix = path.with_name(path.name + ".yaml")
    hint = f"; {with_suffix} exists: name it as {name}.yaml" if with_suffix.is_file() else ""
    raise UsageError(
        f"unknown config {quote(name, 200)}: not a shipped config, and no file {path}{hint}; "
        f"shipped configs: {', '.join(shipped_configs())}")


def _read_text(path, label):
    """The text of a config file: a regular file (not a FIFO or /dev/zero) of at most 1 MiB."""
    if not isinstance(path, Path):   # a shipped config inside an installed package
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"{label}: cannot read config file ({exc.strerror})") from None
    else:
        try:
            data = read_bounded(path, MAX_CONFIG_BYTES, UsageError, "config file")
        except UsageError as exc:
            raise UsageError(str(exc).replace(str(path), label, 1)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


# YAML 1.1's plain int and float forms as PyYAML's resolver writes them, less
# base 60 and base 8: `1:2` is 62 there, `1:30.5` 90.5 (a clock time taken for a
# number) and `010` 8 (a decimal with a leading zero). Without them such text
# stays a string, which a number's key refuses.
_PLAIN_NUMBERS = {
    "tag:yaml.org,2002:int": re.compile(r"""^(?:[-+]?0b[0-1_]+
                    |[-+]?(?:0|[1-9][0-9_]*)
                    |[-+]?0x[0-9a-fA-F_]+)$""", re.X),
    "tag:yaml.org,2002:float": re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
                    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
}


class StrictLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects a key repeated within one mapping and
    reads no number in base 60 or 8 (otherwise YAML 1.1 as PyYAML reads it)."""

    yaml_implicit_resolvers = {
        first: [(tag, _PLAIN_NUMBERS.get(tag, regexp)) for tag, regexp in resolvers]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue    # the base loader reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def check_yaml_bounds(text, label):
    """Refuse YAML nested deeper than _MAX_YAML_DEPTH, with more than
    _MAX_YAML_NODES nodes once aliases are expanded, or with an alias inside
    the node it names. Parse events come from a loop, not recursion, and are
    counted without building anything, so this is quick for any input."""
    if len(text) > MAX_CONFIG_BYTES:
        raise UsageError(f"{label}: {len(text):,} characters of YAML, more than the "
                         f"{MAX_CONFIG_BYTES:,} a config may be")
    open_nodes = []     # [expanded size, anchor] of each collection being read
    sizes = {}          # anchor -> expanded size of the node it names
    total = 0
    for event in yaml.parse(text, Loader=StrictLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            open_nodes.append([1, event.anchor])
            if len(open_nodes) > _MAX_YAML_DEPTH:
                raise UsageError(f"{label}: YAML nested more than {_MAX_YAML_DEPTH} levels deep")
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            size, anchor = open_nodes.pop()
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in sizes:
                raise UsageError(f"{label}: YAML alias *{quote(event.anchor, 40)} refers to a node "
                                 f"that is not complete where it is used")
            size, anchor = sizes[event.anchor], None
        elif isinstance(event, yaml.ScalarEvent):
            size, anchor = 1, event.anchor
        else:
            continue
        if anchor is not None:
            sizes[anchor] = size
        if open_nodes:
            open_nodes[-1][0] += size
        total += size
        if total > _MAX_YAML_NODES or (open_nodes and open_nodes[0][0] > _MAX_YAML_NODES):
            raise UsageError(f"{label}: YAML with more than {_MAX_YAML_NODES:,} values (aliases "
                             f"expanded); a config is a few sections of settings")


def _yaml_error(exc, label):
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return UsageError(f"{label}: {where}invalid YAML: {' '.join(problem.split())[:200]}")


def parse_yaml(text, label):
    try:
        check_yaml_bounds(text, label)
        document = yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, label) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        if isinstance(exc, UsageError):
            raise
        # e.g. a date that does not exist (2024-13-45)
        raise UsageError(f"{label}: invalid YAML value: {one_line(exc, 200)}") from None
    if isinstance(document, dict) and all(key in SECTIONS and values in (None, {})
                                          for key, values in document.items()):
        document = None     # only empty sections, as `{}` or a lone `model:` (not a misspelt one)
    if document is None:    # empty, or only comments: surely not what was meant
        raise UsageError(f"{label}: the config file is empty (no settings); write the keys to "
                         f"change in it, or name a shipped config such as default")
    if not isinstance(document, dict):
        raise UsageError(
            f"{label}: the top level must be a mapping of sections "
            f"({', '.join(TOP_LEVEL_KEYS)}), got {type(document).__name__}")
    return document
