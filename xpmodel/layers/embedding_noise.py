"""Noise on the input embeddings in training (NEFTune: Jain et al., 2023,
"NEFTune: Noisy Embeddings Improve Instruction Finetuning").

A training pass adds to the (B, T, C) embeddings

    alpha / sqrt(T * C) * u,   u ~ Uniform(-1, 1) ("uniform", NEFTune's) or N(0, 1) ("gaussian"),

one draw per element from the pass's seeded generator, so a resumed run draws
the same noise as an uninterrupted one. Evaluation and generation pass no
generator and add nothing. The noise does not depend on x, so the Jacobian
is the identity: backward hands the gradient through and needs no cache.
"""
import math

from ..options import NOISE_KINDS
from .dropout import draw_dtype


def embedding_noise(like, alpha, kind, rng):
    """The (B, T, C) noise for embeddings shaped like `like`, in its dtype.
    rng: a seeded generator on like's device."""
    B, T, C = like.shape
    dtype = draw_dtype(like)
    if kind == "uniform":
        noise = rng.random(like.shape, dtype=dtype)   # [0, 1)
        noise *= 2.0
        noise -= 1.0
    elif kind == "gaussian":
        noise = rng.standard_normal(like.shape, dtype=dtype)
    else:
        raise ValueError(f"embedding noise kind must be one of {', '.join(NOISE_KINDS)}, "
                         f"got {kind!r}")
    noise *= alpha / math.sqrt(T * C)
    return noise.astype(like.dtype, copy=False)


def embedding_noise_forward(x, alpha, kind, rng):
    """x: (B, T, C) embeddings -> out (B, T, C) = x + noise, and the cache (None).
    Returns x itself when alpha is 0 or rng is None (not a training pass)."""
    if alpha == 0 or rng is None:
        return x, None
    return x + embedding_noise(x, alpha, kind, rng), None


def embedding_noise_backward(dout, cache=None):
    """dout: (B, T, C) -> dx = dout, since d(x + noise)/dx is the identity."""
    return dout
