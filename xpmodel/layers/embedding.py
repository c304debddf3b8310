"""Token embedding plus learned position embedding."""
from ..backend import scatter_add_rows


def embedding_forward(idx, wte, wpe):
    """idx: (B, T) ints, wte: (V, C), wpe: (block_size, C) -> (B, T, C)."""
    T = idx.shape[1]
    out = wte[idx]
    out += wpe[:T]
    return out


def embedding_backward(dout, idx, dwte, dwpe):
    """dout: (B, T, C). Adds into dwte (V, C) and dwpe (block_size, C)."""
    B, T, C = dout.shape
    dwpe[:T] += dout.sum(axis=0)
    scatter_add_rows(dwte, idx.reshape(B * T), dout.reshape(B * T, C))
