"""AdamW over the whole flat parameter buffer in one elementwise kernel.

The step's scalars come from a small device array, so they can be decided
on the GPU (the clipping coefficient, whether a float16 step overflowed):
s = [gradient scale, apply (0 skips the step), decay factor, lr / bias1,
1 / sqrt(bias2)]. Weight decay applies to the first n_decay elements (the
matrices, see model/params.py). The arithmetic is the NumPy update's, in the
buffer's dtype.
"""
import numpy

from ..backend import import_cupy

_BODY = """
if (s[1] != 0) {
    T grad = g * (T)s[0];
    m = (T)beta1 * m + (T)(1.0 - beta1) * grad;
    v = (T)beta2 * v + (T)(1.0 - beta2) * grad * grad;
    if (i < n_decay) p *= (T)s[2];
    p -= (T)s[3] * m / (sqrt(v) * (T)s[4] + (T)eps);
}
"""
_kernel = None


def adamw_step(p, g, m, v, scalars, beta1, beta2, eps, n_decay):
    """One AdamW step on flat p, g, m, v, in place; scalars as described above."""
    global _kernel
    if _kernel is None:
        _kernel = import_cupy().ElementwiseKernel(
            "T g, raw float64 s, float64 beta1, float64 beta2, float64 eps, int64 n_decay",
            "T p, T m, T v", _BODY, "xpmodel_adamw")
    _kernel(g, scalars, numpy.float64(beta1), numpy.float64(beta2), numpy.float64(eps),
            numpy.int64(n_decay), p, m, v)
