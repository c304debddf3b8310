"""What the tools share for their command lines: a parser whose errors are one
line, a help formatter that keeps the docstring's lines and shows defaults,
and argument types that refuse a bad value ("argument --seq: '0' must be at
least 1")."""
import argparse
import math
from pathlib import Path


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but an error is one line on stderr, `PROG: error:
    MESSAGE`, with no usage block before it; the exit status stays 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class DocstringFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (example commands keep their lines), and
    each flag's default after its help, unless the help already says it or
    there is none to say (None, an unset switch, an empty list)."""

    def _get_help_string(self, action):
        nothing = action.default is None or action.default is False or action.default == []
        if nothing or not action.help or "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def int_at_least(minimum):
    """An argument type: a whole number of `minimum` or more."""
    def whole_number(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum}")
        return value
    return whole_number


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def _finite_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text):
    """A finite number above 0."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def non_negative_float(text):
    """A finite number of 0 or more."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def fraction(text):
    """A share: above 0 and at most 1."""
    value = _finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0 and at most 1")
    return value


def text_file(text):
    """A path to a file that exists and is not empty, as a Path."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: not a file")
    if path.stat().st_size == 0:
        raise argparse.ArgumentTypeError(f"{text}: the file is empty")
    return path
