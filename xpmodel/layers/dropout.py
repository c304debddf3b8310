"""Inverted dropout: kept units are scaled by 1/(1-p) during training."""


def dropout_forward(x, p, rng):
    """x: any shape; rng: a seeded generator on x's device.

    Returns out and the scaled keep mask (x's shape) that backward needs,
    or (x, None) when p == 0.
    """
    if p == 0.0:
        return x, None
    draw_dtype = "float64" if x.dtype.itemsize == 8 else "float32"   # no float16 draws
    mask = rng.random(x.shape, dtype=draw_dtype) >= p
    scaled_mask = mask.astype(x.dtype)
    scaled_mask *= 1.0 / (1.0 - p)
    return x * scaled_mask, scaled_mask


def dropout_backward(dout, scaled_mask):
    """dout: forward's output shape; returns dx."""
    if scaled_mask is None:
        return dout
    return dout * scaled_mask
