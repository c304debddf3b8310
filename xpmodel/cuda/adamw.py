"""AdamW over the whole flat parameter buffer in one elementwise kernel.

Weight decay applies to the first n_decay elements (the matrices, see
params.py). The arithmetic is the NumPy update's, in the buffer's dtype.
"""
import numpy

from ..backend import _import_cupy

_BODY = """
m = (T)beta1 * m + (T)(1.0 - beta1) * g;
v = (T)beta2 * v + (T)(1.0 - beta2) * g * g;
if (i < n_decay) p *= (T)decay;
p -= (T)step_size * m / (sqrt(v) * (T)inv_sqrt_bias2 + (T)eps);
"""
_kernel = None


def adamw_step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, n_decay):
    """One AdamW step (step counts from 1) on flat p, g, m, v, in place."""
    global _kernel
    if _kernel is None:
        _kernel = _import_cupy().ElementwiseKernel(
            "T g, float64 beta1, float64 beta2, float64 eps, float64 decay, float64 step_size, "
            "float64 inv_sqrt_bias2, int64 n_decay", "T p, T m, T v", _BODY, "xpmodel_adamw")
    bias1 = 1.0 - beta1 ** step
    bias2 = 1.0 - beta2 ** step
    _kernel(g, numpy.float64(beta1), numpy.float64(beta2), numpy.float64(eps),
            numpy.float64(1.0 - lr * weight_decay), numpy.float64(lr / bias1),
            numpy.float64(1.0 / bias2 ** 0.5), numpy.int64(n_decay), p, m, v)
