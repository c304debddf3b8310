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

from ..backend import array_module, fused_kernels, ignore_overflow, upcast
from .matmul import add_column_sums

_K = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


def gelu_forward(x, bias=None):
    """x: (..., C) -> out = GELU(x + bias) (x's dtype and shape), cache s =
    sigmoid(2u) in >= float32 (None from the fused kernel). With a bias (C,), x is
    replaced by x + bias in place: backward takes that x."""
    if fused_kernels(x):
        from ..cuda.gelu import gelu_forward as fused
        return fused(x, bias), None
    if bias is not None:
        x += bias
    xp = array_module(x)
    low, x = x.dtype, upcast(x)
    s = x * x
    s *= -2.0 * _K * _CUBIC
    s -= 2.0 * _K
    s *= x                       # -2u
    with ignore_overflow(xp):    # exp -> inf for very negative x gives sigmoid 0: exact
        xp.exp(s, out=s)
        s += 1.0
        xp.reciprocal(s, out=s)  # sigmoid(2u)
    return (x * s).astype(low, copy=False), s


def gelu_backward(dout, x, s, dbias=None):
    """dout, x, s: x's shape (..., C); returns dx, in dout's dtype. With dbias
    (C,), the gradient of the bias forward added, the column sums of dx are
    added into it.

    d/dx [x s] = s + x s (1 - s) 2 du/dx, with du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    """
    if fused_kernels(dout):
        from ..cuda.gelu import gelu_backward as fused
        return fused(dout, x, dbias)
    low, x = dout.dtype, upcast(x)
    dx = x * x
    dx *= 6.0 * _K * _CUBIC
    dx += 2.0 * _K
    dx *= x
    dx *= s
    one_minus_s = 1.0 - s
    dx *= one_minus_s
    dx += s
    dx *= dout
    dx = dx.astype(low, copy=False)
    if dbias is not None:
        add_column_sums(dx.reshape(-1, dx.shape[-1]), dbias)
    return dx
