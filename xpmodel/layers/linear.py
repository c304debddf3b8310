"""Affine layer `out = x @ w + b` with the weight stored (in, out) as GPT-2 does."""
from ..backend import array_module


def linear_forward(x, w, b):
    """x: (N, Cin), w: (Cin, Cout), b: (Cout,) -> (N, Cout)."""
    xp = array_module(x)
    out = xp.matmul(x, w)
    out += b
    return out


def linear_backward(dout, x, w, dw, db):
    """dout: (N, Cout), x: (N, Cin) as given to forward.

    Adds into dw (Cin, Cout) and db (Cout,), which may be wider than the
    activations (float32 master gradients of a float16 pass); returns dx (N, Cin).
    """
    xp = array_module(dout)
    dw += xp.matmul(x.T, dout)
    db += dout.sum(axis=0, dtype=db.dtype)
    return xp.matmul(dout, w.T)
