"""Autoregressive text generation, with a key/value cache.

Dimension letters as in layers/__init__.py: B batch, T time, C n_embd, H n_head,
H_kv key/value heads, D head size (C // H), V vocab.

`prefill` runs a prompt through the model once and keeps every layer's keys
and values in a `KVCache`; `decode_step` then feeds one new position per
sequence, attending over the cache, so each generated token costs one
position instead of a forward over the whole context. Both run
`GPT.forward_cached`: forward's blocks, weights and dtypes (mixed precision's
16-bit working copy included), with each block's attention given its slice
of the cache, so their logits match `GPT.forward` to rounding.

`generate` streams token ids for one sequence; `sample_next` turns one logit
vector into a token (greedy, temperature, top-k, nucleus). Both take
`vocab_limit`, the tokenizer's id count: a model whose vocabulary is padded
past it (model.vocab_size) has output rows for ids no tokenizer can decode,
and those are never drawn. Contexts longer
than block_size are cropped to their last block_size tokens, as the uncached
path (`GPT.forward` on the cropped window every step) does. Because positions
are absolute, a cropped window shifts every position, so once the cache is
full it is rebuilt from the new window: cached and uncached generation see the
same window at every step and produce the same tokens. (Rotary positions are
rebuilt the same way, so both paths number the window's positions from 0.)

This is inference only: no dropout, no caches for backward.
"""
import numpy

from ..backend import to_host
from ..checks import NON_NEGATIVE, POSITIVE, POSITIVE_FRACTION, Range, check_integer, check_number
from .gpt import check_model, check_token_ids


class KVCache:
    """Keys and values of every layer for up to `capacity` positions (default
    and at most block_size; generate asks for no more than a sample needs,
    so a model of a long block_size does not hold a cache that long).

    keys[i], values[i]: (B, H_kv, capacity, D) on the model's device, in its
    compute dtype (the 16-bit one in mixed precision, as forward's keys and
    values); positions [0, length) are filled. All sequences in the batch share
    the same length.
    """

    def __init__(self, model, batch_size, capacity=None):
        self.batch_size = check_integer("KVCache batch_size", batch_size, POSITIVE)
        block_size = model.config.block_size
        self.capacity = block_size if capacity is None else \
            check_integer("KVCache capacity", capacity, Range(1, block_size))
        shape = self._shape(model)
        model.device.activate()
        xp = model.xp
        dtype = model.compute_dtype
        self.keys = [xp.zeros(shape, dtype=dtype) for _ in range(model.config.n_layer)]
        self.values = [xp.zeros(shape, dtype=dtype) for _ in range(model.config.n_layer)]
        self.length = 0

    def _shape(self, model):
        cfg = model.config
        return (self.batch_size, cfg.kv_heads, self.capacity, cfg.head_size)

    @property
    def is_full(self):
        return self.length >= self.capacity

    def layer(self, i):
        """What block i's attention appends to and reads from in this call."""
        return LayerKV(self.keys[i], self.values[i], self.length)

    def _check_fits(self, model):
        if self.capacity > model.config.block_size:
            raise ValueError(f"KVCache of {self.capacity} positions is longer than this model's "
                             f"block_size {model.config.block_size}")
        expected = self._shape(model)
        if len(self.keys) != model.config.n_layer or tuple(self.keys[0].shape) != expected:
            raise ValueError(f"KVCache of {len(self.keys)} layers x {tuple(self.keys[0].shape)} "
                             f"does not fit this model ({model.config.n_layer} layers x {expected})")


class LayerKV:
    """One layer's cache as attention_forward sees it: the new positions'
    keys and values are written from `start` on."""

    def __init__(self, keys, values, start):
        self.keys, self.values, self.start = keys, values, start

    def append(self, k, v):
        """k, v: (B, H_kv, T, D) of positions start .. start+T-1; returns start."""
        T = k.shape[2]
        self.keys[:, :, self.start:self.start + T] = k
        self.values[:, :, self.start:self.start + T] = v
        return self.start


def prefill(model, idx, cache=None):
    """Run a prompt through the model, filling a cache.

    idx: (B, T) ints with T <= block_size. `cache`, when given, must have
    batch size B and room for T positions; it is overwritten (a fresh one of
    block_size positions is made otherwise).
    Returns (logits (B, V) of the last position, cache) with cache.length == T.
    """
    idx = model.check_ids(idx, "idx")
    B, T = idx.shape
    if cache is None:
        cache = KVCache(model, B)
    else:
        cache._check_fits(model)
        if cache.batch_size != B:
            raise ValueError(f"prefill: cache batch size {cache.batch_size} does not match "
                             f"the prompt batch size {B}")
        if T > cache.capacity:
            raise ValueError(f"prefill: {T} positions do not fit the cache's {cache.capacity}")
    cache.length = 0
    return _forward_cached(model, idx, cache), cache


