"""The ranges numbers must fall in, and the checks of numeric arguments that
the run config (config/) and the Python API (GPTConfig, GPT, the
optimizers, schedules and clipping) share.

The API's checks take Python numbers and NumPy scalars alike (np.float32,
np.int64; never a bool), return a Python float or int, so what they store
serialises to YAML and JSON, and raise a one-line ValueError naming the
argument.
"""
import math
import numbers
from dataclasses import dataclass

from .errors import quote


@dataclass(frozen=True)
class Range:
    """An interval a number must fall in; None bounds are open-ended."""
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True

    def contains(self, value):
        if self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive)):
            return False
        if self.high is not None and (value > self.high or (value == self.high and not self.high_inclusive)):
            return False
        return True

    def describe(self):
        if self.high is None:
            return f"{'>=' if self.low_inclusive else '>'} {_bound(self.low)}"
        if self.low is None:
            return f"{'<=' if self.high_inclusive else '<'} {_bound(self.high)}"
        opening = "[" if self.low_inclusive else "("
        closing = "]" if self.high_inclusive else ")"
        return f"in {opening}{_bound(self.low)}, {_bound(self.high)}{closing}"


def _bound(number):
    return f"{number:,}" if isinstance(number, int) else f"{number:g}"


POSITIVE = Range(low=0, low_inclusive=False)
NON_NEGATIVE = Range(low=0)
OPEN_UNIT = Range(0, 1, low_inclusive=False, high_inclusive=False)    # (0, 1)
HALF_OPEN_UNIT = Range(0, 1, high_inclusive=False)                    # [0, 1)
POSITIVE_FRACTION = Range(0, 1, low_inclusive=False)                  # (0, 1]
# model.rope_theta: pair j turns at theta^(-2j/D) a position, so at 1 or less no
# pair turns slower than the first; long-context models use bases up to about
# 1e8, so one past 1e12 is taken for a mistake
ROPE_THETAS = Range(1, 1e12, low_inclusive=False)                    # (1, 1e12]


def check_number(name, value, within):
    """`value` as a Python float: a finite real number `within` the range;
    ValueError naming `name` otherwise (an integer too large for a float too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not _finite_float(value) or not within.contains(value):
        raise ValueError(f"{name} must be a finite number {within.describe()}, got {quote(value, 100)}")
    return float(value)


def check_integer(name, value, within=NON_NEGATIVE):
    """`value` as a Python int: an integer `within` the range; ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not within.contains(value):
        raise ValueError(f"{name} must be an integer {within.describe()}, got {quote(value, 100)}")
    return int(value)


def _finite_float(value):
    try:
        return math.isfinite(value)
    except OverflowError:       # an int past float's range
        return False


class CheckedNumber:
    """A class attribute whose instances' value is check_number'ed `within`
    whenever it is set, in the constructor or later (an optimizer's lr, which
    schedules set every step)."""

    def __init__(self, within):
        self.within = within

    def __set_name__(self, owner, name):
        self.name, self.slot = name, "_" + name

    def __get__(self, instance, owner=None):
        return self if instance is None else getattr(instance, self.slot)

    def __set__(self, instance, value):
        setattr(instance, self.slot, check_number(self.name, value, self.within))
