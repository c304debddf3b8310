"""Inverted dropout: kept units are scaled by 1/(1-p) during training.

A training pass draws its masks from one seeded generator (pass_generator):
NumPy's or CuPy's, or on a GPU with the fused kernels a counter-based one
(cuda/random.py) whose masks are drawn by a kernel, or inside the flash
attention kernels themselves."""
from ..backend import fused_mode, random_generator


def pass_generator(device, seed):
    """The seeded generator of a training pass's dropout masks and embedding
    noise on `device`: cuda.random.CounterGenerator on a GPU with the fused
    kernels, else backend.random_generator's. seed: an int or a sequence of ints."""
    if device.is_cuda and fused_mode():
        from ..cuda.random import CounterGenerator
        return CounterGenerator(seed)
    return random_generator(device, seed)


def draw_dtype(like):
    """The dtype random numbers are drawn in for an array like `like`: float64
    for float64, else float32 (generators draw no 16-bit floats)."""
    return "float64" if like.dtype.itemsize == 8 else "float32"


def dropout_mask(like, p, rng):
    """The scaled keep mask (like's shape and dtype) for dropout rate p, or None
    when p == 0. rng: a seeded generator on like's device."""
    if p == 0.0:
        return None
    if hasattr(rng, "keep_mask"):   # a counter-based generator draws the scaled mask in one kernel
        return rng.keep_mask(like.shape, like.dtype, p)
    mask = rng.random(like.shape, dtype=draw_dtype(like)) >= p
    scaled_mask = mask.astype(like.dtype)
    scaled_mask *= 1.0 / (1.0 - p)
    return scaled_mask


def dropout_forward(x, p, rng):
    """x: any shape. Returns out and the scaled keep mask that backward needs,
    or (x, None) when p == 0."""
    scaled_mask = dropout_mask(x, p, rng)
    if scaled_mask is None:
        return x, None
    return x * scaled_mask, scaled_mask


def dropout_backward(dout, scaled_mask):
    """dout: forward's output shape; returns dx."""
    if scaled_mask is None:
        return dout
    return dout * scaled_mask
