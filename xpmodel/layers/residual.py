"""Residual connection: the stream plus a branch, its gradient fanning out."""


def residual_forward(stream, branch):
    """stream, branch: (N, C) -> stream + branch, written into `stream`."""
    stream += branch
    return stream


def residual_backward(dout):
    """The gradient reaches both the stream and the branch unchanged."""
    return dout, dout
