"""Residual connection: the stream plus a branch.

The branch arrives without the bias of the projection that made it, so the
bias (and dropout, when on) are applied on the way into the stream: on
CuPy with the "fused" kernels that is one kernel (xpmodel.cuda.residual)
instead of three. Backward
needs no function: the stream's gradient reaches the branch unchanged."""
from ..backend import fused_kernels
from .dropout import apply_mask


def residual_forward(stream, branch, bias=None, mask=None):
    """stream (N, C) += (branch (N, C) + bias (C,)) with dropout's KeepMask
    `mask` (N, C) applied, in place; returns stream. `branch` may be overwritten."""
    if fused_kernels(stream):
        from ..cuda.residual import residual_add
        return residual_add(stream, branch, bias, mask)
    if bias is not None:
        branch += bias
    stream += apply_mask(branch, mask)
    return stream

