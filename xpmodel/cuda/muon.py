"""Muon's two elementwise passes, one kernel each (see xpmodel/train/muon.py).

The step's scalars come from small device arrays, so whether a step is
applied (clipping, a float16 overflow) is decided on the GPU without the
host waiting: s = [gradient scale, apply (0 skips the step)] for the
momentum, s = [decay factor, update coefficient] for the weights (the
caller folds `apply` into both). Every array is a contiguous slice of the
flat buffers.
"""
import numpy

from ..backend import _import_cupy

_MOMENTUM = """
if (s[1] != 0) {
    T grad = g * (T)s[0];
    buf += (T)(1.0 - mu) * (grad - buf);
    upd = nesterov ? grad + (T)mu * (buf - grad) : buf;
} else {
    upd = 0;
}
"""
_APPLY = "p = p * (T)s[0] - (T)s[1] * u;"
_kernels = {}


def _kernel(name, in_params, out_params, body):
    if name not in _kernels:
        _kernels[name] = _import_cupy().ElementwiseKernel(in_params, out_params, body, name)
    return _kernels[name]


def muon_momentum(g, scalars, mu, nesterov, buf, upd):
    """buf <- buf + (1 - mu) (g s0 - buf); upd <- the Nesterov mix or buf; nothing when s1 is 0
    (upd is then zeroed, so a skipped step's non-finite gradients never reach the iteration)."""
    _kernel("xpmodel_muon_momentum", "T g, raw float64 s, float64 mu, int32 nesterov",
            "T buf, T upd", _MOMENTUM)(g, scalars, numpy.float64(mu), numpy.int32(bool(nesterov)),
                                       buf, upd)


def muon_apply(u, scalars, p):
    """p <- p s0 - s1 u, for the flat hidden weights p and their orthogonalised update u."""
    _kernel("xpmodel_muon_apply", "T u, raw float64 s", "T p", _APPLY)(u, scalars, p)
