"""The whole model: against PyTorch autograd on the same weights, against
finite differences, and on the behaviour its API promises."""
import dataclasses
import json

import numpy as np
import pytest
import yaml

import xpmodel
from gradcheck import directional_check

torch = pytest.importorskip("torch")
from torch_gpt import torch_adamw, torch_forward, torch_loss, torch_params  # noqa: E402

TINY = xpmodel.GPTConfig(vocab_size=50, block_size=12, n_layer=2, n_head=4, n_embd=16)


def batch(config, B=3, T=10, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, config.vocab_size, (B, T))
    return idx, np.roll(idx, -1, axis=1)


def randomize(model, seed=1):
    """Random biases and LayerNorm affines, so every gradient path is exercised."""
    rng = np.random.default_rng(seed)
    for name, view in model.params.items():
        if view.ndim == 1:
            view[...] = rng.normal(1.0 if name.endswith("ln_1.weight") or name.endswith(
                "ln_2.weight") or name == "ln_f.weight" else 0.0, 0.1, view.shape)


def relative_error(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-9), ("float32", 1e-4)])
def test_matches_torch_logits_loss_and_every_gradient(dtype, tol):
    model = xpmodel.GPT(TINY, dtype=dtype, seed=3)
    randomize(model)
    idx, targets = batch(TINY)
    targets[0, 4] = -1                        # an ignored position
    loss = float(model.forward_backward(idx, targets))
    logits = model.forward(idx)

    tdtype = torch.float64 if dtype == "float64" else torch.float32
    tp = torch_params(model.state_arrays(), tdtype)
    t_idx, t_targets = torch.tensor(idx), torch.tensor(targets)
    t_logits = torch_forward(tp, t_idx, TINY.n_layer, TINY.n_head)
    t_loss = torch_loss(tp, t_idx, t_targets, TINY.n_layer, TINY.n_head)
    t_loss.backward()

    assert relative_error(logits, t_logits.detach().numpy()) < tol
    assert abs(loss - t_loss.item()) / t_loss.item() < tol
    for name, grad in model.grads.items():
        assert relative_error(grad, tp[name].grad.numpy()) < tol, name


