"""Causal multi-head self-attention on a fused qkv activation.

The softmax and its gradient are computed in at least float32, whatever the
dtype of q, k and v; the probabilities are kept in that dtype. On NumPy the
scores and their gradient are widened to float32 first; the CUDA kernels
widen as they read, so there the scores stay in q's dtype, which halves the
largest memory traffic of the layer.

The projections around it (c_attn before, c_proj after) are plain linear
layers; this file holds what sits between them: split into heads (adding
c_attn's bias when it is passed here), scaled dot-product scores, causal
softmax, optional dropout on the probabilities, the weighted sum of values,
and the merge of the heads' gradients. On CuPy the per-head products are
strided batched cuBLAS calls, in chunks of queries past T = 256, and the
softmax, the split and the merge are one kernel each. For float16 heads of 64
dimensions with T a multiple of 64 and no dropout on the probabilities,
xpmodel/cuda/flash.py does everything between the split and the merge
without T x T matrices.
"""
import math
from typing import NamedTuple

import numpy

from ..backend import array_module, is_cuda_array, upcast
from .dropout import dropout_backward, dropout_forward
from .matmul import matmul


_causal_masks = {}   # (module, T, dtype) -> (T, T) additive mask


def _causal_mask(xp, T, dtype):
    """(T, T): 0 on and below the diagonal, -inf above (the future)."""
    key = (xp.__name__, T, dtype.str)
    if key not in _causal_masks:
        future = xp.triu(xp.ones((T, T), dtype=bool), k=1)
        _causal_masks[key] = xp.where(future, -xp.inf, 0.0).astype(dtype)
    return _causal_masks[key]


def causal_softmax_forward(scores, out_dtype=None, key_block=None):
    """scores: (..., T, T) -> probabilities with future positions masked out,
    in out_dtype (default scores'). Works in place on NumPy `scores`.

    key_block (CUDA): the future part of a row is only written (as zeros) up
    to the end of its query's block of key_block keys, the part the chunked
    products read; NumPy writes whole rows."""
    out_dtype = out_dtype or scores.dtype
    if is_cuda_array(scores):
        from ..cuda.softmax import causal_softmax_forward as fused
        return fused(scores, out_dtype, key_block)
    xp = array_module(scores)
    scores += _causal_mask(xp, scores.shape[-1], scores.dtype)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = xp.exp(scores, out=scores)
    probs *= 1.0 / probs.sum(axis=-1, keepdims=True)
    return probs.astype(out_dtype, copy=False)


def causal_softmax_backward(dprobs, probs, out_dtype=None, key_block=None):
    """dprobs, probs: (..., T, T); returns dscores in out_dtype
    (default dprobs'), in place on NumPy `dprobs`; key_block as forward's.

    Masked positions have probability 0, so their gradient is 0 too.
    """
    out_dtype = out_dtype or dprobs.dtype
    if is_cuda_array(dprobs):
        from ..cuda.softmax import causal_softmax_backward as fused
        return fused(dprobs, probs, out_dtype, key_block)
    dprobs, probs = upcast(dprobs), upcast(probs)
    dot = (dprobs * probs).sum(axis=-1, keepdims=True)
    dprobs -= dot
    dprobs *= probs
    return dprobs.astype(out_dtype, copy=False)


def _score_dtype(like):
    """The dtype of the (B, H, T, T) scores and their gradient."""
    return like.dtype if is_cuda_array(like) else numpy.promote_types(like.dtype, numpy.float32)


def split_heads(qkv, bias, n_head):
    """qkv: (B, T, 3C), bias: (3C,) or None -> (3, B, H, T, D) contiguous, with
    the bias added and q scaled by 1/sqrt(D) (T/D times cheaper than scaling
    the scores). One copy makes q, k and v contiguous for the batched
    products; on CuPy it is one kernel that also adds and scales."""
    B, T, C3 = qkv.shape
    D = C3 // 3 // n_head
    if is_cuda_array(qkv):
        from ..cuda.heads import split_heads as fused
        return fused(qkv, bias, n_head, 1.0 / math.sqrt(D))
    xp = array_module(qkv)
    heads = xp.ascontiguousarray(qkv.reshape(B, T, 3, n_head, D).transpose(2, 0, 3, 1, 4))
    if bias is not None:
        heads += bias.reshape(3, 1, n_head, 1, D)
    heads[0] *= 1.0 / math.sqrt(D)
    return heads


class SoftmaxCache(NamedTuple):
    heads: object       # (3, B, H, T, D), q scaled
    probs: object       # (B, H, T, T)
    drop_mask: object   # (B, H, T, T) or None


class FlashCache(NamedTuple):
    heads: object       # (3, B, H, T, 64), q scaled
    out: object         # (B*T, C), the layer's output
    lse: object         # (B, H, T) float32: log of each row's softmax denominator, plus its max


