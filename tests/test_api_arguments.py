"""The Python API refuses what would train nonsense, with one line naming the
argument: rates set after construction, clipping and scale arguments, a
model's dtype, parameter and optimizer state with values that cannot be
weights, loss-scaler settings, and export arguments; and an export never
replaces files it was not told it may."""
import math

import numpy as np
import pytest

import xpmodel
from xpmodel.errors import UsageError, XpmodelError
from xpmodel.train.muon import NON_FINITE_MOMENTUM
from xpmodel.train.optim import clipped_step

CONFIG = xpmodel.GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16)


def model_with_gradients():
    model = xpmodel.GPT(CONFIG, seed=0)
    ids = np.random.default_rng(0).integers(0, 64, (2, 8))
    model.forward_backward(ids, ids)
    return model


@pytest.mark.parametrize("make", [lambda m: xpmodel.AdamW(m, 1e-3), lambda m: xpmodel.SGD(m, 1e-3),
                                  lambda m: xpmodel.Muon(m, 1e-3)], ids=["adamw", "sgd", "muon"])
@pytest.mark.parametrize("rate", [math.nan, math.inf, -1e-2, "0.1", None])
def test_a_rate_set_after_construction_is_checked(make, rate):
    optimizer = make(model_with_gradients())
    with pytest.raises(ValueError, match="^lr must be a finite number >= 0"):
        optimizer.lr = rate
    assert optimizer.lr == 1e-3
    optimizer.lr = 0          # where a schedule may end, Muon's included
    assert optimizer.lr == 0.0


@pytest.mark.parametrize("schedule", [xpmodel.CosineSchedule(3e-4, 3e-5, 10, 100),
                                      xpmodel.ConstantSchedule(1e-3, 5)])
@pytest.mark.parametrize("step", [-100, math.nan, 2.5, "3"])
def test_a_schedule_refuses_a_step_that_is_not_a_count(schedule, step):
    with pytest.raises(ValueError, match="^step must be an integer >= 0"):
        schedule(step)


@pytest.mark.parametrize("grad_clip,scale,culprit", [(-1.0, 1.0, "grad_clip"), (math.nan, 1.0, "grad_clip"),
                                                     ("1", 1.0, "grad_clip"), (1.0, 0.0, "scale"),
                                                     (1.0, -1.0, "scale"), (1.0, math.inf, "scale")])
def test_clipped_step_checks_its_arguments_before_stepping(grad_clip, scale, culprit):
    model = model_with_gradients()
    before = model.flat_params.copy()
    with pytest.raises(ValueError, match=f"^{culprit} must be"):
        clipped_step(xpmodel.AdamW(model, 1e-2), grad_clip, scale)
    assert np.array_equal(model.flat_params, before)


def test_clipped_step_drives_sgd_as_it_drives_adamw():
    """SGD.step takes grad_scale and apply as AdamW's does: clipped_step
    clips its gradients, and skips a step whose gradients are not finite."""
    clipped, by_hand = model_with_gradients(), model_with_gradients()
    norm, finite = clipped_step(xpmodel.SGD(clipped, 0.1), 0.5)
    assert bool(finite) and float(norm) > 0.5
    xpmodel.clip_grad_norm(by_hand, 0.5)
    xpmodel.SGD(by_hand, 0.1).step()
    np.testing.assert_allclose(clipped.flat_params, by_hand.flat_params, rtol=1e-6, atol=1e-9)
    before = clipped.flat_params.copy()
    clipped.flat_grads[0] = math.nan
    _, finite = clipped_step(xpmodel.SGD(clipped, 0.1), 0.5)
    assert not bool(finite) and np.array_equal(clipped.flat_params, before)


def test_muon_names_gradients_that_are_not_finite():
    """Not the Newton-Schulz coefficients, which the overflow message blames."""
    model = model_with_gradients()
    before = model.flat_params.copy()
    model.flat_grads[:] = math.nan
    with pytest.raises(XpmodelError, match="^" + NON_FINITE_MOMENTUM.split(":")[0]):
        xpmodel.Muon(model, 1e-3).step()
    assert np.array_equal(model.flat_params, before)