def decode_step(model, cache, token_ids):
    """Feed one new token per sequence at position cache.length.

    token_ids: (B,) ints. Appends this position's keys and values to the cache
    and returns the logits (B, V) for the position after it. A full cache
    (length == its capacity) raises ValueError: rebuild it with `prefill` on a
    cropped window.
    """
    cache._check_fits(model)
    if cache.is_full:
        raise ValueError(f"decode_step: the cache is full ({cache.capacity} positions); "
                         f"rebuild it with prefill on a cropped window")
    if not hasattr(token_ids, "shape"):
        token_ids = numpy.asarray(token_ids)
    if token_ids.ndim != 1 or token_ids.shape[0] != cache.batch_size:
        raise ValueError(f"decode_step: token_ids must have shape ({cache.batch_size},), "
                         f"got {tuple(token_ids.shape)}")
    ids = model.check_ids(token_ids.reshape(cache.batch_size, 1), "token_ids")
    return _forward_cached(model, ids, cache)


def _forward_cached(model, ids, cache):
    """ids: (B, T) at positions cache.length .. +T-1 through `GPT.forward_cached`
    (forward's blocks, weights and dtypes), each block attending over the
    cache -> logits (B, V) of the last one."""
    logits = model.forward_cached(ids, cache)
    cache.length += ids.shape[1]
    return logits


# ---- sampling -------------------------------------------------------------------

def check_sampling(temperature, top_k, top_p):
    """The sampling settings of `sample_next`: temperature >= 0 (0 is greedy),
    top_k None or >= 1, top_p None or in (0, 1]; a one-line ValueError naming one."""
    check_number("temperature", temperature, NON_NEGATIVE)
    if top_k is not None:
        check_integer("top_k", top_k, POSITIVE)
    if top_p is not None:
        check_number("top_p", top_p, POSITIVE_FRACTION)


