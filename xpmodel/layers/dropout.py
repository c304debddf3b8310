"""Inverted dropout: kept units are scaled by 1/(1-p) during training.

A mask is a KeepMask: which elements are kept (bool, one byte an element)
and the scale they take. Applying it computes x * scale in at least float32
and rounds once to x's dtype, so a 16-bit activation is scaled by 1/(1-p)
itself, not by 1/(1-p) rounded to 16 bits (1.109375 in bfloat16 for p = 0.1,
which would shrink every kept unit by 0.16%).

A training pass draws its masks from one seeded generator (pass_generator):
NumPy's or CuPy's, or on a GPU with the fused kernels a counter-based one
(cuda/random.py) whose masks are drawn by a kernel, or inside the flash
attention kernels themselves."""
from typing import NamedTuple

import numpy

from ..backend import array_module, fused_kernels, fused_mode, random_generator


class KeepMask(NamedTuple):
    keep: object    # the masked array's shape, bool: True where an element is kept
    scale: float    # 1 / (1 - p), what kept elements are multiplied by


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
    """The KeepMask of dropout rate p for an array like `like`, or None when
    p == 0. rng: a seeded generator on like's device."""
    if p == 0.0:
        return None
    if hasattr(rng, "keep_mask"):   # a counter-based generator draws the mask in one kernel
        keep = rng.keep_mask(like.shape, p)
    else:
        keep = rng.random(like.shape, dtype=draw_dtype(like)) >= p
    return KeepMask(keep, 1.0 / (1.0 - p))


def apply_mask(x, mask):
    """x * mask.keep * mask.scale in x's dtype, computed in at least float32
    and rounded once (on CuPy with the fused kernels in one kernel, with no
    float32 copy of a 16-bit x); x itself when mask is None."""
    if mask is None:
        return x
    if fused_kernels(x):
        from ..cuda.dropout import apply_keep_mask
        return apply_keep_mask(x, mask.keep, mask.scale)
    wide = numpy.promote_types(x.dtype, numpy.float32)
    out = array_module(x).multiply(x, mask.keep, dtype=wide)
    out *= wide.type(mask.scale)
    return out.astype(x.dtype, copy=False)


def dropout_forward(x, p, rng):
    """x: any shape. Returns out and the KeepMask that backward needs, or
    (x, None) when p == 0."""
    mask = dropout_mask(x, p, rng)
    return apply_mask(x, mask), mask


def dropout_backward(dout, mask):
    """dout: forward's output shape; returns dx."""
    return apply_mask(dout, mask)
