"""SwiGLU, the gated MLP activation of Llama: silu(gate) * up.

The projection before it produces [gate | up] side by side, (N, 2F), so one
matmul makes both; this layer turns them into (N, F). silu(a) = a * s with
s = sigmoid(a), computed in at least float32; s is the cache. With the fused
kernels, CuPy arrays go to one kernel each way (xpmodel.cuda.swiglu), whose
backward recomputes s instead of keeping it.
"""
import numpy

from ..backend import array_module, fused_kernels, ignore_overflow, is_cuda_array, upcast
from ..cpu_threads import cache_chunks


def swiglu_forward(h, bias=None):
    """h: (N, 2F) -> out (N, F) in h's dtype, cache s (N, F). With a bias (2F,),
    h is replaced by h + bias in place: backward takes that h."""
    if fused_kernels(h):
        from ..cuda.swiglu import swiglu_forward as fused
        return fused(h, bias), None
    xp = array_module(h)
    N, F = h.shape[0], h.shape[-1] // 2
    out = xp.empty((N, F), dtype=h.dtype)
    s = xp.empty((N, F), dtype=numpy.promote_types(h.dtype, numpy.float32))
    for rows in cache_chunks(N, 2 * F, is_cuda_array(h)):
        if bias is not None:
            h[rows] += bias
        gate, s_rows = upcast(h[rows, :F]), s[rows]
        xp.negative(gate, out=s_rows)
        with ignore_overflow(xp):   # exp -> inf for very negative gates gives s = 0: exact
            xp.exp(s_rows, out=s_rows)
            s_rows += 1.0
            xp.reciprocal(s_rows, out=s_rows)
        out[rows] = gate * s_rows * h[rows, F:]
    return out, s


def swiglu_backward(dout, h, s, dbias=None):
    """dout: (N, F) -> dh (N, 2F) in dout's dtype; with dbias (2F,), dh's column sums are added.

    d out / d gate = up * s (1 + gate (1 - s)),  d out / d up = gate * s.
    """
    if fused_kernels(dout):
        from ..cuda.swiglu import swiglu_backward as fused
        return fused(dout, h, dbias)
    xp = array_module(dout)
    N, F = dout.shape
    dh = xp.empty((N, 2 * F), dtype=dout.dtype)
    for rows in cache_chunks(N, 2 * F, is_cuda_array(dout)):
        gate, up, d, s_rows = upcast(h[rows, :F]), upcast(h[rows, F:]), upcast(dout[rows]), s[rows]
        dh[rows, F:] = d * (gate * s_rows)
        dgate = 1.0 - s_rows
        dgate *= gate
        dgate += 1.0
        dgate *= s_rows
        dgate *= up
        dgate *= d
        dh[rows, :F] = dgate
        if dbias is not None:
            dbias += dh[rows].sum(axis=0, dtype=dbias.dtype)
    return dh
