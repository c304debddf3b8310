"""GELU, tanh approximation, as GPT-2 uses it.

0.5 x (1 + tanh(u)) equals x * sigmoid(2u), with u = sqrt(2/pi) (x + 0.044715 x^3);
the sigmoid form needs one exp instead of a tanh, which is several times
cheaper on NumPy, and its value `s` is all that backward needs besides x.
With the "fused" kernels (backend.use_kernels), CuPy arrays go to one
kernel each way (xpmodel.cuda.gelu), which
recompute s in backward instead of keeping it; the forward kernel also adds
the bias of the projection before it, and backward sums that bias's gradient.
"""
import math

import numpy

from ..backend import array_module, fused_kernels, ignore_overflow, is_cuda_array, upcast
from ..cpu_threads import cache_chunks

_K = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


def gelu_forward(x, bias=None):
    """x: (..., C) -> out = GELU(x + bias) (x's dtype and shape), cache s =
    sigmoid(2u) in >= float32 (None from the fused kernel). With a bias (C,), x is
    replaced by x + bias in place: backward takes that x."""
    if fused_kernels(x):
        from ..cuda.gelu import gelu_forward as fused
        return fused(x, bias), None
    xp = array_module(x)
    rows_x = x.reshape(-1, x.shape[-1])
    out = xp.empty_like(rows_x)
    s = xp.empty(rows_x.shape, dtype=numpy.promote_types(x.dtype, numpy.float32))
    for rows in cache_chunks(rows_x.shape[0], rows_x.shape[1], is_cuda_array(x)):
        if bias is not None:
            rows_x[rows] += bias
        xr, sr = upcast(rows_x[rows]), s[rows]
        xp.multiply(xr, xr, out=sr)
        sr *= -2.0 * _K * _CUBIC
        sr -= 2.0 * _K
        sr *= xr                     # -2u
        with ignore_overflow(xp):    # exp -> inf for very negative x gives sigmoid 0: exact
            xp.exp(sr, out=sr)
            sr += 1.0
            xp.reciprocal(sr, out=sr)  # sigmoid(2u)
        out[rows] = xr * sr
    return out.reshape(x.shape), s.reshape(x.shape)


def gelu_backward(dout, x, s, dbias=None):
    """dout, x, s: x's shape (..., C); returns dx, in dout's dtype. With dbias
    (C,), the gradient of the bias forward added, the column sums of dx are
    added into it.

    d/dx [x s] = s + x s (1 - s) 2 du/dx, with du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    """
    if fused_kernels(dout):
        from ..cuda.gelu import gelu_backward as fused
        return fused(dout, x, dbias)
    xp, C = array_module(dout), dout.shape[-1]
    dout_rows, x_rows, s_rows = dout.reshape(-1, C), x.reshape(-1, C), s.reshape(-1, C)
    dx = xp.empty_like(dout_rows)
    for rows in cache_chunks(dx.shape[0], C, is_cuda_array(dout)):
        xr, sr = upcast(x_rows[rows]), s_rows[rows]
        d = xr * xr
        d *= 6.0 * _K * _CUBIC
        d += 2.0 * _K
        d *= xr
        d *= sr
        d *= 1.0 - sr
        d += sr
        d *= dout_rows[rows]
        dx[rows] = d
        if dbias is not None:
            dbias += dx[rows].sum(axis=0, dtype=dbias.dtype)
    return dx.reshape(dout.shape)
