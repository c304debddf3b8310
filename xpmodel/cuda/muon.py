"""Muon's two elementwise passes, one kernel each (see xpmodel/train/muon.py).

The step's scalars come from small device arrays, so whether a step is
applied (clipping, a float16 overflow, an orthogonalised update that is not
finite) is decided on the GPU without the host waiting. The first pass
reads the momentum M and leaves it as it is: it writes U, from the momentum
the step would give, for the iteration. The second pass, once the caller
knows whether the orthogonalised update is finite, writes that momentum
and the weights, or nothing, so a skipped step leaves M and W as they were.
Both passes compute the new momentum with the same expression, so the M
the second writes is the one U was made from. Every array is a contiguous
slice of the flat buffers.
"""
import numpy

from ..backend import import_cupy

# M + (1 - mu) (G s0 - M), the momentum after this step's gradient G
_NEXT_MOMENTUM = "buf + (T)(1.0 - mu) * (g * (T)s[0] - buf)"
_MOMENTUM = f"""
if (s[1] != 0) {{
    T grad = g * (T)s[0];
    T next_buf = {_NEXT_MOMENTUM};
    upd = nesterov ? grad + (T)mu * (next_buf - grad) : next_buf;
}} else {{
    upd = 0;
}}
"""
_APPLY = f"""
if (s[1] != 0) {{
    buf = {_NEXT_MOMENTUM};
    p = p * (T)s[2] - (T)s[3] * u;
}}
"""
_kernels = {}


def _kernel(name, in_params, out_params, body):
    if name not in _kernels:
        _kernels[name] = import_cupy().ElementwiseKernel(in_params, out_params, body, name)
    return _kernels[name]


def muon_momentum(g, buf, scalars, mu, nesterov, upd):
    """upd <- the Nesterov mix of g s0 and the momentum buf + (1 - mu) (g s0 - buf), or that
    momentum, for scalars s = [gradient scale, apply]; buf is only read. upd is zeroed where
    s1 is 0, so a skipped step's non-finite gradients never reach the iteration."""
    _kernel("xpmodel_muon_momentum", "T g, T buf, raw float64 s, float64 mu, int32 nesterov",
            "T upd", _MOMENTUM)(g, buf, scalars, numpy.float64(mu), numpy.int32(bool(nesterov)), upd)


def muon_apply(g, u, scalars, mu, buf, p):
    """buf <- buf + (1 - mu) (g s0 - buf) and p <- p s2 - s3 u, for the flat hidden gradients g,
    their orthogonalised update u, the momentum buf and the weights p; scalars s = [gradient
    scale, keep (0 leaves buf and p as they are, whatever u holds), decay factor, update
    coefficient]."""
    _kernel("xpmodel_muon_apply", "T g, T u, raw float64 s, float64 mu", "T buf, T p",
            _APPLY)(g, u, scalars, numpy.float64(mu), buf, p)
