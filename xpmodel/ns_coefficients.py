"""Muon's Newton-Schulz coefficients: reading them and refusing those that cannot work.

One Newton-Schulz iteration (train/muon.py) applies the odd polynomial
p(x) = a x + b x^3 + c x^5 to every singular value of a matrix whose
singular values start in (0, 1]. The coefficients are named ("jordan",
"cubic") or given as three numbers "a,b,c".

Coefficients that cannot work are refused (check_ns_coefficients): each of
the ns_steps iterations must keep every singular value in (0, NS_BOUND]
(2), for any start in (0, 1]. Since p(x) is about a x near 0 (a > 0), the
j-th iterate maps (0, 1] onto (0, h_j], with h_j the largest value of p on
(0, h_{j-1}] (h_0 = 1), as long as p stays positive there; the check follows
h_j exactly through p's turning points. "jordan" peaks at 1.203, (3, -3.2,
1.2) at 1.211; "3.4445,4.775,2.0315" (b's sign lost) reaches 10.3 in one
step and overflows in five.

Pure arithmetic on the ground floor: the run config checks
train.muon_ns_coefficients with it as it reads the file, and Muon checks its
arguments with it, without either importing the other.
"""
import math

import numpy

from .errors import quote

NS_COEFFICIENTS = {"jordan": (3.4445, -4.775, 2.0315), "cubic": (1.5, -0.5, 0.0)}
NS_BOUND = 2.0  # the largest singular value an iteration may produce (check_ns_coefficients)
MAX_COEFFICIENT = 1e3   # far beyond any that works (those known are below 5)


def parse_ns_coefficients(spec, name="ns_coefficients"):
    """(a, b, c) from a name in NS_COEFFICIENTS, a string "a,b,c" or three numbers;
    ValueError naming the setting `name` and the reason for anything else: not
    three finite numbers, one beyond MAX_COEFFICIENT, or a slope at zero (a)
    that is not positive."""
    if isinstance(spec, str) and spec.strip() in NS_COEFFICIENTS:
        return NS_COEFFICIENTS[spec.strip()]
    parts = spec.split(",") if isinstance(spec, str) else spec
    try:
        values = tuple(float(part) for part in parts)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be {', '.join(NS_COEFFICIENTS)} or three finite numbers "
                         f"a,b,c, got {quote(spec, 60)}")
    if max(abs(v) for v in values) > MAX_COEFFICIENT:
        raise ValueError(f"{name}: each coefficient must be within +-{MAX_COEFFICIENT:g}, "
                         f"got {quote(spec, 60)}")
    if values[0] <= 0:
        raise ValueError(f"{name}: a (the slope at zero) must be positive, got {values[0]:g}")
    return values


def check_ns_coefficients(coefficients, steps):
    """ValueError unless each of `steps` iterations of p(x) = a x + b x^3 + c x^5
    keeps every singular value from (0, 1] within (0, NS_BOUND] (see the
    module's docstring); a must be positive."""
    high = 1.0     # the j-th iterate maps (0, 1] onto (0, high]
    for step in range(1, steps + 1):
        lowest, highest = _turning_values(coefficients, high)
        if lowest <= 0:
            raise ValueError(f"iteration {step} sends a singular value to {lowest:.3g}; each "
                             f"must stay in (0, {NS_BOUND:g}]")
        if highest > NS_BOUND:
            raise ValueError(f"iteration {step} takes a singular value to {highest:.3g}; each "
                             f"must stay in (0, {NS_BOUND:g}]")
        if highest <= high:   # (0, high] maps into itself: later iterations stay there
            return
        high = highest


def _turning_values(coefficients, high):
    """The smallest and largest of p(x) = a x + b x^3 + c x^5 over its turning
    points in (0, high) and at x = high. With a > 0 and the smallest positive,
    p maps (0, high] onto (0, largest]."""
    a, b, c = coefficients
    # p'(x) = a + 3 b x^2 + 5 c x^4, a quadratic in x^2
    squares = numpy.roots([5 * c, 3 * b, a])
    points = [math.sqrt(square.real) for square in squares
              if abs(square.imag) <= 1e-12 * abs(square) and 0 < square.real < high * high]
    values = [a * x + b * x ** 3 + c * x ** 5 for x in points + [high]]
    return min(values), max(values)
