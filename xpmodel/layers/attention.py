"""Causal multi-head self-attention on a fused qkv activation, with
grouped-query attention, QK-norm and rotary positions as options.

The softmax and its gradient are computed in at least float32, whatever the
dtype of q, k and v; the probabilities are kept in that dtype. The `xp` code
(NumPy, or CuPy with the "xp" kernels) widens the scores and their gradient
to float32 first; the fused CUDA kernels widen as they read, so there the
scores stay in q's dtype, which halves the largest memory traffic of the layer.

The projections around it (c_attn before, c_proj after) are plain linear
layers; this file holds what sits between them: split into heads (adding
c_attn's bias when it is passed here), scaled dot-product scores, causal
softmax, optional dropout on the probabilities, the weighted sum of values,
and the merge of the heads' gradients. On CuPy the per-head products are
strided batched cuBLAS calls; with the fused kernels (backend.use_kernels),
in chunks of queries past T = 256, and the softmax, the split and the merge
are one kernel each. For float16 or bfloat16 heads
of 64 dimensions with T a multiple of 64, xpmodel/cuda/flash.py does
everything between the split and the merge without T x T matrices, dropout
on the probabilities included when the pass's generator is the counter-based
one (layers/dropout.py's pass_generator): the kernels draw the mask
themselves, the same mask as the T x T path's for the same stream.

GPT-2's attention goes straight from the split to that core. With the
options, the split gives q (B, H, T, D) and k, v (B, H_kv, T, D); QK-norm
and the rotation act on q and k and q is scaled. The core takes the heads in
that form (one (3, B, H, T, D) array when H_kv = H, as GPT-2's), so one core
serves every variant: the flash kernels read each key/value head for every
query head of its group and give its gradient summed over the group; the
path through T x T scores repeats k and v over their groups and sums their
gradients back. With the fused kernels and no QK-norm, the split with the
rotation, and the merge, are one kernel each (xpmodel/cuda/rope_heads.py).
"""
import math
from typing import NamedTuple

import numpy

