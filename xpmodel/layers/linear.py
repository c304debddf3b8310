"""Affine layer `out = x @ w + b` with the weight stored (in, out) as GPT-2 does."""
from .matmul import add_column_sums, matmul


def linear_forward(x, w, b):
    """x: (N, Cin), w: (Cin, Cout), b: (Cout,) -> (N, Cout)."""
    out = matmul(x, w)
    out += b
    return out


def linear_backward(dout, x, w, dw, db):
    """dout: (N, Cout), x: (N, Cin) as given to forward.

    Adds into dw (Cin, Cout) and db (Cout,), which may be wider than the
    activations (float32 master gradients of a float16 pass); returns dx (N, Cin).
    """
    matmul(x, dout, transpose_a=True, out=dw, accumulate=True)
    add_column_sums(dout, db)
    return matmul(dout, w, transpose_b=True)
