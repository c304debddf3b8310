"""GELU (tanh approximation) forward and backward as single elementwise kernels.

Backward recomputes sigmoid(2u) from x rather than keeping it, which saves
a float32 activation of 4C channels per layer."""
import math

import numpy

from ..backend import _import_cupy

_K = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715

# x * sigmoid(2u), u = K (x + 0.044715 x^3); exp(-2u) overflowing to inf gives 0: exact
_FORWARD = """
ACC v = (ACC)x;
ACC s = (ACC)1 / ((ACC)1 + exp((ACC)(-2.0 * {k}) * v * ((ACC)1 + (ACC){cubic} * v * v)));
out = (Y)(v * s);
"""
# d/dx [x s] = s + x s (1 - s) 2 du/dx, du/dx = K (1 + 3 * 0.044715 x^2)
_BACKWARD = """
ACC v = (ACC)x;
ACC s = (ACC)1 / ((ACC)1 + exp((ACC)(-2.0 * {k}) * v * ((ACC)1 + (ACC){cubic} * v * v)));
ACC slope = s + v * s * ((ACC)1 - s) * (ACC)(2.0 * {k}) * ((ACC)1 + (ACC)(3.0 * {cubic}) * v * v);
dx = (Y)((ACC)dout * slope);
"""
_kernels = {}


def _kernel(which, acc):
    key = (which, acc)
    if key not in _kernels:
        cupy = _import_cupy()
        body = (_FORWARD if which == "forward" else _BACKWARD).format(k=repr(_K), cubic=repr(_CUBIC))
        body = body.replace("ACC", acc)
        if which == "forward":
            _kernels[key] = cupy.ElementwiseKernel("X x", "Y out", body, f"xpmodel_gelu_forward_{acc}")
        else:
            _kernels[key] = cupy.ElementwiseKernel("D dout, X x", "Y dx", body,
                                                   f"xpmodel_gelu_backward_{acc}")
    return _kernels[key]


def _acc(dtype):
    return "double" if dtype == numpy.float64 else "float"


def gelu_forward(x):
    """x: any shape -> GELU(x) in x's dtype."""
    return _kernel("forward", _acc(x.dtype))(x, _import_cupy().empty_like(x))


def gelu_backward(dout, x):
    """dout, x: the same shape -> dx in dout's dtype."""
    return _kernel("backward", _acc(dout.dtype))(dout, x, _import_cupy().empty_like(dout))