def test_ten_adamw_steps_match_torch_in_float64():
    model = xpmodel.GPT(TINY, dtype="float64", seed=4)
    tp = torch_params(model.state_arrays(), torch.float64)
    opt = xpmodel.AdamW(model, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    topt = torch_adamw(tp, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours, theirs = [], []
    for step in range(10):
        idx, targets = batch(TINY, seed=step % 2)
        lr = 1e-2 * (step + 1) / 10
        model.zero_grad()
        ours.append(float(model.forward_backward(idx, targets)))
        xpmodel.clip_grad_norm(model, 0.5)
        opt.lr = lr
        opt.step()

        topt.zero_grad()
        loss = torch_loss(tp, torch.tensor(idx), torch.tensor(targets), TINY.n_layer, TINY.n_head)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 0.5)
        for group in topt.param_groups:
            group["lr"] = lr
        topt.step()
        theirs.append(loss.item())
    np.testing.assert_allclose(ours, theirs, rtol=1e-8)
    assert ours[-1] < ours[0]
    for name, value in model.params.items():
        assert relative_error(value, tp[name].detach().numpy()) < 1e-8, name


def test_whole_model_finite_differences():
    model = xpmodel.GPT(TINY, dtype="float64", seed=5)
    randomize(model)
    idx, targets = batch(TINY, B=2, T=6)
    model.forward_backward(idx, targets)
    flat_grad = model.flat_grads.copy()

    def loss_at(flat):
        return float(model.loss(idx, targets))
    error = directional_check(loss_at, model.flat_params, flat_grad, np.random.default_rng(0),
                              eps=3e-7, trials=4)
    assert error < 1e-7


def test_gradients_accumulate_and_scale():
    model = xpmodel.GPT(TINY, dtype="float64")
    idx, targets = batch(TINY)
    model.forward_backward(idx, targets)
    once = model.flat_grads.copy()
    model.forward_backward(idx, targets, scale=0.5)
    np.testing.assert_allclose(model.flat_grads, 1.5 * once, rtol=1e-12)
    model.zero_grad()
    assert not model.flat_grads.any()


def test_loss_matches_forward_backward_loss():
    model = xpmodel.GPT(TINY, dtype="float64")
    idx, targets = batch(TINY)
    assert float(model.loss(idx, targets)) == pytest.approx(float(model.forward_backward(idx, targets)), rel=1e-12)


def test_tiny_model_overfits_one_batch():
    config = xpmodel.GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = xpmodel.GPT(config, seed=0)
    opt = xpmodel.AdamW(model, lr=3e-3, weight_decay=0.0)
    idx, targets = batch(config, B=4, T=16)
    for _ in range(300):
        model.zero_grad()
        loss = float(model.forward_backward(idx, targets))
        xpmodel.clip_grad_norm(model, 1.0)
        opt.step()
    assert loss < 0.1


def test_params_are_views_of_the_flat_buffer_with_gpt2_names_and_shapes():
    model = xpmodel.GPT(TINY)
    C = TINY.n_embd
    assert model.params["wte.weight"].shape == (50, C)
    assert model.params["wpe.weight"].shape == (12, C)
    assert model.params["h.1.attn.c_attn.weight"].shape == (C, 3 * C)
    assert model.params["h.1.mlp.c_proj.weight"].shape == (4 * C, C)
    assert model.params["ln_f.bias"].shape == (C,)
    assert sum(v.size for v in model.params.values()) == model.flat_params.size
    model.params["ln_f.bias"][0] = 7.0
    assert 7.0 in model.flat_params
    model.grads["wte.weight"][0, 0] = 3.0
    assert 3.0 in model.flat_grads


def test_state_arrays_are_a_snapshot_that_training_leaves_alone():
    model = xpmodel.GPT(TINY)
    idx, targets = batch(TINY)
    snapshot = model.state_arrays()
    before = model.flat_params.copy()
    assert not any(np.shares_memory(a, model.flat_params) for a in snapshot.values())
    model.forward_backward(idx, targets)
    xpmodel.AdamW(model, lr=1e-2).step()
    assert not np.array_equal(model.flat_params, before)
    model.load_state_arrays(snapshot)
    assert np.array_equal(model.flat_params, before)


def test_initialisation_follows_gpt2():
    config = xpmodel.GPTConfig(vocab_size=500, block_size=64, n_layer=4, n_head=4, n_embd=128)
    model = xpmodel.GPT(config, seed=0)
    assert np.std(model.params["wte.weight"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(model.params["h.0.mlp.c_proj.weight"]) == pytest.approx(0.02 / np.sqrt(8), rel=0.05)
    assert np.all(model.params["h.0.ln_1.weight"] == 1) and np.all(model.params["h.0.attn.c_attn.bias"] == 0)
    again = xpmodel.GPT(config, seed=0, dtype="float64")
    np.testing.assert_allclose(again.params["wte.weight"], model.params["wte.weight"], rtol=1e-6)


def test_dropout_only_in_train_mode_and_seeded():
    config = xpmodel.GPTConfig(vocab_size=50, block_size=12, n_layer=2, n_head=4, n_embd=16, dropout=0.3)
    model = xpmodel.GPT(config, seed=2)
    idx, targets = batch(config)
    model.eval()
    assert float(model.forward_backward(idx, targets)) == float(model.forward_backward(idx, targets))
    model.train()
    first = float(model.forward_backward(idx, targets))
    second = float(model.forward_backward(idx, targets))
    assert first != second
    replay = xpmodel.GPT(config, seed=2)
    assert float(replay.forward_backward(idx, targets)) == first


def test_dropout_gradients_match_finite_differences():
    config = xpmodel.GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.2)
    model = xpmodel.GPT(config, dtype="float64", seed=1)
    idx, targets = batch(config, B=2, T=5)
    model.forward_backward(idx, targets)
    grad = model.flat_grads.copy()

    def loss_at(flat):
        model.dropout_calls = 0               # replay the same masks
        model.zero_grad()
        return float(model.forward_backward(idx, targets))
    assert directional_check(loss_at, model.flat_params, grad, np.random.default_rng(1), eps=3e-7) < 1e-7


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_embd=30, n_head=4), "divisible"),
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(block_size=2.5), "block_size"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_rejects_impossible_values(kwargs, match):
    values = dict(vocab_size=50, block_size=12, n_layer=2, n_head=4, n_embd=16)
    values.update(kwargs)
    with pytest.raises(ValueError, match=match):
        xpmodel.GPTConfig(**values)


