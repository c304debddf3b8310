"""Generation: the KV cache against the full forward, cached against uncached
generation, and the sampling rules."""
import warnings

import numpy as np
import pytest

import xpmodel
from xpmodel.model import generate as gen
from xpmodel.model.generate import KVCache, decode_step, generate, prefill, sample_next

TINY = xpmodel.GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16)


def tiny_model(dtype="float64", seed=0):
    """Random weights at a larger scale than GPT-2's init, random biases and
    LayerNorm affines: every term of the forward matters and the logits are
    spread out, so greedy choices are far from ties."""
    model = xpmodel.GPT(TINY, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for name, view in model.params.items():
        is_gain = name.endswith("ln_1.weight") or name.endswith("ln_2.weight") \
            or name == "ln_f.weight"
        view[...] = rng.normal(1.0 if is_gain else 0.0, 0.3 if view.ndim == 2 else 0.1,
                               view.shape)
    return model


def ids(n, seed=0, batch=None):
    rng = np.random.default_rng(seed)
    return rng.integers(0, TINY.vocab_size, n if batch is None else (batch, n))


def relative_error(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ---- the cache against the full forward --------------------------------------------

@pytest.mark.parametrize("T", [1, 7, 16])
def test_prefill_matches_forward_last_position(T):
    model = tiny_model()
    idx = ids(T, batch=3)
    logits, cache = prefill(model, idx)
    assert logits.shape == (3, TINY.vocab_size)
    assert cache.length == T
    assert relative_error(logits, model.forward(idx)[:, -1]) < 1e-12


def test_each_decode_step_matches_forward_on_the_extended_sequence():
    model = tiny_model()
    seq = ids(TINY.block_size, seed=1, batch=2)
    logits, cache = prefill(model, seq[:, :3])
    for t in range(3, TINY.block_size):
        logits = decode_step(model, cache, seq[:, t])
        assert cache.length == t + 1
        full = model.forward(seq[:, :t + 1])[:, -1]
        assert relative_error(logits, full) < 1e-10, t


def test_decode_step_on_a_full_cache_is_refused():
    model = tiny_model()
    _, cache = prefill(model, ids(TINY.block_size, batch=1))
    with pytest.raises(ValueError, match="full"):
        decode_step(model, cache, np.array([1]))


def test_prefill_reuses_a_given_cache_and_checks_its_batch():
    model = tiny_model()
    cache = KVCache(model, 2)
    assert cache.keys[0].shape == (2, TINY.n_head, TINY.block_size, TINY.n_embd // TINY.n_head)
    assert len(cache.values) == TINY.n_layer
    _, same = prefill(model, ids(5, batch=2), cache)
    assert same is cache and cache.length == 5
    with pytest.raises(ValueError, match="batch"):
        prefill(model, ids(5, batch=3), cache)
    with pytest.raises(ValueError, match="shape"):
        decode_step(model, cache, np.array([1, 2, 3]))


def test_float32_cache_matches_forward():
    model = tiny_model("float32")
    seq = ids(8, seed=2, batch=1)
    logits, cache = prefill(model, seq[:, :5])
    assert cache.keys[0].dtype == np.float32
    for t in range(5, 8):
        logits = decode_step(model, cache, seq[:, t])
    assert relative_error(logits, model.forward(seq)[:, -1]) < 1e-5


MODERN = xpmodel.GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=4, n_embd=32,
                           norm="rmsnorm", position="rope", mlp="swiglu", n_kv_head=2, bias=False,
                           qk_norm=True, tie_embeddings=False)


def mixed_precision_model(precision):
    """A Llama-style model in mixed precision with weights spread out past
    the init's, so 16-bit rounding moves the logits visibly."""
    model = xpmodel.GPT(MODERN, precision=precision, seed=1)
    rng = np.random.default_rng(1)
    model.flat_params += rng.normal(0.0, 0.3, model.flat_params.shape).astype(np.float32)
    return model


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_cache_runs_forwards_weights_and_dtype(precision):
    model = mixed_precision_model(precision)
    seq = ids(MODERN.block_size, seed=9, batch=2)
    logits, cache = prefill(model, seq[:, :5])
    assert cache.keys[0].dtype == model.compute_dtype
    assert relative_error(logits, model.forward(seq[:, :5])[:, -1]) < 1e-6
    for t in range(5, MODERN.block_size):
        logits = decode_step(model, cache, seq[:, t])
        assert relative_error(logits, model.forward(seq[:, :t + 1])[:, -1]) < 1e-2, t


# ---- cached against uncached generation --------------------------------------------

def run(model, prompt, n, **kwargs):
    return list(generate(model, prompt, n, **kwargs))


@pytest.mark.parametrize("prompt_len", [10, 20])
def test_greedy_cached_equals_uncached_past_block_size(prompt_len):
    model = tiny_model()
    prompt = ids(prompt_len, seed=3)
    cached = run(model, prompt, 30, temperature=0)
    uncached = run(model, prompt, 30, temperature=0, use_cache=False)
    assert len(cached) == 30
    assert cached == uncached


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_greedy_cached_equals_uncached(precision):
    model = mixed_precision_model(precision)
    cached = run(model, [1, 2, 3], 20, temperature=0)
    assert cached == run(model, [1, 2, 3], 20, temperature=0, use_cache=False)


@pytest.mark.parametrize("options", [dict(), dict(top_k=5), dict(top_p=0.9),
                                     dict(top_k=8, top_p=0.8, temperature=0.7)])
def test_seeded_sampling_cached_equals_uncached_and_is_reproducible(options):
    model = tiny_model()
    prompt = ids(10, seed=4)
    cached = run(model, prompt, 30, seed=7, **options)
    assert cached == run(model, prompt, 30, seed=7, use_cache=False, **options)
    assert cached == run(model, prompt, 30, seed=7, **options)
    assert cached != run(model, prompt, 30, seed=8, **options)


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = tiny_model()
    prompt = ids(6, seed=5)
    greedy = run(model, prompt, 20, temperature=0)
    assert run(model, prompt, 20, top_k=1, seed=1) == greedy
    assert run(model, prompt, 20, top_p=1e-9, seed=1) == greedy


def test_stop_id_ends_generation_without_being_yielded():
    model = tiny_model()
    prompt = ids(6, seed=6)
    tokens = run(model, prompt, 20, seed=2)
    stop = tokens[5]
    first = tokens.index(stop)
    assert run(model, prompt, 20, seed=2, stop_id=stop) == tokens[:first]
    assert run(model, prompt, 0) == []


def test_cached_generation_never_calls_the_full_forward(monkeypatch):
    model = tiny_model()

    def no_full_forward(idx):
        raise AssertionError("the cached path ran model.forward")
    monkeypatch.setattr(model, "forward", no_full_forward)
    calls = {"prefill": 0, "decode": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped
    monkeypatch.setattr(gen, "prefill", counting("prefill", gen.prefill))
    monkeypatch.setattr(gen, "decode_step", counting("decode", gen.decode_step))
    tokens = run(model, ids(6, seed=8), 10, seed=3)
    # one prompt pass, then one single-position step per further token
    assert len(tokens) == 10 and calls == {"prefill": 1, "decode": 9}


def test_mode_is_eval_during_steps_and_restored(monkeypatch):
    model = tiny_model()
    modes = []
    forward = model.forward

    def recording_forward(idx):
        modes.append(model.training)
        return forward(idx)
    monkeypatch.setattr(model, "forward", recording_forward)

    model.train()
    stream = generate(model, ids(4), 5, use_cache=False, seed=0)
    next(stream)
    assert model.training                 # restored while the caller holds the stream
    list(stream)
    assert modes == [False] * 5 and model.training

    model.eval()
    run(model, ids(4), 5, seed=0)
    assert not model.training


# ---- sample_next -------------------------------------------------------------------

def test_sample_next_respects_top_k():
    logits = np.random.default_rng(0).normal(size=TINY.vocab_size)
    top = set(np.argsort(logits)[-5:].tolist())
    rng = np.random.default_rng(1)
    drawn = {sample_next(logits, 3.0, top_k=5, rng=rng) for _ in range(2000)}
    assert drawn == top
    assert sample_next(logits, 1.0, top_k=1000, rng=rng) in range(TINY.vocab_size)


def test_sample_next_respects_top_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(probs)
    rng = np.random.default_rng(2)
    draws = [sample_next(logits, 1.0, top_p=0.7, rng=rng) for _ in range(4000)]
    assert set(draws) == {1, 3}
    assert abs(draws.count(1) / len(draws) - 0.5 / 0.8) < 0.03   # renormalised over the kept set
    assert set(sample_next(logits, 1.0, top_p=0.9, rng=rng) for _ in range(500)) == {1, 2, 3}
    assert set(sample_next(logits, 1.0, top_p=1.0, rng=rng) for _ in range(500)) == {0, 1, 2, 3}
    assert sample_next(logits, 1.0, top_p=0.4, rng=rng) == 1


def test_a_filter_that_keeps_every_id_draws_as_none_does():
    """sample --top-p 1 or --top-k V (the defaults, given) with a seed gives
    the text the seed gives without them."""
    logits = np.random.default_rng(3).normal(size=TINY.vocab_size)
    for kwargs in ({"top_p": 1.0}, {"top_k": TINY.vocab_size}, {"top_k": 10 ** 6},
                   {"top_k": TINY.vocab_size, "top_p": 1.0}):
        plain, filtered = np.random.default_rng(4), np.random.default_rng(4)
        assert [sample_next(logits, 0.8, rng=plain) for _ in range(200)] == \
            [sample_next(logits, 0.8, rng=filtered, **kwargs) for _ in range(200)], kwargs


def test_sample_next_greedy_and_temperature():
    logits = np.array([0.0, 2.0, 2.0, -1.0])
    assert sample_next(logits, 0.0) == 1                   # argmax, lowest id on ties
    assert sample_next(logits, 1e-300, rng=np.random.default_rng(0)) in (1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no overflow warning on the way
        assert sample_next(logits, 1e-320, rng=np.random.default_rng(0)) in (1, 2)
    assert sample_next(np.array([-np.inf, 0.0, -np.inf]), 1.0,
                       rng=np.random.default_rng(0)) == 1


def test_infinite_logits_share_all_the_probability():
    logits = np.array([0.0, np.inf, 1.0, np.inf, 50.0])
    rng = np.random.default_rng(0)
    assert sample_next(logits, 0.0) == 1
    draws = [sample_next(logits, 1.0, rng=rng) for _ in range(2000)]
    assert set(draws) == {1, 3} and abs(draws.count(1) / len(draws) - 0.5) < 0.05
    assert {sample_next(logits, 0.7, top_k=3, rng=rng) for _ in range(200)} == {1, 3}
    assert {sample_next(logits, 1.0, top_k=1, rng=rng) for _ in range(50)} == {1}
    assert {sample_next(logits, 1.0, top_p=0.5, rng=rng) for _ in range(50)} == {1}
    assert sample_next(np.array([0.0, np.inf, 1.0]), 1.0, rng=rng) == 1


@pytest.mark.parametrize("logits", [[0.0, np.nan, 1.0], [-np.inf, -np.inf], [np.nan, np.inf]])
def test_logits_that_are_not_finite_are_refused(logits):
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match="model's output is not finite"):
            sample_next(np.array(logits), temperature, rng=np.random.default_rng(0))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_model_with_nan_weights_says_its_output_is_not_finite(temperature):
    model = tiny_model()
    model.flat_params[:] = np.nan
    with pytest.raises(ValueError, match="model's output is not finite"):
        run(model, [1, 2], 5, temperature=temperature, seed=0)


def test_sample_next_draws_only_ids_below_vocab_limit():
    logits = np.array([0.0, 1.0, 2.0, 9.0, 9.0])       # ids 3 and 4 pad the vocabulary
    rng = np.random.default_rng(0)
    assert sample_next(logits, 0.0, vocab_limit=3) == 2
    for options in (dict(), dict(top_k=4), dict(top_p=0.99)):
        drawn = {sample_next(logits, 5.0, rng=rng, vocab_limit=3, **options) for _ in range(500)}
        assert drawn == {0, 1, 2}, options


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_never_draws_an_id_at_or_past_vocab_limit(use_cache):
    model = tiny_model()
    prompt = ids(6, seed=10)
    limit = max(run(model, prompt, 20, temperature=0))    # greedy would draw this id
    greedy = run(model, prompt, 20, temperature=0, vocab_limit=limit, use_cache=use_cache)
    sampled = run(model, prompt, 200, temperature=5.0, seed=0, vocab_limit=limit,
                  use_cache=use_cache)
    assert max(greedy) < limit and max(sampled) < limit
    assert len(set(sampled)) > limit // 2


@pytest.mark.parametrize("rng", [0, "seed", np.random.default_rng])
def test_sample_next_refuses_an_rng_that_is_not_a_generator(rng):
    with pytest.raises(TypeError, match="rng must be None or a numpy.random.Generator"):
        sample_next(np.zeros(4), 1.0, rng=rng)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(prompt_ids=[]), "empty"),
    (dict(prompt_ids=[1, TINY.vocab_size]), "token ids"),
    (dict(stop_id="x"), "stop_id"),
    (dict(stop_id=10**9), "stop_id"),
    (dict(stop_id=-1), "stop_id"),
    (dict(stop_id=35, vocab_limit=30), "stop_id"),    # past the ids that can be drawn
    (dict(vocab_limit=0), "vocab_limit"),
    (dict(vocab_limit=TINY.vocab_size + 1), "vocab_limit"),
    (dict(vocab_limit=3.0), "vocab_limit"),
    (dict(seed=-1), "seed must be an integer >= 0, got -1"),
    (dict(seed="a"), "seed must be an integer >= 0, got 'a'"),
    (dict(seed=1.5), "seed must be an integer >= 0, got 1.5"),
])
def test_bad_arguments_raise_when_generate_is_called(kwargs, match):
    model = tiny_model()
    args = dict(prompt_ids=[1, 2, 3], max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, **args)          # raised before the first token is asked for
    if "temperature" in kwargs or "top_k" in kwargs or "top_p" in kwargs:
        sampling = {k: v for k, v in kwargs.items() if k in ("temperature", "top_k", "top_p")}
        with pytest.raises(ValueError, match=match):
            sample_next(np.zeros(4), **sampling)