def attention_forward(qkv, n_head, dropout_p=0.0, rng=None, bias=None):
    """qkv: (B, T, 3C), the projection's output, its bias (3C,) not yet added
    when given here -> y (B*T, C), cache for backward."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    xp = array_module(qkv)
    heads = split_heads(qkv, bias, n_head)                           # (3, B, H, T, D)
    if is_cuda_array(qkv):
        from ..cuda import flash
        if flash.flash_applies(heads, dropout_p):
            y, lse = flash.flash_forward(heads)
            return y, FlashCache(heads, y, lse)
    q, k, v = heads[0], heads[1], heads[2]
    blocks = _causal_blocks(T, is_cuda_array(qkv))
    scores = xp.empty(q.shape[:-1] + (T,), dtype=_score_dtype(qkv))  # (B, H, T, T)
    for rows, keys in blocks:
        matmul(q[:, :, rows], k[:, :, keys], transpose_b=True, out=scores[:, :, rows, keys])
    probs = causal_softmax_forward(scores, out_dtype=qkv.dtype, key_block=blocks[0][0].stop)
    probs_used, drop_mask = dropout_forward(probs, dropout_p, rng)
    y = xp.empty_like(q)                                             # (B, H, T, D)
    for rows, keys in blocks:
        matmul(probs_used[:, :, rows, keys], v[:, :, keys], out=y[:, :, rows])
    y = y.transpose(0, 2, 1, 3).reshape(B * T, C)
    return y, SoftmaxCache(heads, probs, drop_mask)


def merge_heads(dheads, dbias=None):
    """dheads: (3, B, H, T, D) -> (B*T, 3C), the inverse of split_heads' layout
    change; with dbias (3C,), the column sums are added into it (the gradient
    of the bias split_heads added). One kernel on CuPy."""
    if is_cuda_array(dheads):
        from ..cuda.heads import merge_heads as fused
        return fused(dheads, dbias)
    _, B, H, T, D = dheads.shape
    merged = dheads.transpose(1, 3, 0, 2, 4).reshape(B * T, 3 * H * D)
    if dbias is not None:
        dbias += merged.sum(axis=0, dtype=dbias.dtype)
    return merged


def attention_backward(dy, cache, dbias=None):
    """dy: (B*T, C) -> dqkv (B*T, 3C); with dbias (3C,), the gradient of the
    bias passed to forward is added into it."""
    xp = array_module(dy)
    if isinstance(cache, FlashCache):
        from ..cuda.flash import flash_backward
        dheads = flash_backward(dy, cache.heads, cache.out, cache.lse, 1.0 / math.sqrt(cache.heads.shape[-1]))
        return merge_heads(dheads, dbias)
    heads, probs, drop_mask = cache
    _, B, H, T, D = heads.shape
    q, k, v = heads[0], heads[1], heads[2]   # q already scaled by 1/sqrt(D)
    dheads = xp.empty_like(heads)
    dq, dk, dv = dheads[0], dheads[1], dheads[2]
    blocks = _causal_blocks(T, is_cuda_array(dy))
    probs_used = probs if drop_mask is None else probs * drop_mask          # recomputed, not kept
    dy = xp.ascontiguousarray(dy.reshape(B, T, H, D).transpose(0, 2, 1, 3))  # (B, H, T, D)
    # keys `rows` are seen by the queries from rows.start on
    for rows, _ in blocks:
        later = slice(rows.start, T)
        matmul(probs_used[:, :, later, rows], dy[:, :, later], transpose_a=True, out=dv[:, :, rows])
    dprobs = xp.empty_like(probs, dtype=_score_dtype(dy))                  # (B, H, T, T)
    for rows, keys in blocks:
        matmul(dy[:, :, rows], v[:, :, keys], transpose_b=True, out=dprobs[:, :, rows, keys])
    dprobs = dropout_backward(dprobs, drop_mask)
    dscores = causal_softmax_backward(dprobs, probs, out_dtype=heads.dtype,
                                      key_block=blocks[0][0].stop)
    for rows, keys in blocks:
        matmul(dscores[:, :, rows, keys], k[:, :, keys], out=dq[:, :, rows], alpha=1.0 / math.sqrt(D))
        later = slice(rows.start, T)
        matmul(dscores[:, :, later, rows], q[:, :, later], transpose_a=True, out=dk[:, :, rows])
    return merge_heads(dheads, dbias)


_QUERY_CHUNK = 256   # queries per block of the causal products on CUDA


def _causal_blocks(T, on_cuda):
    """(queries, keys) slice pairs that cover the causal part of the T x T
    products. On CUDA, chunks of _QUERY_CHUNK queries, each against the keys
    up to its last query, skip most of the masked upper triangle (four chunks
    of T = 1024 compute 62.5% of the square); the softmax kernels never read
    the rest. On NumPy one block: the additive mask there reads whole rows."""
    if not on_cuda or T <= _QUERY_CHUNK:
        return [(slice(0, T), slice(0, T))]
    return [(slice(start, min(start + _QUERY_CHUNK, T)), slice(0, min(start + _QUERY_CHUNK, T)))
            for start in range(0, T, _QUERY_CHUNK)]