from ..backend import array_module, fused_kernels, upcast
from .dropout import apply_mask, dropout_backward, dropout_forward
from .matmul import add_column_sums, matmul, row_sums
from .rmsnorm import rmsnorm_backward, rmsnorm_forward
from .rope import rope_backward, rope_forward


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

    key_block (fused kernels): the future part of a row is only written (as
    zeros) up to the end of its query's block of key_block keys, the part the
    chunked products read; the `xp` code writes whole rows."""
    out_dtype = out_dtype or scores.dtype
    if fused_kernels(scores):
        from ..cuda.softmax import causal_softmax_forward as fused
        return fused(scores, out_dtype, key_block)
    xp = array_module(scores)
    scores += _causal_mask(xp, scores.shape[-1], scores.dtype)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = xp.exp(scores, out=scores)
    probs *= 1.0 / row_sums(probs)
    return probs.astype(out_dtype, copy=False)


def causal_softmax_backward(dprobs, probs, out_dtype=None, key_block=None):
    """dprobs, probs: (..., T, T); returns dscores in out_dtype
    (default dprobs'), in place on NumPy `dprobs`; key_block as forward's.

    Masked positions have probability 0, so their gradient is 0 too.
    """
    out_dtype = out_dtype or dprobs.dtype
    if fused_kernels(dprobs):
        from ..cuda.softmax import causal_softmax_backward as fused
        return fused(dprobs, probs, out_dtype, key_block)
    dprobs, probs = upcast(dprobs), upcast(probs)
    dprobs -= row_sums(dprobs * probs)
    dprobs *= probs
    return dprobs.astype(out_dtype, copy=False)


def _score_dtype(like):
    """The dtype of the (B, H, T, T) scores and their gradient."""
    return like.dtype if fused_kernels(like) else numpy.promote_types(like.dtype, numpy.float32)


def split_heads(qkv, bias, n_head):
    """qkv: (B, T, 3C), bias: (3C,) or None -> (3, B, H, T, D) contiguous, with
    the bias added and q scaled by 1/sqrt(D) (T/D times cheaper than scaling
    the scores). One copy makes q, k and v contiguous for the batched
    products; with the fused CUDA kernels it is one kernel that also adds and scales."""
    B, T, C3 = qkv.shape
    D = C3 // 3 // n_head
    if fused_kernels(qkv):
        from ..cuda.heads import split_heads as fused
        return fused(qkv, bias, n_head, 1.0 / math.sqrt(D))
    xp = array_module(qkv)
    heads = xp.ascontiguousarray(qkv.reshape(B, T, 3, n_head, D).transpose(2, 0, 3, 1, 4))
    if bias is not None:
        heads += bias.reshape(3, 1, n_head, 1, D)
    heads[0] *= 1.0 / math.sqrt(D)
    return heads


class SoftmaxCache(NamedTuple):
    heads: object       # (3, B, H, T, D), q scaled, k and v repeated over their groups
    probs: object       # (B, H, T, T)
    drop_mask: object   # (B, H, T, T) or None
    group: int          # query heads per key/value head: backward sums dk, dv over each


class FlashCache(NamedTuple):
    heads: object       # q (B, H, T, 64), scaled, k, v (B, H_kv, T, 64), as the core got them
    out: object         # (B*T, C), the layer's output
    lse: object         # (B, H, T) float32: log of each row's softmax denominator, plus its max
    dropout: object     # (rate, stream key) of the probabilities' dropout, or None


class HeadsCache(NamedTuple):
    """What the backward of the head transforms (QK-norm, RoPE) reads."""
    qk_norm: object     # (q's RMSNorm cache, k's) or None
    rope: object        # (cos, sin) (T, D/2) or None


class AttentionCache(NamedTuple):
    core: object        # SoftmaxCache or FlashCache
    heads: object       # HeadsCache, or None on GPT-2's path


def attention_forward(qkv, n_head, dropout_p=0.0, rng=None, bias=None, n_kv_head=None,
                      qk_norm=None, rope=None, kv_cache=None):
    """qkv: (B, T, (H + 2 H_kv) D), the projection's output, its bias not yet
    added when given here -> y (B*T, H D), cache for backward.

    n_kv_head: key/value heads (default n_head); each serves H / H_kv query heads.
    qk_norm: (w_q, w_k, eps), an RMSNorm of every q and k head, or None.
    rope: (cos, sin) tables (T, D/2) for these positions, or None.
    kv_cache (generation): a LayerKV that receives this call's keys and
    values; positions after the first attend over everything it holds.
    """
    B, T, width = qkv.shape
    n_kv_head = n_kv_head or n_head
    D = width // (n_head + 2 * n_kv_head)
    if n_kv_head == n_head and qk_norm is None and rope is None and kv_cache is None:
        heads = split_heads(qkv, bias, n_head)                       # GPT-2: (3, B, H, T, D)
        y, core = _core_forward(heads, dropout_p, rng)
        return y, AttentionCache(core, None)
    if fused_kernels(qkv) and qk_norm is None and kv_cache is None:
        from ..cuda.rope_heads import split_rope_heads
        heads = split_rope_heads(qkv, bias, n_head, n_kv_head, rope, 1.0 / math.sqrt(D))
        y, core = _core_forward(heads, dropout_p, rng)
        return y, AttentionCache(core, HeadsCache(None, rope))
    q, k, v = split_qkv(qkv, bias, n_head, n_kv_head)                # (B, H|H_kv, T, D)
    norm_caches = None
    if qk_norm is not None:
        w_q, w_k, eps = qk_norm
        q, q_cache = rmsnorm_forward(q, w_q, eps=eps)
        k, k_cache = rmsnorm_forward(k, w_k, eps=eps)
        norm_caches = (q_cache, k_cache)
    if rope is not None:
        q, k = rope_forward(q, *rope), rope_forward(k, *rope)
    q *= 1.0 / math.sqrt(D)
    if kv_cache is not None:
        start = kv_cache.append(k, v)
        if start > 0:
            return cached_attention(q, kv_cache, start), None
    # the core's form of the heads (cuda/flash.py's empty_heads)
    heads = array_module(q).stack([q, k, v]) if n_kv_head == n_head else (q, k, v)
    y, core = _core_forward(heads, dropout_p, rng)
    return y, AttentionCache(core, HeadsCache(norm_caches, rope))


def attention_backward(dy, cache, dbias=None, qk_norm=None, dqk_norm=None):
    """dy: (B*T, H D) -> dqkv (B*T, (H + 2 H_kv) D); with dbias, the gradient of
    the bias passed to forward is added into it. qk_norm: (w_q, w_k, eps) as
    given to forward; dqk_norm: (dw_q, dw_k) to add their gradients into."""
    dheads = _core_backward(dy, cache.core)          # in the form of the heads: dk, dv of H_kv heads
    if cache.heads is None:
        return merge_heads(dheads, dbias)
    norm_caches, rope = cache.heads
    if fused_kernels(dy) and norm_caches is None:
        from ..cuda.rope_heads import merge_rope_heads
        return merge_rope_heads(dheads, rope, dbias)
    dq, dk, dv = dheads                            # the core's dq is already times 1/sqrt(D)
    if rope is not None:
        dq, dk = rope_backward(dq, *rope), rope_backward(dk, *rope)
    if norm_caches is not None:
        (w_q, w_k, _), (dw_q, dw_k) = qk_norm, dqk_norm
        dq = rmsnorm_backward(dq, norm_caches[0], w_q, dw_q).astype(dv.dtype, copy=False)
        dk = rmsnorm_backward(dk, norm_caches[1], w_k, dw_k).astype(dv.dtype, copy=False)
    return merge_qkv(dq, dk, dv, dbias)


def split_qkv(qkv, bias, n_head, n_kv_head):
    """qkv: (B, T, (H + 2 H_kv) D) -> q (B, H, T, D), k, v (B, H_kv, T, D),
    each a new contiguous array, with the bias ((H + 2 H_kv) D,) added."""
    B, T, width = qkv.shape
    n_heads = n_head + 2 * n_kv_head
    D = width // n_heads
    heads = qkv.reshape(B, T, n_heads, D).transpose(0, 2, 1, 3)      # (B, all heads, T, D)
    parts = []
    for start, stop in ((0, n_head), (n_head, n_head + n_kv_head), (n_head + n_kv_head, n_heads)):
        part = heads[:, start:stop].copy()                            # the one copy, C-ordered
        if bias is not None:
            part += bias.reshape(n_heads, 1, D)[start:stop]
        parts.append(part)
    return tuple(parts)


def merge_qkv(dq, dk, dv, dbias=None):
    """The inverse of split_qkv's layout change: dq (B, H, T, D), dk, dv
    (B, H_kv, T, D) -> (B*T, (H + 2 H_kv) D); dbias gets the column sums."""
    xp = array_module(dq)
    B, _, T, D = dq.shape
    merged = xp.concatenate([part.transpose(0, 2, 1, 3).reshape(B * T, -1).astype(dq.dtype, copy=False)
                             for part in (dq, dk, dv)], axis=1)
    if dbias is not None:
        add_column_sums(merged, dbias)
    return merged


def _repeat_heads(x, group):
    """(B, H_kv, T, D) -> (B, H_kv * group, T, D): kv head j serves query heads j*group ..."""
    return x if group == 1 else array_module(x).repeat(x, group, axis=1)


def _sum_head_groups(dx, group):
    """(B, H, T, D) -> (B, H / group, T, D), the gradient of _repeat_heads."""
    if group == 1:
        return dx
    B, H, T, D = dx.shape
    return dx.reshape(B, H // group, group, T, D).sum(axis=2, dtype=dx.dtype)


def cached_attention(q, kv_cache, start):
    """q: (B, H, Tq, D), scaled, for positions start .. start+Tq-1, against the
    cache's keys and values for positions 0 .. start+Tq-1 -> y (B*Tq, H D)."""
    xp = array_module(q)
    B, H, Tq, D = q.shape
    L = start + Tq
    group = H // kv_cache.keys.shape[1]
    keys = _repeat_heads(kv_cache.keys[:, :, :L], group)
    values = _repeat_heads(kv_cache.values[:, :, :L], group)
    wide = numpy.float64 if q.dtype == numpy.float64 else numpy.float32     # softmax in >= float32
    scores = matmul(q, keys, transpose_b=True, out_dtype=wide)             # (B, H, Tq, L)
    future = xp.arange(L)[None, :] > (start + xp.arange(Tq))[:, None]    # (Tq, L)
    scores = xp.where(future, -xp.inf, scores)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = xp.exp(scores, out=scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    y = matmul(probs.astype(q.dtype, copy=False), values)                # (B, H, Tq, D)
    return y.transpose(0, 2, 1, 3).reshape(B * Tq, H * D)


def _core_forward(heads, dropout_p, rng):
    """heads: q (B, H, T, D), scaled, k, v (B, H_kv, T, D), one (3, B, H, T, D)
    array when H_kv = H -> y (B*T, H D) and the core's cache: causal softmax
    attention, by flash kernels where they apply (they read each key/value
    head for its whole group of query heads), else through T x T scores of
    each query head against its own copy of its key/value head."""
    q, k, v = heads
    B, H, T, D = q.shape
    xp = array_module(q)
    if fused_kernels(q):
        from ..cuda import flash
        if flash.flash_applies(heads, dropout_p, rng):
            dropout = (dropout_p, rng.next_key()) if dropout_p else None   # drawn in the kernels
            y, lse = flash.flash_forward(heads, dropout)
            return y, FlashCache(heads, y, lse, dropout)
    group = H // k.shape[1]
    if group > 1:
        heads = xp.stack([q, _repeat_heads(k, group), _repeat_heads(v, group)])
        q, k, v = heads
    blocks = _causal_blocks(T, fused_kernels(heads))
    scores = xp.empty(q.shape[:-1] + (T,), dtype=_score_dtype(heads))  # (B, H, T, T)
    for rows, keys in blocks:
        matmul(q[:, :, rows], k[:, :, keys], transpose_b=True, out=scores[:, :, rows, keys])
    probs = causal_softmax_forward(scores, out_dtype=heads.dtype, key_block=blocks[0][0].stop)
    probs_used, drop_mask = dropout_forward(probs, dropout_p, rng)
    y = xp.empty_like(q)                                               # (B, H, T, D)
    for rows, keys in blocks:
        matmul(probs_used[:, :, rows, keys], v[:, :, keys], out=y[:, :, rows])
    y = y.transpose(0, 2, 1, 3).reshape(B * T, H * D)
    return y, SoftmaxCache(heads, probs, drop_mask, group)


def merge_heads(dheads, dbias=None):
    """dheads: (3, B, H, T, D) -> (B*T, 3C), the inverse of split_heads' layout
    change; with dbias (3C,), the column sums are added into it (the gradient
    of the bias split_heads added). One kernel with the fused CUDA kernels."""
    if fused_kernels(dheads):
        from ..cuda.heads import merge_heads as fused
        return fused(dheads, dbias)
    _, B, H, T, D = dheads.shape
    merged = dheads.transpose(1, 3, 0, 2, 4).reshape(B * T, 3 * H * D)
    if dbias is not None:
        add_column_sums(merged, dbias)
    return merged


def _core_backward(dy, cache):
    """dy: (B*T, H D) -> dheads in the form of the heads forward got: dq
    (B, H, T, D) with respect to q before its scaling, dk, dv (B, H_kv, T, D)."""
    xp = array_module(dy)
    if isinstance(cache, FlashCache):
        from ..cuda.flash import flash_backward
        return flash_backward(dy, cache.heads, cache.out, cache.lse,
                              1.0 / math.sqrt(cache.heads[0].shape[-1]), cache.dropout)
    heads, probs, drop_mask, group = cache
    _, B, H, T, D = heads.shape
    q, k, v = heads[0], heads[1], heads[2]   # q already scaled by 1/sqrt(D)
    dheads = xp.empty_like(heads)
    dq, dk, dv = dheads[0], dheads[1], dheads[2]
    blocks = _causal_blocks(T, fused_kernels(dy))
    probs_used = apply_mask(probs, drop_mask)                             # recomputed, not kept
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
    if group > 1:
        return dq, _sum_head_groups(dk, group), _sum_head_groups(dv, group)
    return dheads


_QUERY_CHUNK = 256   # queries per block of the causal products with the fused kernels


def _causal_blocks(T, fused):
    """(queries, keys) slice pairs that cover the causal part of the T x T
    products. For the fused CUDA kernels, chunks of _QUERY_CHUNK queries, each
    against the keys up to its last query, skip most of the masked upper
    triangle (four chunks of T = 1024 compute 62.5% of the square); the
    softmax kernels never read the rest. For the `xp` code one block: the
    additive mask there reads whole rows."""
    if not fused or T <= _QUERY_CHUNK:
        return [(slice(0, T), slice(0, T))]
    return [(slice(start, min(start + _QUERY_CHUNK, T)), slice(0, min(start + _QUERY_CHUNK, T)))
            for start in range(0, T, _QUERY_CHUNK)]
