"""Token embedding plus, with learned positions, a position embedding."""
from ..backend import scatter_add_rows


def embedding_forward(idx, wte, wpe=None):
    """idx: (B, T) ints, wte: (V, C), wpe: (>= T, C) or None -> (B, T, C)."""
    T = idx.shape[1]
    out = wte[idx]
    if wpe is not None:
        out += wpe[:T]
    return out


def embedding_backward(dout, idx, dwte, dwpe=None):
    """dout: (B, T, C). Adds into dwte (V, C) and dwpe (block_size, C) when given."""
    B, T, C = dout.shape
    if dwpe is not None:
        dwpe[:T] += dout.sum(axis=0)
    scatter_add_rows(dwte, idx.reshape(B * T), dout.reshape(B * T, C))
