"""The output layer (the token embedding when tied, lm_head.weight when not)
and numerically stable softmax cross-entropy.

The logits of N rows over V classes are the largest activation in the model,
so the model evaluates these functions on chunks of rows: each chunk's
logits are turned into their gradient in place and then dropped.
"""
from ..backend import array_module, fused_kernels, upcast
from .matmul import matmul

IGNORE_INDEX = -1


def lm_head_forward(x, wte):
    """x: (N, C), wte: (V, C) -> logits (N, V) = x @ wte^T."""
    return matmul(x, wte, transpose_b=True)


def lm_head_backward(dlogits, x, wte, dwte, dx=None):
    """dlogits: (N, V). Adds into dwte (V, C); returns dx (N, C), written into `dx` when given."""
    matmul(dlogits, x, transpose_a=True, out=dwte, accumulate=True)
    return matmul(dlogits, wte, out=dx)


def crossentropy_forward(logits, targets):
    """logits: (N, V) float, targets: (N,) ints, IGNORE_INDEX for padding.

    Returns per-row losses (N,) (0 where ignored) and the softmax
    probabilities, computed in place in `logits`.
    """
    xp = array_module(logits)
    N = logits.shape[0]
    logits -= logits.max(axis=1, keepdims=True)
    rows = xp.arange(N)
    keep = targets != IGNORE_INDEX
    safe_targets = xp.where(keep, targets, 0)
    target_logit = logits[rows, safe_targets]
    probs = xp.exp(logits, out=logits)
    sums = probs.sum(axis=1)
    losses = xp.log(sums) - target_logit
    losses *= keep
    probs *= (1.0 / sums)[:, None]
    return losses, probs


def crossentropy_backward(dlosses, probs, targets):
    """dlosses: (N,) upstream gradient per row; returns dlogits (N, V) in place."""
    xp = array_module(probs)
    N = probs.shape[0]
    keep = targets != IGNORE_INDEX
    probs[xp.arange(N), xp.where(keep, targets, 0)] -= 1.0
    probs *= (dlosses * keep)[:, None].astype(probs.dtype, copy=False)
    return probs


def crossentropy_fused(logits, targets, dlosses=None):
    """Forward and, given dlosses (a scalar: every row's loss gradient), backward.

    logits: (N, V) in any float dtype; statistics are computed in >= float32.
    Returns (losses (N,), dlogits (N, V) in the logits' dtype, or None without
    dlosses). With the fused CUDA kernels it is one kernel that overwrites the
    logits with their gradient; otherwise forward then backward on a widened copy.
    """
    if fused_kernels(logits):
        from ..cuda.crossentropy import crossentropy
        losses = crossentropy(logits, targets, dlosses)
        return losses, (logits if dlosses is not None else None)
    losses, probs = crossentropy_forward(upcast(logits), targets)
    if dlosses is None:
        return losses, None
    return losses, crossentropy_backward(dlosses, probs, targets).astype(logits.dtype, copy=False)