def test_bad_inputs_are_clear_errors():
    model = xpmodel.GPT(TINY)
    with pytest.raises(ValueError, match="block_size"):
        model.forward(np.zeros((1, 13), dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        model.forward(np.full((1, 3), 50))
    with pytest.raises(ValueError, match="shape"):
        model.forward(np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="targets"):
        model.forward_backward(np.zeros((1, 3), dtype=np.int64), np.zeros((1, 4), dtype=np.int64))
    for bad in (50, -2):
        with pytest.raises(ValueError, match=r"targets: token ids must be in \[0, 50\) or -1"):
            model.forward_backward(np.zeros((1, 3), dtype=np.int64), np.full((1, 3), bad))
    with pytest.raises(ValueError, match="float32 or float64"):
        xpmodel.GPT(TINY, dtype="float16")


def test_clipped_step_unscales_clips_and_skips_non_finite_gradients():
    from xpmodel.train.optim import clip_grad_norm, clipped_step
    config = xpmodel.GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=16)
    models = [xpmodel.GPT(config, seed=2) for _ in range(2)]
    opts = [xpmodel.AdamW(m, lr=1e-2) for m in models]
    grads = np.random.default_rng(0).standard_normal(models[0].flat_grads.shape).astype(np.float32)
    scale = 512.0
    for model in models:
        model.flat_grads[...] = grads * scale
    models[0].flat_grads *= 1.0 / scale
    want_norm = clip_grad_norm(models[0], 1.0)
    opts[0].step()
    norm, finite = clipped_step(opts[1], 1.0, scale)
    assert bool(finite) and abs(float(norm) - float(want_norm)) < 1e-4 * float(want_norm)
    np.testing.assert_allclose(models[1].flat_params, models[0].flat_params, rtol=1e-5, atol=1e-7)
    before = models[1].flat_params.copy()
    models[1].flat_grads[3] = np.inf
    norm, finite = clipped_step(opts[1], 1.0, scale)
    assert not bool(finite) and opts[1].step_count == 1
    np.testing.assert_array_equal(models[1].flat_params, before)


# ---- arguments the API refuses, and NumPy scalars it takes ---------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(betas=(0.9,)), "betas must be a pair of numbers in [0, 1), got (0.9,)"),
    (dict(betas=0.9), "betas must be a pair of numbers in [0, 1), got 0.9"),
    (dict(betas=(0.9, 0.95, 0.99)), "betas must be a pair of numbers in [0, 1)"),
    (dict(betas=(0.9, 1.0)), "betas[1] must be a finite number in [0, 1), got 1.0"),
    (dict(lr=float("inf")), "lr must be a finite number >= 0, got inf"),
    (dict(eps=float("inf")), "eps must be a finite number in (0, 1], got inf"),
    (dict(eps=2.0), "eps must be a finite number in (0, 1], got 2.0"),
    (dict(weight_decay="0.1"), "weight_decay must be a finite number >= 0, got '0.1'"),
])
def test_adamw_refuses_arguments_that_cannot_work(kwargs, message):
    with pytest.raises(ValueError) as info:
        xpmodel.AdamW(xpmodel.GPT(TINY), **{"lr": 1e-3, **kwargs})
    assert message in str(info.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(momentum=-1), "momentum must be a finite number in [0, 1), got -1"),
    (dict(momentum=float("nan")), "momentum must be a finite number in [0, 1), got nan"),
    (dict(momentum=2.0), "momentum must be a finite number in [0, 1), got 2.0"),
    (dict(momentum="x"), "momentum must be a finite number in [0, 1), got 'x'"),
    (dict(weight_decay=-1), "weight_decay must be a finite number >= 0, got -1"),
    (dict(weight_decay="x"), "weight_decay must be a finite number >= 0, got 'x'"),
    (dict(lr=float("inf")), "lr must be a finite number >= 0, got inf"),
])
def test_sgd_refuses_arguments_that_cannot_work(kwargs, message):
    with pytest.raises(ValueError) as info:
        xpmodel.SGD(xpmodel.GPT(TINY), **{"lr": 0.1, **kwargs})
    assert message in str(info.value)


