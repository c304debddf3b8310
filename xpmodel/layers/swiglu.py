"""SwiGLU, the gated MLP activation of Llama: silu(gate) * up.

The projection before it produces [gate | up] side by side, (N, 2F), so one
matmul makes both; this layer turns them into (N, F). silu(a) = a * s with
s = sigmoid(a), computed in at least float32; s is the cache. With the fused
kernels, CuPy arrays go to one kernel each way (xpmodel.cuda.swiglu), whose
backward recomputes s instead of keeping it.
"""
from ..backend import array_module, fused_kernels, ignore_overflow, upcast
from .matmul import add_column_sums


def swiglu_forward(h, bias=None):
    """h: (N, 2F) -> out (N, F) in h's dtype, cache s (N, F). With a bias (2F,),
    h is replaced by h + bias in place: backward takes that h."""
    if fused_kernels(h):
        from ..cuda.swiglu import swiglu_forward as fused
        return fused(h, bias), None
    if bias is not None:
        h += bias
    xp = array_module(h)
    F = h.shape[-1] // 2
    gate, up = upcast(h[:, :F]), h[:, F:]
    with ignore_overflow(xp):       # exp -> inf for very negative gates gives s = 0: exact
        s = 1.0 / (1.0 + xp.exp(-gate))
    return (gate * s * up).astype(h.dtype, copy=False), s


def swiglu_backward(dout, h, s, dbias=None):
    """dout: (N, F) -> dh (N, 2F) in dout's dtype; with dbias (2F,), dh's column sums are added.

    d out / d gate = up * s (1 + gate (1 - s)),  d out / d up = gate * s.
    """
    if fused_kernels(dout):
        from ..cuda.swiglu import swiglu_backward as fused
        return fused(dout, h, dbias)
    xp = array_module(dout)
    F = dout.shape[-1]
    gate, up, d = upcast(h[:, :F]), upcast(h[:, F:]), upcast(dout)
    silu = gate * s
    dh = xp.empty(h.shape, dtype=dout.dtype)
    dh[:, F:] = d * silu
    dgate = 1.0 - s
    dgate *= gate
    dgate += 1.0
    dgate *= s
    dgate *= up
    dgate *= d
    dh[:, :F] = dgate
    if dbias is not None:
        add_column_sums(dh, dbias)
    return dh
