"""GELU, tanh approximation, as GPT-2 uses it."""
import math

from ..backend import array_module

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


def gelu_forward(x):
    """x: any shape -> 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    xp = array_module(x)
    inner = x * x
    inner *= _CUBIC * _SQRT_2_OVER_PI
    inner += _SQRT_2_OVER_PI
    inner *= x
    out = xp.tanh(inner, out=inner)
    out += 1.0
    out *= x
    out *= 0.5
    return out


def gelu_backward(dout, x):
    """dout, x: same shape as forward's input; returns dx."""
    xp = array_module(dout)
    x2 = x * x
    inner = x2 * (_CUBIC * _SQRT_2_OVER_PI)
    inner += _SQRT_2_OVER_PI
    inner *= x
    tanh = xp.tanh(inner, out=inner)
    # d/dx = 0.5 (1 + tanh) + 0.5 x (1 - tanh^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    dinner = x2
    dinner *= 3.0 * _CUBIC * _SQRT_2_OVER_PI
    dinner += _SQRT_2_OVER_PI
    dinner *= x
    dinner *= 0.5
    sech2 = tanh * tanh
    sech2 *= -1.0
    sech2 += 1.0
    dinner *= sech2
    tanh += 1.0
    tanh *= 0.5
    dinner += tanh
    dinner *= dout
    return dinner