def test_optimizers_take_numpy_scalars_as_python_numbers():
    model = xpmodel.GPT(TINY)
    adamw = xpmodel.AdamW(model, lr=np.float32(0.5), betas=(np.float32(0.5), np.float64(0.75)),
                          eps=np.float32(0.125), weight_decay=np.int64(0))
    assert (adamw.lr, adamw.betas, adamw.eps, adamw.weight_decay) == (0.5, (0.5, 0.75), 0.125, 0.0)
    assert all(type(value) is float for value in (adamw.lr, *adamw.betas, adamw.eps, adamw.weight_decay))
    sgd = xpmodel.SGD(model, lr=np.float32(0.5), momentum=np.float32(0.5), weight_decay=np.float32(0.25))
    assert (sgd.lr, sgd.momentum, sgd.weight_decay) == (0.5, 0.5, 0.25)


def test_adamw_load_state_checks_names_shapes_and_steps_before_changing_anything():
    model = xpmodel.GPT(TINY)
    opt = xpmodel.AdamW(model, lr=1e-3)
    n = model.num_params()
    ones = {"m": np.ones(n, dtype=np.float32), "v": np.ones(n, dtype=np.float32)}
    for arrays, steps, message in [
        ({**ones, "m": np.zeros(1)}, 1, f"optimizer state m: shape (1,) does not match the optimizer's ({n},)"),
        ({**ones, "v": np.zeros(n + 5)}, 1, f"optimizer state v: shape ({n + 5},) does not match"),
        ({**ones, "m": np.zeros((n, 1))}, 1, f"optimizer state m: shape ({n}, 1) does not match"),
        ({"m": ones["m"]}, 1, "optimizer state names do not match: missing ['v'], unexpected []"),
        ({**ones, "w": ones["m"]}, 1, "missing [], unexpected ['w']"),
        (ones, -1, "step_count must be an integer >= 0, got -1"),
        (ones, float("nan"), "step_count must be an integer >= 0, got nan"),
        (ones, 1.7, "step_count must be an integer >= 0, got 1.7"),
    ]:
        with pytest.raises(ValueError) as info:
            opt.load_state_arrays(arrays, steps)
        assert message in str(info.value)
        assert not opt.m.any() and not opt.v.any() and opt.step_count == 0
    with pytest.raises(ValueError, match="optimizer state m: shape"):
        opt.load_state(np.zeros(n - 1), ones["v"], 1)
    assert not opt.v.any()
    opt.load_state_arrays(ones, np.int64(3))
    assert opt.m.all() and opt.step_count == 3


@pytest.mark.parametrize("max_norm", [-1.0, 0.0, float("nan"), float("inf"), "1", None])
def test_clip_grad_norm_needs_a_finite_positive_max_norm(max_norm):
    model = xpmodel.GPT(TINY)
    model.forward_backward(*batch(TINY))
    before = model.flat_grads.copy()
    with pytest.raises(ValueError, match=f"max_norm must be a finite number > 0, got {max_norm!r}"):
        xpmodel.clip_grad_norm(model, max_norm)
    np.testing.assert_array_equal(model.flat_grads, before)


def test_targets_must_be_integers_as_ids_must():
    model = xpmodel.GPT(TINY)
    idx, targets = batch(TINY)
    for bad in (targets + 0.9, np.full(targets.shape, np.nan)):
        with pytest.raises(ValueError, match="targets must hold integers, got float64"):
            model.loss(idx, bad)
        with pytest.raises(ValueError, match="targets must hold integers, got float64"):
            model.forward_backward(idx, bad)
    assert not model.flat_grads.any()


