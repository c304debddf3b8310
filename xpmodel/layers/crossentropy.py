"""Tied output layer and numerically stable softmax cross-entropy.

The logits of N rows over V classes are the largest activation in the model,
so the model evaluates these functions on chunks of rows: each chunk's
logits are turned into their gradient in place and then dropped.
"""
from ..backend import array_module

IGNORE_INDEX = -1


def lm_head_forward(x, wte):
    """x: (N, C), wte: (V, C) -> logits (N, V) = x @ wte^T."""
    xp = array_module(x)
    return xp.matmul(x, wte.T)


def lm_head_backward(dlogits, x, wte, dwte):
    """dlogits: (N, V). Adds into dwte (V, C); returns dx (N, C)."""
    xp = array_module(dlogits)
    dwte += xp.matmul(dlogits.T, x)
    return xp.matmul(dlogits, wte)


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
