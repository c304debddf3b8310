"""Squared ReLU, max(x, 0)^2, the MLP activation of the modded-nanogpt
speedrun and Primer. Backward recomputes max(x, 0) from x, so no cache. With
the fused kernels, CuPy arrays go to one kernel each way (xpmodel.cuda.relu2)."""
from ..backend import array_module, fused_kernels, upcast
from .matmul import add_column_sums


def relu2_forward(h, bias=None):
    """h: (N, F) -> out (N, F) in h's dtype, cache None. With a bias (F,), h is
    replaced by h + bias in place: backward takes that h."""
    if fused_kernels(h):
        from ..cuda.relu2 import relu2_forward as fused
        return fused(h, bias), None
    if bias is not None:
        h += bias
    r = array_module(h).maximum(upcast(h), 0)   # squared in >= float32, then rounded
    r *= r
    return r.astype(h.dtype, copy=False), None


def relu2_backward(dout, h, cache=None, dbias=None):
    """dout: (N, F) -> dh = 2 max(h, 0) dout; with dbias (F,), dh's column sums are added."""
    if fused_kernels(dout):
        from ..cuda.relu2 import relu2_backward as fused
        return fused(dout, h, dbias)
    dh = array_module(h).maximum(h, 0)
    dh *= 2
    dh *= dout
    if dbias is not None:
        add_column_sums(dh, dbias)
    return dh