@pytest.mark.parametrize("seed", [-1, None, 1.5, "a", True])
def test_the_seed_must_be_a_non_negative_integer(seed):
    with pytest.raises(ValueError, match=f"seed must be an integer >= 0, got {seed!r}"):
        xpmodel.GPT(TINY, seed=seed)


def test_a_numpy_integer_seed_is_the_same_seed():
    config = xpmodel.GPTConfig(vocab_size=50, block_size=12, n_layer=2, n_head=4, n_embd=16, dropout=0.3)
    idx, targets = batch(config)
    models = [xpmodel.GPT(config, seed=seed) for seed in (3, np.int64(3))]
    np.testing.assert_array_equal(models[0].flat_params, models[1].flat_params)
    assert float(models[0].forward_backward(idx, targets)) == float(models[1].forward_backward(idx, targets))


@pytest.mark.parametrize("noise, message", [
    (5.0, "embedding_noise must be a pair (alpha, kind), got 5.0"),
    ((5.0,), "embedding_noise must be a pair (alpha, kind)"),
    ((-1.0, "uniform"), "embedding_noise alpha must be a finite number >= 0, got -1.0"),
    ((float("nan"), "uniform"), "embedding_noise alpha must be a finite number >= 0, got nan"),
    (("5", "uniform"), "embedding_noise alpha must be a finite number >= 0, got '5'"),
    ((5.0, "laplace"), "embedding_noise kind must be one of uniform, gaussian, got 'laplace'"),
])
def test_embedding_noise_refuses_what_would_fail_or_turn_it_off(noise, message):
    model = xpmodel.GPT(TINY)
    with pytest.raises(ValueError) as info:
        model.embedding_noise = noise
    assert message in str(info.value)
    assert model.embedding_noise == (0.0, "uniform")
    model.embedding_noise = [np.float32(5.0), "gaussian"]
    assert model.embedding_noise == (5.0, "gaussian") and type(model.embedding_noise[0]) is float


@pytest.mark.parametrize("scale", ["x", None, float("nan"), float("inf"), 0.0, -0.5])
def test_forward_backward_scale_must_be_finite_and_positive(scale):
    model = xpmodel.GPT(TINY)
    with pytest.raises(ValueError, match=f"scale must be a finite number > 0, got {scale!r}"):
        model.forward_backward(*batch(TINY), scale=scale)
    assert not model.flat_grads.any() and model.dropout_calls == 0


def test_forward_backward_takes_a_numpy_scale():
    models = [xpmodel.GPT(TINY, dtype="float64") for _ in range(2)]
    models[0].forward_backward(*batch(TINY), scale=0.25)
    models[1].forward_backward(*batch(TINY), scale=np.float32(0.25))
    np.testing.assert_array_equal(models[0].flat_grads, models[1].flat_grads)


def test_config_takes_numpy_scalars_and_stores_python_numbers():
    config = xpmodel.GPTConfig(vocab_size=np.int64(50), block_size=np.int32(12), n_layer=2, n_head=4,
                               n_embd=np.int64(16), dropout=np.float32(0.25), norm_eps=np.float32(0.5),
                               rope_theta=np.float64(1e4))
    assert config == xpmodel.GPTConfig(vocab_size=50, block_size=12, n_layer=2, n_head=4, n_embd=16,
                                       dropout=0.25, norm_eps=0.5)
    values = dataclasses.asdict(config)
    assert all(type(value) in (int, float, str, bool, type(None)) for value in values.values())
    assert json.loads(json.dumps(values)) == yaml.safe_load(yaml.safe_dump(values)) == values


@pytest.mark.parametrize("training", [True, False])
def test_evaluating_restores_the_mode_even_when_the_block_fails(training):
    model = xpmodel.GPT(TINY, seed=1)
    model.train() if training else model.eval()
    with pytest.raises(RuntimeError):
        with model.evaluating():
            assert not model.training
            raise RuntimeError("an evaluation batch failed")
    assert model.training is training
