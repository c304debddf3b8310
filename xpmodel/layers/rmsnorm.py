"""RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * w, statistics in
at least float32. No mean is subtracted and there is no bias; that is the
whole difference from LayerNorm, here and in the shared CUDA kernel
(xpmodel.cuda.layernorm), which CuPy arrays go to with the "fused" kernels
(backend.use_kernels) as rows of C, C up to its MAX_WIDTH. QK-norm uses it on (B, H, T, D) heads,
where it normalises each head's D values."""
from ..backend import array_module, upcast
from .layernorm import EPS, deliver_input_gradient, fused_norm_takes
from .matmul import row_means


def rmsnorm_forward(x, w, b=None, out_dtype=None, eps=EPS):
    """x: (..., C), w: (C,) -> out (x's shape) in out_dtype (default x's), cache.
    b must be None: it keeps the signature LayerNorm's, so the two are interchangeable."""
    if b is not None:
        raise ValueError("RMSNorm has no bias")
    if fused_norm_takes(x):
        from ..cuda.layernorm import layernorm_forward as fused
        C = x.shape[-1]
        out, xhat, rstd = fused(x.reshape(-1, C), w, None, eps, out_dtype or x.dtype, center=False)
        return out.reshape(x.shape), (xhat, rstd)
    xp = array_module(x)
    xhat = upcast(x)
    if xhat is x:    # upcast made no copy; xhat is scaled in place below
        xhat = xhat.copy()
    rstd = 1.0 / xp.sqrt(row_means(xhat * xhat) + eps)
    xhat *= rstd
    out = xhat * w
    return out.astype(out_dtype or x.dtype, copy=False), (xhat, rstd)


def rmsnorm_backward(dout, cache, w, dw, db=None, dx=None, dx_low=None, dx_sum=None):
    """dout: (..., C). Adds into dw (C,); returns dx in the statistics' dtype,
    added into `dx` when given; dx_low and dx_sum as in layernorm_backward.
    db must be None (no bias).

    dx = rstd * (dxhat - xhat * mean(dxhat * xhat)), with dxhat = dout * w.
    """
    xhat, rstd = cache
    if db is not None:
        raise ValueError("RMSNorm has no bias")
    if fused_norm_takes(dout):   # xhat and rstd are the kernel's rows of C
        from ..cuda.layernorm import layernorm_backward as fused
        C = dout.shape[-1]
        rows = None if dx is None else dx.reshape(-1, C)
        low = None if dx_low is None else dx_low.reshape(-1, C)
        out = fused(dout.reshape(-1, C), xhat, rstd, w, dw, None, rows, low, dx_sum, center=False)
        return dx if dx is not None else out.reshape(dout.shape)
    xp = array_module(dout)
    dout = upcast(dout)
    C = dout.shape[-1]
    dw += xp.sum((dout * xhat).reshape(-1, C), axis=0)
    dxhat = dout * w
    dxhat -= xhat * row_means(dxhat * xhat)
    dxhat *= rstd
    return deliver_input_gradient(dxhat, dx, dx_low, dx_sum)
