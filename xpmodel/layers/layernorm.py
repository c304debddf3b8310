"""LayerNorm over the last axis (eps 1e-5), statistics in at least float32."""
from ..backend import array_module

EPS = 1e-5


def layernorm_forward(x, w, b):
    """x: (N, C), w, b: (C,) -> out (N, C), cache (xhat (N, C), rstd (N, 1))."""
    xp = array_module(x)
    mean = x.mean(axis=1, keepdims=True)
    xhat = x - mean
    var = xp.mean(xhat * xhat, axis=1, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + EPS)
    xhat *= rstd
    out = xhat * w
    out += b
    return out, (xhat, rstd)


def layernorm_backward(dout, cache, w, dw, db):
    """dout: (N, C). Adds into dw, db (C,); returns dx (N, C)."""
    xp = array_module(dout)
    xhat, rstd = cache
    dw += xp.sum(dout * xhat, axis=0)
    db += dout.sum(axis=0)
    dxhat = dout * w
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    mean_dxhat = dxhat.mean(axis=1, keepdims=True)
    mean_dxhat_xhat = xp.mean(dxhat * xhat, axis=1, keepdims=True)
    dxhat -= mean_dxhat
    dxhat -= xhat * mean_dxhat_xhat
    dxhat *= rstd
    return dxhat
