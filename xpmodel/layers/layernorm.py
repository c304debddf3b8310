"""LayerNorm over each row of an (N, C) matrix (eps 1e-5 by default), statistics in at least float32.

CuPy arrays of at most cuda.layernorm.MAX_WIDTH (8192) channels go to one
fused kernel each way (xpmodel.cuda.layernorm), unless the "xp" kernels are
chosen (backend.use_kernels); wider rows run as the xp expressions here."""
from ..backend import array_module, fused_kernels, upcast
from .matmul import add_column_sums, row_means

EPS = 1e-5


def fused_norm_takes(array):
    """Whether the fused norm kernel takes rows of `array` (..., C): a CuPy
    array under the fused kernels, C no wider than the kernel holds."""
    if not fused_kernels(array):
        return False
    from ..cuda.layernorm import MAX_WIDTH
    return array.shape[-1] <= MAX_WIDTH


def layernorm_forward(x, w, b, out_dtype=None, eps=EPS):
    """x: (N, C), w, b: (C,) (b may be None) -> out (N, C) in out_dtype
    (default x's), cache for backward."""
    if fused_norm_takes(x):
        from ..cuda.layernorm import layernorm_forward as fused
        out, xhat, rstd = fused(x, w, b, eps, out_dtype or x.dtype)
        return out, (xhat, rstd)
    xp = array_module(x)
    out_dtype = out_dtype or x.dtype
    x = upcast(x)   # statistics in float32 at least, whatever the input's dtype
    xhat = x - row_means(x)
    rstd = 1.0 / xp.sqrt(row_means(xhat * xhat) + eps)
    xhat *= rstd
    out = xhat * w
    if b is not None:
        out += b
    return out.astype(out_dtype, copy=False), (xhat, rstd)


def layernorm_backward(dout, cache, w, dw, db, dx=None, dx_low=None, dx_sum=None):
    """dout: (N, C), any float dtype. Adds into dw, db (C,) (db None without a
    bias); returns dx (N, C)
    in the statistics' dtype, added into `dx` when given. `dx_low` (N, C),
    when given, receives a copy of the returned dx in its own dtype (the
    residual gradient in float16 for the matmuls that read it next), and
    `dx_sum` (C,) its column sums (the gradient of a bias added to the
    residual stream)."""
    xhat, rstd = cache
    if fused_norm_takes(dout):
        from ..cuda.layernorm import layernorm_backward as fused
        return fused(dout, xhat, rstd, w, dw, db, dx, dx_low, dx_sum)
    xp = array_module(dout)
    dout = upcast(dout)
    dw += xp.sum(dout * xhat, axis=0)
    if db is not None:
        add_column_sums(dout, db)
    dxhat = dout * w
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    mean_dxhat = row_means(dxhat)
    mean_dxhat_xhat = row_means(dxhat * xhat)
    dxhat -= mean_dxhat
    dxhat -= xhat * mean_dxhat_xhat
    dxhat *= rstd
    return deliver_input_gradient(dxhat, dx, dx_low, dx_sum)


def deliver_input_gradient(grad, dx=None, dx_low=None, dx_sum=None):
    """A norm backward's input gradient grad (..., C) handed over as its callers
    ask: returned, or added into `dx` (which is returned); copied into `dx_low`
    and its column sums added into `dx_sum` when those are given."""
    if dx is None:
        dx = grad
    else:
        dx += grad
    if dx_low is not None:
        dx_low[...] = dx
    if dx_sum is not None:
        add_column_sums(dx.reshape(-1, dx.shape[-1]), dx_sum)
    return dx
