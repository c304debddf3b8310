"""Residual connection: the stream plus a branch.

The branch arrives without the bias of the projection that made it, so the
bias (and dropout, when on) are applied on the way into the stream: on
CuPy that is one kernel (xpmodel.cuda.residual) instead of three. Backward
needs no function: the stream's gradient reaches the branch unchanged."""
from ..backend import is_cuda_array


def residual_forward(stream, branch, bias=None, scaled_mask=None):
    """stream (N, C) += (branch (N, C) + bias (C,)) * scaled_mask (N, C), in place;
    returns stream. `branch` may be overwritten."""
    if is_cuda_array(stream):
        from ..cuda.residual import residual_add
        return residual_add(stream, branch, bias, scaled_mask)
    if bias is not None:
        branch += bias
    if scaled_mask is not None:
        branch *= scaled_mask
    stream += branch
    return stream

