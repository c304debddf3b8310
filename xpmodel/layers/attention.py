"""Causal multi-head self-attention on a fused qkv activation.

The softmax and its gradient are computed in at least float32, whatever the
dtype of q, k and v.

The projections around it (c_attn before, c_proj after) are plain linear
layers; this file holds what sits between them: split into heads, scaled
dot-product scores, causal softmax, optional dropout on the probabilities,
and the weighted sum of values.
"""
import math

from ..backend import array_module, upcast
from .dropout import dropout_backward, dropout_forward


_causal_masks = {}   # (module, T, dtype) -> (T, T) additive mask


def _causal_mask(xp, T, dtype):
    """(T, T): 0 on and below the diagonal, -inf above (the future)."""
    key = (xp.__name__, T, dtype.str)
    if key not in _causal_masks:
        future = xp.triu(xp.ones((T, T), dtype=bool), k=1)
        _causal_masks[key] = xp.where(future, -xp.inf, 0.0).astype(dtype)
    return _causal_masks[key]


def causal_softmax_forward(scores):
    """scores: (..., T, T) -> probabilities with future positions masked out.

    Works in place on `scores`.
    """
    xp = array_module(scores)
    scores += _causal_mask(xp, scores.shape[-1], scores.dtype)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = xp.exp(scores, out=scores)
    probs *= 1.0 / probs.sum(axis=-1, keepdims=True)
    return probs


def causal_softmax_backward(dprobs, probs):
    """dprobs, probs: (..., T, T); returns dscores, in place on dprobs.

    Masked positions have probability 0, so their gradient is 0 too.
    """
    dot = (dprobs * probs).sum(axis=-1, keepdims=True)
    dprobs -= dot
    dprobs *= probs
    return dprobs


def attention_forward(qkv, n_head, dropout_p=0.0, rng=None):
    """qkv: (B, T, 3C) -> y (B*T, C), cache for backward."""
    xp = array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    # (3, B, H, T, D): one copy makes q, k and v contiguous for batched matmul
    heads = xp.ascontiguousarray(qkv.reshape(B, T, 3, n_head, D).transpose(2, 0, 3, 1, 4))
    q, k, v = heads[0], heads[1], heads[2]
    q *= 1.0 / math.sqrt(D)            # scaling q is T/D times cheaper than scaling scores
    scores = upcast(xp.matmul(q, k.transpose(0, 1, 3, 2)))     # (B, H, T, T), >= float32
    probs = causal_softmax_forward(scores)
    probs_used, drop_mask = dropout_forward(probs, dropout_p, rng)
    probs_used = probs_used.astype(qkv.dtype, copy=False)
    y = xp.matmul(probs_used, v)                                # (B, H, T, D)
    y = y.transpose(0, 2, 1, 3).reshape(B * T, C)
    return y, (heads, probs, probs_used, drop_mask)


def attention_backward(dy, cache):
    """dy: (B*T, C) -> dqkv (B*T, 3C)."""
    xp = array_module(dy)
    heads, probs, probs_used, drop_mask = cache
    _, B, H, T, D = heads.shape
    q, k, v = heads[0], heads[1], heads[2]   # q already scaled by 1/sqrt(D)
    dy = xp.ascontiguousarray(dy.reshape(B, T, H, D).transpose(0, 2, 1, 3))  # (B, H, T, D)
    dheads = xp.empty_like(heads)
    xp.matmul(probs_used.transpose(0, 1, 3, 2), dy, out=dheads[2])          # dv
    dprobs = upcast(xp.matmul(dy, v.transpose(0, 1, 3, 2)))                  # (B, H, T, T)
    dprobs = dropout_backward(dprobs, drop_mask)
    dscores = causal_softmax_backward(dprobs, probs).astype(heads.dtype, copy=False)
    xp.matmul(dscores, k, out=dheads[0])                                     # dq
    dheads[0] *= 1.0 / math.sqrt(D)
    xp.matmul(dscores.transpose(0, 1, 3, 2), q, out=dheads[1])               # dk
    return dheads.transpose(1, 3, 0, 2, 4).reshape(B * T, 3 * H * D)