@pytest.mark.parametrize("dtype", [np.int32, bool, np.complex128, object, None, "int8"])
def test_a_model_refuses_a_dtype_that_is_not_a_float(dtype):
    with pytest.raises(ValueError, match="^(unknown )?dtype .*: expected float32 or float64 "
                                         r"\(float16 and bfloat16 train as mixed precision"):
        xpmodel.GPT(CONFIG, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float16", np.float16])
def test_a_16_bit_dtype_points_to_mixed_precision(dtype):
    precision = "fp16"
    with pytest.raises(ValueError, match="GPT parameters are float32 or float64; .* trains as "
                                         f"mixed precision over float32 weights: "
                                         f"precision='{precision}'"):
        xpmodel.GPT(CONFIG, dtype=dtype)
    assert xpmodel.GPT(CONFIG, precision=precision).precision == precision


@pytest.mark.parametrize("value,problem", [(math.nan, "not finite"), (1e300, "not finite"),
                                           (1 + 2j, "real numbers"), ("a", "real numbers")])
def test_parameters_that_cannot_be_weights_are_refused_before_any_is_copied(value, problem):
    model = xpmodel.GPT(CONFIG, seed=0)
    arrays = {name: array.copy() for name, array in model.state_arrays().items()}
    name = model.layout.names[-1]
    arrays[name] = np.full(arrays[name].shape, value)
    before = model.flat_params.copy()
    with pytest.raises(ValueError, match=f"^parameter {name}.*{problem}"):
        model.load_state_arrays(arrays)
    assert np.array_equal(model.flat_params, before)
    with pytest.raises(ValueError, match="^parameters must be a mapping"):
        model.load_state_arrays(None)
    arrays[name] = arrays[name].tolist()
    with pytest.raises(ValueError, match=f"^parameter {name}: shape None"):
        model.load_state_arrays(arrays)


def test_optimizer_state_that_cannot_be_moments_is_refused():
    model = model_with_gradients()
    optimizer = xpmodel.AdamW(model, 1e-3)
    m, v = np.zeros_like(optimizer.m), np.zeros_like(optimizer.v)
    with pytest.raises(ValueError, match="^optimizer state v holds negative values"):
        optimizer.load_state(m, v - 1.0, 3)
    with pytest.raises(ValueError, match="^optimizer state m holds values that are not finite"):
        optimizer.load_state(m + math.nan, v, 3)
    muon = xpmodel.Muon(model, 1e-3)
    state = {name: np.zeros_like(array) for name, array in muon.state_arrays().items()}
    state["muon_momentum"][0] = math.inf
    with pytest.raises(ValueError, match="^optimizer state muon_momentum holds values that are not"):
        muon.load_state_arrays(state, 3)
    assert optimizer.step_count == 0 and muon.step_count == 0


@pytest.mark.parametrize("arguments,culprit", [({"scale": math.nan}, "scale"), ({"scale": 0.5}, "scale"),
                                               ({"growth_interval": 0}, "growth_interval"),
                                               ({"growth_interval": 1.5}, "growth_interval"),
                                               ({"xp": "numpy"}, "xp")])
def test_a_loss_scaler_checks_its_settings(arguments, culprit):
    with pytest.raises(ValueError, match=f"^{culprit} must be"):
        xpmodel.LossScaler(**arguments)


def test_a_loss_scaler_checks_a_state_before_taking_it():
    scaler = xpmodel.LossScaler()
    good = scaler.state_dict()
    for state, culprit in [({}, "a loss scaler's state"), (dict(good, good_steps=-5), "good_steps"),
                           (dict(good, scale=math.inf), "scale")]:
        with pytest.raises(ValueError, match=f"^{culprit}"):
            scaler.load_state_dict(state)
    assert scaler.state_dict() == good


@pytest.fixture
def tokenizer():
    from xpmodel.tokenizer.bpe import BPETokenizer
    return BPETokenizer.train(["hello world, hello there"] * 4, 260)


def test_an_export_refuses_special_ids_it_would_not_write(tokenizer, tmp_path):
    from xpmodel.hf.convert import export_hf
    model = xpmodel.GPT(xpmodel.GPTConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=1,
                                          n_head=2, n_embd=16))
    for special_ids in [{"eos_token": 256}, "256"]:
        with pytest.raises(UsageError, match="^special_ids must be a dict of bos_token_id and/or"):
            export_hf(model, tokenizer, tmp_path / "out", special_ids=special_ids)
    assert not (tmp_path / "out").exists()
    export_hf(model, tokenizer, tmp_path / "out", special_ids={"eos_token_id": np.int64(5)})
    assert '"eos_token_id": 5' in (tmp_path / "out" / "config.json").read_text()