def _check_vocab_limit(vocab_limit, vocab_size):
    if vocab_limit is not None:
        check_integer("vocab_limit", vocab_limit, Range(1, vocab_size))


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, rng=None, vocab_limit=None):
    """Draw one token id from a host logit vector.

    logits: (V,). Only ids below vocab_limit are drawn (every id when None).
    temperature 0 is greedy (argmax, lowest id on ties); otherwise the
    logits are divided by it, then top_k keeps the k largest, and top_p
    keeps the smallest set of most likely tokens whose probabilities (after
    top_k) sum to >= top_p, never fewer than one. Ids whose logit is +inf
    share all the probability; a NaN logit raises ValueError.
    rng: a numpy Generator (a fresh unseeded one when None).
    """
    check_sampling(temperature, top_k, top_p)
    logits = numpy.asarray(logits, dtype=numpy.float64)
    if logits.ndim != 1 or logits.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty (V,) vector, got shape {logits.shape}")
    _check_vocab_limit(vocab_limit, logits.shape[0])
    logits = _resolve_infinities(logits[:vocab_limit])   # (vocab_limit,): the ids a tokenizer has
    if temperature == 0:
        return int(numpy.argmax(logits))
    if rng is None:
        rng = numpy.random.default_rng()
    elif not isinstance(rng, numpy.random.Generator):
        raise TypeError(f"rng must be None or a numpy.random.Generator, got {rng!r}")
    # shift before dividing: a tiny temperature then gives -large or -inf, never inf - inf
    with numpy.errstate(over="ignore"):
        scaled = (logits - logits.max()) / temperature
    # a filter that keeps every id is none: the draw is then the same as without it
    top_k = None if top_k is not None and top_k >= scaled.shape[0] else top_k
    top_p = None if top_p is not None and top_p >= 1 else top_p
    if top_k is None and top_p is None:
        ids = None
    else:
        ids = numpy.argsort(-scaled, kind="stable")     # most likely first, ties by id
        if top_k is not None:
            ids = ids[:top_k]
        scaled = scaled[ids]
    probs = numpy.exp(scaled)
    probs /= probs.sum()
    if top_p is not None:
        # cumulative[n-1] >= top_p for the first time at n = searchsorted + 1
        cumulative = numpy.cumsum(probs)
        keep = min(int(numpy.searchsorted(cumulative, top_p, side="left")) + 1, probs.shape[0])
        probs = probs[:keep] / cumulative[keep - 1]
    cumulative = numpy.cumsum(probs)
    choice = int(numpy.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    choice = min(choice, probs.shape[0] - 1)
    return int(ids[choice]) if ids is not None else choice


def _resolve_infinities(logits):
    """`logits`, or where some are +inf: 0 for those and -inf for the rest, so
    that the +inf ids share all the probability. NaN, or no logit above
    -inf, is refused: the model's output is then not finite."""
    nan = numpy.isnan(logits)
    if nan.any():
        raise ValueError(f"the model's output is not finite: the logit of token "
                         f"{int(numpy.argmax(nan))} is NaN")
    top = logits.max()
    if top == -numpy.inf:
        raise ValueError("the model's output is not finite: every logit is -inf")
    if top == numpy.inf:
        return numpy.where(logits == numpy.inf, 0.0, -numpy.inf)
    return logits


# ---- generation -----------------------------------------------------------------

def _check_prompt(prompt_ids, vocab_size):
    prompt = numpy.asarray(to_host(prompt_ids))
    if prompt.size == 0:
        raise ValueError("prompt_ids is empty: generation needs at least one token")
    if prompt.ndim != 1:
        raise ValueError(f"prompt_ids must be a 1-D sequence of token ids, got shape "
                         f"{prompt.shape}")
    check_token_ids("prompt_ids", prompt, vocab_size)
    return [int(t) for t in prompt]


def _check_stop_id(stop_id, drawable):
    """stop_id must be an id generation can draw (below `drawable`), or it never fires."""
    if stop_id is not None:
        check_integer("stop_id", stop_id, Range(0, drawable, high_inclusive=False))


def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             seed=None, stop_id=None, use_cache=True, vocab_limit=None):
    """Stream up to max_new_tokens new token ids continuing prompt_ids.

    prompt_ids: a non-empty 1-D sequence of ints (one sequence). Sampling is
    as in `sample_next`, with a numpy Generator seeded by `seed`; pass the
    tokenizer's vocab_size as vocab_limit when the ids are decoded. Stops early
    when stop_id is drawn (it is not yielded). With use_cache=False every
    step runs `model.forward` on the last block_size tokens; with the cache
    the same windows are evaluated incrementally, giving the same tokens.
    The model runs in eval mode during each step; its mode is restored
    before each token is yielded. Arguments are checked here, before the
    first token is asked for.
    """
    check_model(model, "generate")
    context = _check_prompt(prompt_ids, model.config.vocab_size)
    check_integer("max_new_tokens", max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    _check_vocab_limit(vocab_limit, model.config.vocab_size)
    _check_stop_id(stop_id, model.config.vocab_size if vocab_limit is None else vocab_limit)
    seed = None if seed is None else check_integer("seed", seed)
    if not isinstance(use_cache, bool):
        raise ValueError(f"use_cache must be True or False, got {use_cache!r}")
    positions = min(model.config.block_size, len(context) + int(max_new_tokens))
    next_logits = _cached_logits(model, positions) if use_cache else _uncached_logits(model)
    return _stream(model, context, int(max_new_tokens), next_logits, temperature, top_k,
                   top_p, numpy.random.default_rng(seed), stop_id, vocab_limit)


def _stream(model, context, max_new_tokens, next_logits, temperature, top_k, top_p, rng,
            stop_id, vocab_limit):
    for _ in range(max_new_tokens):
        with model.evaluating():
            logits = next_logits(context)
        token = sample_next(logits, temperature, top_k, top_p, rng, vocab_limit)
        if stop_id is not None and token == stop_id:
            return
        context.append(token)
        yield token


def _window(context, block_size):
    """The last block_size tokens as a (1, T) host array."""
    return numpy.array([context[-block_size:]], dtype=numpy.int64)


def _uncached_logits(model):
    """context (list of ids) -> host logits (V,) of its last cropped position."""
    block_size = model.config.block_size

    def next_logits(context):
        return to_host(model.forward(_window(context, block_size))[0, -1])
    return next_logits


def _cached_logits(model, capacity):
    """Like _uncached_logits, but through a KVCache of `capacity` positions.

    While the context fits in block_size, each call feeds only the token
    appended since the last call. Past that, every window is shifted by one,
    and with it every position embedding, so the cache is refilled from the
    cropped window: the logits are those of the same window the uncached
    path evaluates.
    """
    block_size = model.config.block_size
    cache, seen = KVCache(model, 1, capacity), 0   # seen: the context length the cache reflects

    def next_logits(context):
        nonlocal cache, seen
        if seen and len(context) == seen + 1 and not cache.is_full:
            logits = decode_step(model, cache, numpy.array([context[-1]], dtype=numpy.int64))
        else:
            logits, cache = prefill(model, _window(context, block_size), cache)
        seen = len(context)
        return to_host(logits[0])
    return next_logits
