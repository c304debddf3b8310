"""Errors that the command line reports as one line, without a traceback.

`UsageError` (exit 2) is for what the user asked for: bad configs, flags,
values. `XpmodelError` (exit 1) is for what went wrong while doing it: bad
data, corrupt checkpoints, numeric faults, a full disk.
"""
import os


class XpmodelError(Exception):
    """A runtime failure with a message fit to show the user as is."""
    exit_code = 1


class UsageError(XpmodelError, ValueError):
    """A bad config value, flag or argument."""
    exit_code = 2


class DataError(XpmodelError):
    """A corpus, token file or tokenizer that cannot be used."""


class CheckpointError(XpmodelError):
    """A checkpoint or run directory that cannot be used."""


def one_line(text, limit=300):
    """`text` (or an exception's message) on one line, cut to about `limit`
    characters: a message may carry a whole line of the user's input."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# What str.splitlines breaks a line at: shown escaped in a path, so a message stays one line.
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


def shown_path(path, limit=200):
    """A path for a message: exact (spaces kept) but for line breaks, shown
    escaped; cut to about `limit` characters keeping its start and its end
    (a path's last parts say most)."""
    text = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
    text = "".join(repr(c)[1:-1] if c in _LINE_BREAKS else c for c in text)
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


def quote(text, limit=200):
    """`text` as a quoted string for a message, cut to about `limit` characters:
    a value the user typed or a file held may be any length."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit - 4] + "...'"


def setting_text(value):
    """A setting's value as a config file or a KEY=VALUE override spells it
    (true and false for booleans), for a message."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def counted(count, noun):
    """"1 step", "2 steps": a count and its noun for a message (nouns taking an s)."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"