def test_a_tokenizer_export_replaces_files_only_when_told(tokenizer, tmp_path):
    from xpmodel.tokenizer.hf_export import export_tokenizer_hf
    (tmp_path / "tokenizer.json").write_text("mine")
    with pytest.raises(UsageError, match="tokenizer.json is already there; pass overwrite=True"):
        export_tokenizer_hf(tokenizer, tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]
    export_tokenizer_hf(tokenizer, tmp_path, overwrite=True)
    assert (tmp_path / "tokenizer.json").read_text() != "mine"
    with pytest.raises(TypeError, match="takes a BPETokenizer, got NoneType"):
        export_tokenizer_hf(None, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_long_block_size_costs_only_the_positions_a_pass_uses():
    """RoPE's tables grow with the positions asked for, and generation's cache
    holds the prompt and the new tokens, not block_size positions (a Llama
    import can have 131,072); the tokens are those of uncached generation."""
    import tracemalloc

    from xpmodel.model.generate import generate
    config = xpmodel.GPTConfig(vocab_size=64, block_size=2 ** 24, n_layer=1, n_head=2, n_embd=16,
                               position="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    model = xpmodel.GPT(config, seed=0)
    tracemalloc.start()
    try:
        logits = model.forward(np.arange(8).reshape(1, 8))
        cached = list(generate(model, [1, 2, 3], 5, seed=0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert logits.shape == (1, 8, 64) and peak < 16 * 2 ** 20
    assert cached == list(generate(model, [1, 2, 3], 5, seed=0, use_cache=False))


def test_options_are_checked_when_set_after_construction_too():
    from xpmodel.model.generate import generate
    model = xpmodel.GPT(CONFIG, seed=0)
    with pytest.raises(ValueError, match="^recompute must be one of none, mlp, block, got 'bogus'"):
        model.recompute = "bogus"
    with pytest.raises(ValueError, match="^kernels must be one of fused, xp"):
        model.kernels = "fast"
    assert (model.recompute, model.kernels) == ("none", "fused")
    with pytest.raises(ValueError, match="^use_cache must be True or False, got 'no'"):
        generate(model, [1, 2], 3, use_cache="no")
    config = xpmodel.GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16,
                               norm=np.str_("rmsnorm"))
    assert type(config.norm) is str      # so that the config serialises as YAML and JSON


def test_a_kv_cache_of_a_given_capacity():
    from xpmodel.model.generate import KVCache, decode_step, prefill
    model = xpmodel.GPT(CONFIG, seed=0)
    for capacity in (0, CONFIG.block_size + 1, True, 2.0):
        with pytest.raises(ValueError, match="^KVCache capacity must be an integer in"):
            KVCache(model, 1, capacity)
    cache = KVCache(model, 1, 3)
    assert tuple(cache.keys[0].shape) == (1, CONFIG.kv_heads, 3, CONFIG.head_size)
    with pytest.raises(ValueError, match="^prefill: 4 positions do not fit the cache's 3"):
        prefill(model, np.zeros((1, 4), int), cache)
    logits, cache = prefill(model, np.array([[1, 2]]), cache)
    decode_step(model, cache, np.array([3]))
    with pytest.raises(ValueError, match=r"^decode_step: the cache is full \(3 positions\)"):
        decode_step(model, cache, np.array([4]))
    short = xpmodel.GPT(xpmodel.GPTConfig(vocab_size=64, block_size=2, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="^KVCache of 3 positions is longer than this model's block_size 2"):
        prefill(short, np.array([[1]]), cache)


@pytest.mark.parametrize("call", [lambda m: xpmodel.AdamW(m, 1e-3), lambda m: xpmodel.SGD(m, 1e-3),
                                  lambda m: xpmodel.Muon(m, 1e-3), xpmodel.grad_norm,
                                  lambda m: xpmodel.clip_grad_norm(m, 1.0)],
                         ids=["adamw", "sgd", "muon", "grad_norm", "clip_grad_norm"])
@pytest.mark.parametrize("not_a_model", [None, CONFIG, {}], ids=["none", "config", "params"])
def test_what_takes_a_model_says_so(call, not_a_model):
    with pytest.raises(TypeError, match=f"takes a GPT model, got {type(not_a_model).__name__}"):
        call(not_a_model)


def test_generation_and_export_say_what_they_take(tokenizer, tmp_path):
    from xpmodel.hf.convert import export_hf
    from xpmodel.model.generate import generate
    with pytest.raises(TypeError, match="^generate takes a GPT model, got NoneType"):
        generate(None, [1], 2)
    with pytest.raises(TypeError, match="^export_hf takes a GPT model, got NoneType"):
        export_hf(None, tokenizer, tmp_path / "out")
    model = xpmodel.GPT(xpmodel.GPTConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=1,
                                          n_head=2, n_embd=16))
    with pytest.raises(TypeError, match="^export_hf takes a BPETokenizer, got NoneType"):
        export_hf(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()
