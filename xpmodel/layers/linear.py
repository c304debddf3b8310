"""Affine layer `out = x @ w + b` with the weight stored (in, out) as GPT-2 does."""
from .matmul import add_column_sums, matmul


def linear_forward(x, w, b):
    """x: (N, Cin), w: (Cin, Cout), b: (Cout,) -> (N, Cout)."""
    out = matmul(x, w)
    out += b
    return out


def linear_backward(dout, x, w, dw, db=None):
    """dout: (N, Cout), x: (N, Cin) as given to forward.

    Adds into dw (Cin, Cout) and db (Cout,), which may be wider than the
    activations (float32 master gradients of a float16 pass); returns dx (N, Cin).
    db None: the bias gradient is summed elsewhere (by the layer that added the
    bias, when a layer other than this one did).
    """
    matmul(x, dout, transpose_a=True, out=dw, accumulate=True)
    if db is not None:
        add_column_sums(dout, db)
    return matmul(dout, w, transpose_b=True)
