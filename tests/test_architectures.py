"""The architecture options: each new layer against finite differences and a
direct formula (float64), the whole model with every option against finite
differences, KV-cache generation against the uncached path, and the
config checks that name the key."""
from dataclasses import replace

import numpy as np
import pytest

import xpmodel
from gradcheck import directional_check
from xpmodel.config import load_config
from xpmodel.errors import UsageError
from xpmodel.model.generate import decode_step, generate, prefill
from xpmodel.layers.attention import attention_backward, attention_forward
from xpmodel.layers.layernorm import layernorm_backward, layernorm_forward
from xpmodel.layers.relu2 import relu2_backward, relu2_forward
from xpmodel.layers.rmsnorm import rmsnorm_backward, rmsnorm_forward
from xpmodel.layers.rope import rope_backward, rope_forward, rope_tables
from xpmodel.layers.swiglu import swiglu_backward, swiglu_forward
from xpmodel.model.config import default_mlp_hidden

TOL = 1e-7
# Each option alone, and all of them together (Llama with QK-norm, GQA, untied).
OPTIONS = {
    "rmsnorm": dict(norm="rmsnorm", norm_eps=1e-6),
    "rope": dict(position="rope", rope_theta=500.0),
    "qk_norm": dict(qk_norm=True),
    "swiglu": dict(mlp="swiglu"),
    "relu2": dict(mlp="relu2", mlp_hidden=24),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "no_bias": dict(bias=False),
    "untied": dict(tie_embeddings=False),
    "all": dict(norm="rmsnorm", position="rope", qk_norm=True, mlp="swiglu", n_kv_head=2,
                bias=False, tie_embeddings=False),
}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def tiny(**options):
    return xpmodel.GPTConfig(vocab_size=50, block_size=12, n_layer=2, n_head=4, n_embd=16, **options)


def randomized_model(config, seed=5):
    """A float64 model whose vectors (norm weights, biases) are random too."""
    model = xpmodel.GPT(config, dtype="float64", seed=seed)
    rng = np.random.default_rng(seed)
    for name, view in model.params.items():
        if view.ndim == 1:
            view[...] = rng.normal(1.0 if name.endswith("weight") else 0.0, 0.1, view.shape)
    return model


def test_rmsnorm(rng):
    x, w = rng.standard_normal((6, 8)), rng.standard_normal(8)
    r = rng.standard_normal((6, 8))
    out, cache = rmsnorm_forward(x, w, eps=1e-6)
    np.testing.assert_allclose(out, x / np.sqrt((x * x).mean(1, keepdims=True) + 1e-6) * w, rtol=1e-12)
    dw = np.zeros_like(w)
    dx = rmsnorm_backward(r, cache, w, dw)
    f = lambda x_, w_: np.sum(rmsnorm_forward(x_, w_, eps=1e-6)[0] * r)
    assert directional_check(lambda x_: f(x_, w), x, dx, rng) < TOL
    assert directional_check(lambda w_: f(x, w_), w, dw, rng) < TOL


def test_rmsnorm_over_heads_of_four_axes(rng):
    x, w = rng.standard_normal((2, 3, 5, 4)), rng.standard_normal(4)
    r = rng.standard_normal(x.shape)
    out, cache = rmsnorm_forward(x, w)
    dw = np.zeros_like(w)
    dx = rmsnorm_backward(r, cache, w, dw)
    assert dx.shape == x.shape
    assert directional_check(lambda x_: np.sum(rmsnorm_forward(x_, w)[0] * r), x, dx, rng) < TOL
    assert directional_check(lambda w_: np.sum(rmsnorm_forward(x, w_)[0] * r), w, dw, rng) < TOL


def test_layernorm_without_bias(rng):
    x, w = rng.standard_normal((6, 8)), rng.standard_normal(8)
    out, cache = layernorm_forward(x, w, None, eps=1e-3)
    ref = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-3) * w
    np.testing.assert_allclose(out, ref, rtol=1e-12)
    r = rng.standard_normal(x.shape)
    dw = np.zeros_like(w)
    dx = layernorm_backward(r, cache, w, dw, None)
    assert directional_check(lambda x_: np.sum(layernorm_forward(x_, w, None, eps=1e-3)[0] * r),
                             x, dx, rng) < TOL


def test_rope_rotates_pairs_half_apart_and_backward_turns_back(rng):
    T, D = 7, 6
    cos, sin = rope_tables(T, D, 100.0, xpmodel.backend.get_device("cpu"), np.float64)
    x = rng.standard_normal((2, 3, T, D))
    out = rope_forward(x, cos, sin)
    t, j = 5, 1                             # position 5, pair (1, 4)
    angle = t * 100.0 ** (-2 * j / D)
    a, b = x[0, 0, t, j], x[0, 0, t, j + D // 2]
    np.testing.assert_allclose(out[0, 0, t, [j, j + D // 2]],
                               [a * np.cos(angle) - b * np.sin(angle),
                                b * np.cos(angle) + a * np.sin(angle)], rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    r = rng.standard_normal(x.shape)
    dx = rope_backward(r, cos, sin)
    assert directional_check(lambda x_: np.sum(rope_forward(x_, cos, sin) * r), x, dx, rng) < TOL
    # scores of rotated vectors depend only on the distance between positions
    q, k = rng.standard_normal(D), rng.standard_normal(D)
    both = np.stack([np.tile(q, (T, 1)), np.tile(k, (T, 1))])
    rq, rk = rope_forward(both, cos, sin)
    assert rq[4] @ rk[2] == pytest.approx(rq[6] @ rk[4], rel=1e-12)


def test_swiglu(rng):
    F = 5
    h, bias = rng.standard_normal((4, 2 * F)) * 3, rng.standard_normal(2 * F)
    r = rng.standard_normal((4, F))
    out, s = swiglu_forward(h.copy())
    gate, up = h[:, :F], h[:, F:]
    np.testing.assert_allclose(out, gate / (1 + np.exp(-gate)) * up, rtol=1e-12)
    hb = h.copy()
    out_b, s = swiglu_forward(hb, bias)
    dbias = np.zeros_like(bias)
    dh = swiglu_backward(r, hb, s, dbias)
    f = lambda h_: np.sum(swiglu_forward(h_.copy())[0] * r)
    assert directional_check(f, h + bias, dh, rng) < TOL
    np.testing.assert_allclose(dbias, dh.sum(0), rtol=1e-12)


def test_relu2(rng):
    h = rng.standard_normal((4, 7))
    r = rng.standard_normal((4, 7))
    out, cache = relu2_forward(h.copy())
    np.testing.assert_allclose(out, np.maximum(h, 0) ** 2)
    dh = relu2_backward(r, h, cache)
    assert directional_check(lambda h_: np.sum(relu2_forward(h_.copy())[0] * r), h, dh, rng) < TOL


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_attention_with_every_head_option(rng, n_kv_head):
    B, T, H, D = 2, 5, 4, 6
    width = (H + 2 * n_kv_head) * D
    qkv, bias = rng.standard_normal((B, T, width)), rng.standard_normal(width)
    w_q, w_k = rng.normal(1, 0.1, D), rng.normal(1, 0.1, D)
    rope = rope_tables(T, D, 10000.0, xpmodel.backend.get_device("cpu"), np.float64)
    r = rng.standard_normal((B * T, H * D))

    def f(qkv_, bias_=bias, w_q_=w_q, w_k_=w_k):
        y, _ = attention_forward(qkv_.copy(), H, bias=bias_, n_kv_head=n_kv_head,
                                 qk_norm=(w_q_, w_k_, 1e-5), rope=rope)
        return np.sum(y * r)
    y, cache = attention_forward(qkv.copy(), H, bias=bias, n_kv_head=n_kv_head,
                                 qk_norm=(w_q, w_k, 1e-5), rope=rope)
    dbias, dw_q, dw_k = np.zeros_like(bias), np.zeros_like(w_q), np.zeros_like(w_k)
    dqkv = attention_backward(r, cache, dbias, qk_norm=(w_q, w_k, 1e-5), dqk_norm=(dw_q, dw_k))
    assert directional_check(f, qkv, dqkv.reshape(qkv.shape), rng) < TOL
    assert directional_check(lambda b_: f(qkv, bias_=b_), bias, dbias, rng) < TOL
    assert directional_check(lambda w_: f(qkv, w_q_=w_), w_q, dw_q, rng) < TOL
    assert directional_check(lambda w_: f(qkv, w_k_=w_), w_k, dw_k, rng) < TOL


@pytest.mark.parametrize("name", OPTIONS)
def test_whole_model_finite_differences(name):
    model = randomized_model(tiny(**OPTIONS[name]))
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 50, (2, 6))
    targets = np.roll(idx, -1, axis=1)
    model.forward_backward(idx, targets)
    assert all(np.any(grad) for grad in model.grads.values())
    error = directional_check(lambda flat: float(model.loss(idx, targets)), model.flat_params,
                              model.flat_grads.copy(), np.random.default_rng(0), eps=3e-7, trials=4)
    assert error < 1e-7


def test_parameters_follow_the_options():
    names = set(xpmodel.GPT(tiny(**OPTIONS["all"])).params)
    assert "wpe.weight" not in names and "lm_head.weight" in names
    assert not any(name.endswith(".bias") for name in names)
    assert {"h.0.attn.q_norm.weight", "h.0.attn.k_norm.weight"} <= names
    shapes = dict(xpmodel.model.params.parameter_shapes(tiny(**OPTIONS["all"])))
    assert shapes["h.0.attn.c_attn.weight"] == (16, (4 + 2 * 2) * 4)
    assert shapes["h.0.mlp.c_fc.weight"] == (16, 2 * 64)       # [gate | up], 8/3 * 16 -> 64
    assert default_mlp_hidden("swiglu", 768) == 2048 and default_mlp_hidden("gelu", 768) == 3072


@pytest.mark.parametrize("name", ["rope", "gqa", "all"])
def test_kv_cache_generation_equals_uncached_past_block_size(name):
    model = randomized_model(tiny(**OPTIONS[name]))
    # 3 prompt tokens + 30 new ones run far past block_size (12): the window slides
    cached = list(generate(model, [1, 2, 3], 30, temperature=1.0, seed=7))
    uncached = list(generate(model, [1, 2, 3], 30, temperature=1.0, seed=7, use_cache=False))
    assert cached == uncached and len(cached) == 30
    idx = np.array([[4, 9, 2, 7, 1]])
    _, cache = prefill(model, idx[:, :3])
    decode_step(model, cache, idx[0, 3:4])
    logits = decode_step(model, cache, idx[0, 4:5])
    np.testing.assert_allclose(logits[0], model.forward(idx)[0, -1], rtol=1e-10, atol=1e-12)


def test_fp16_mixed_precision_tracks_float32_with_every_option():
    config = tiny(**OPTIONS["all"])
    full, mixed = xpmodel.GPT(config, seed=2), xpmodel.GPT(config, seed=2, precision="fp16")
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 50, (4, 12))
    targets = np.roll(idx, -1, axis=1)
    loss_full = float(full.forward_backward(idx, targets))
    loss_mixed = float(mixed.forward_backward(idx, targets))
    assert loss_mixed == pytest.approx(loss_full, rel=2e-3)
    for name, grad in full.grads.items():
        scale = float(np.abs(grad).max())
        assert float(np.abs(mixed.grads[name] - grad).max()) <= 0.03 * scale, name


@pytest.mark.parametrize("override,key", [
    ("model.n_kv_head=3", "model.n_kv_head"),
    ("model.norm=batchnorm", "model.norm"),
    ("model.mlp=geglu", "model.mlp"),
    ("model.position=alibi", "model.position"),
    ("model.rope_theta=0", "model.rope_theta"),
    ("model.qk_norm=maybe", "model.qk_norm"),
    ("model.mlp_hidden=0", "model.mlp_hidden"),
])
def test_bad_options_name_their_key(override, key):
    with pytest.raises(UsageError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("mlp", ["SwiGLU", None])
def test_gpt_config_names_a_bad_mlp_before_resolving_its_width(mlp):
    with pytest.raises(ValueError, match=f"GPTConfig.mlp must be one of gelu, swiglu, relu2, "
                                         f"got {mlp!r}"):
        tiny(mlp=mlp)


def test_replace_resolves_defaulted_widths_again():
    config = tiny(mlp="swiglu")
    assert (config.n_kv_head, config.mlp_hidden) == (None, None)
    wider = replace(config, n_head=8, n_embd=64)
    assert (wider.kv_heads, wider.mlp_width) == (8, default_mlp_hidden("swiglu", 64))
    chosen = replace(tiny(n_kv_head=2, mlp_hidden=24), n_head=8, n_embd=64)
    assert (chosen.kv_heads, chosen.mlp_width) == (2, 24)


def test_a_default_equals_the_value_it_resolves_to():
    default, spelled_out = tiny(), tiny(n_kv_head=4, mlp_hidden=64)
    assert default == spelled_out and hash(default) == hash(spelled_out)
    assert default != tiny(n_kv_head=2)
    # GPT-2's parameters, and their initial values, are the same either way
    a, b = xpmodel.GPT(default, seed=3), xpmodel.GPT(spelled_out, seed=3)
    assert a.layout.shapes == b.layout.shapes
    assert np.array_equal(a.flat_params, b.flat_params)


def test_rope_theta_counts_only_with_rotary_positions():
    """Learned positions never read rope_theta: two such configs that differ
    only there build the same network and are equal (a GPT-2 export, whose
    config.json has no rope_theta, reads back equal); with rope they differ."""
    learned, other_theta = tiny(), tiny(rope_theta=500000.0)
    assert learned == other_theta and hash(learned) == hash(other_theta)
    a, b = randomized_model(learned), randomized_model(other_theta)
    ids = np.random.default_rng(0).integers(0, 50, size=(2, 12))
    assert np.array_equal(a.forward(ids), b.forward(ids))
    assert tiny(position="rope") != tiny(position="rope", rope_theta=500000.0)
    assert tiny(rope_theta=500000.0) != tiny(position="rope", rope_theta=500000.0)
    # norm_eps is read by either norm
    assert tiny(norm_eps=1e-6) != learned
    assert tiny(norm="rmsnorm", norm_eps=1e-6) != tiny(norm="rmsnorm")


def test_rope_with_an_odd_head_size_is_refused():
    with pytest.raises(UsageError, match="model.position rope needs an even head size"):
        load_config(None, ["model.position=rope", "model.n_embd=24", "model.n_head=8"])


@pytest.mark.parametrize("norm_eps", [0.0, 1.5, 1e308, float("nan")])
def test_the_api_refuses_a_norm_eps_outside_the_configs_bounds(norm_eps):
    with pytest.raises(ValueError, match=r"GPTConfig.norm_eps must be a finite number in \(0, 1\]"):
        tiny(norm_eps=norm_eps)
    assert tiny(norm_eps=1.0).norm_eps == 1.0


@pytest.mark.parametrize("theta", [1e-300, 0.5, 1.0, 1e13, 1e308])
def test_a_rope_theta_outside_1_to_1e12_is_refused_by_config_and_api(theta):
    with pytest.raises(UsageError, match=r"model.rope_theta must be in \(1, 1e\+12\]"):
        load_config(None, ["model.position=rope", f"model.rope_theta={theta!r}"])
    with pytest.raises(ValueError, match=r"GPTConfig.rope_theta must be a finite number in \(1, "):
        tiny(position="rope", rope_theta=theta)
    assert tiny(position="rope", rope_theta=5e5).rope_theta == 5e5


def test_all_targets_ignored_gives_zero_gradients():
    model = xpmodel.GPT(tiny(), dtype="float64")
    idx = np.zeros((2, 5), dtype=np.int64)
    loss = model.forward_backward(idx, np.full((2, 5), -1))
    assert np.isfinite(float(loss)) and not model.flat_grads.any()


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-9), ("float32", 1e-4)])
def test_matches_torch_logits_loss_and_every_gradient(name, dtype, tol):
    """The same architecture in PyTorch (tools/torch_gpt.py) on the same weights."""
    torch = pytest.importorskip("torch")
    from torch_gpt import torch_forward, torch_loss, torch_params
    config = tiny(**OPTIONS[name])
    model = randomized_model(config)
    if dtype == "float32":
        model32 = xpmodel.GPT(config, dtype="float32")
        model32.load_state_arrays(model.state_arrays())
        model = model32
    rng = np.random.default_rng(2)
    idx = rng.integers(0, 50, (3, 10))
    targets = np.roll(idx, -1, axis=1)
    targets[0, 4] = -1
    loss = float(model.forward_backward(idx, targets))
    tp = torch_params(model.state_arrays(), getattr(torch, dtype))
    t_idx, t_targets = torch.tensor(idx), torch.tensor(targets)
    t_loss = torch_loss(tp, t_idx, t_targets, config)
    t_loss.backward()
    logits = torch_forward(tp, t_idx, config).detach().numpy()
    assert relative(model.forward(idx), logits) < tol
    assert abs(loss - t_loss.item()) / t_loss.item() < tol
    for param, grad in model.grads.items():
        assert relative(grad, tp[param].grad.numpy()) < tol, param


@pytest.mark.parametrize("name", ["all", "relu2", "qk_norm"])
def test_ten_adamw_steps_match_torch_in_float64(name):
    torch = pytest.importorskip("torch")
    from torch_gpt import torch_adamw, torch_loss, torch_params
    config = tiny(**OPTIONS[name])
    model = randomized_model(config, seed=4)
    tp = torch_params(model.state_arrays(), torch.float64)
    opt = xpmodel.AdamW(model, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    topt = torch_adamw(tp, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    rng = np.random.default_rng(6)
    batches = [rng.integers(0, 50, (3, 10)) for _ in range(2)]
    ours, theirs = [], []
    for step in range(10):
        idx = batches[step % 2]
        targets = np.roll(idx, -1, axis=1)
        model.zero_grad()
        ours.append(float(model.forward_backward(idx, targets)))
        xpmodel.clip_grad_norm(model, 0.5)
        opt.step()
        topt.zero_grad()
        loss = torch_loss(tp, torch.tensor(idx), torch.tensor(targets), config)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 0.5)
        topt.step()
        theirs.append(loss.item())
    np.testing.assert_allclose(ours, theirs, rtol=1e-8)
    assert ours[-1] < ours[0]
    for param, value in model.params.items():
        assert relative(value, tp[param].detach().numpy()) < 1e-8, param


def relative(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("name", ["gpt2", "all"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_recompute_gives_the_same_gradients_bit_for_bit(name, precision):
    config = tiny(**OPTIONS.get(name, {}))
    rng = np.random.default_rng(8)
    idx = rng.integers(0, 50, (3, 12))
    targets = np.roll(idx, -1, axis=1)
    results = {}
    for mode in ("none", "mlp", "block"):
        model = xpmodel.GPT(config, seed=3, precision=precision, recompute=mode)
        loss = float(model.forward_backward(idx, targets))
        results[mode] = (loss, model.flat_grads.copy())
    for mode in ("mlp", "block"):
        assert results[mode][0] == results["none"][0]
        np.testing.assert_array_equal(results[mode][1], results["none"][1])


def test_recompute_with_dropout():
    """"mlp" draws the same masks as "none"; "block" draws each block's from its
    own seed, the same again when the block is recomputed, so two passes agree."""
    config = tiny(dropout=0.2, **OPTIONS["all"])
    rng = np.random.default_rng(9)
    idx = rng.integers(0, 50, (3, 12))
    targets = np.roll(idx, -1, axis=1)
    grads = {}
    for mode in ("none", "mlp", "block", "block-again"):
        model = xpmodel.GPT(config, seed=3, recompute=mode.split("-")[0])
        model.forward_backward(idx, targets)
        grads[mode] = model.flat_grads.copy()
    np.testing.assert_array_equal(grads["mlp"], grads["none"])
    np.testing.assert_array_equal(grads["block"], grads["block-again"])
    assert not np.array_equal(grads["block"], grads["none"])


def test_recompute_lowers_the_peak_memory_of_a_pass():
    import tracemalloc
    config = xpmodel.GPTConfig(vocab_size=64, block_size=32, n_layer=3, n_head=2, n_embd=32)
    idx = np.random.default_rng(0).integers(0, 64, (4, 32))
    targets = np.roll(idx, -1, axis=1)
    peaks = {}
    for mode in ("none", "mlp", "block"):
        model = xpmodel.GPT(config, seed=0, recompute=mode)
        model._threads = 1
        model.forward_backward(idx, targets)   # warm: buffers allocated once
        tracemalloc.start()
        model.forward_backward(idx, targets)
        peaks[mode] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks["block"] < peaks["mlp"] < peaks["none"]


@pytest.mark.parametrize("name", list(OPTIONS) + ["gpt2"])
def test_parameter_count_is_the_layouts_size(name):
    config = tiny(**OPTIONS.get(name, {}))
    shapes = dict(xpmodel.model.params.parameter_shapes(config))
    assert config.num_params() == xpmodel.model.params.FlatLayout(shapes.items()).size
    sizes = xpmodel.model.params.part_sizes(config)

    def count(chosen):
        return sum(int(np.prod(shape)) for key, shape in shapes.items() if chosen(key))
    assert sizes["mlps"] == count(lambda key: ".mlp." in key)
    for part, key in (("wte", "wte.weight"), ("lm_head", "lm_head.weight"),
                      ("positions", "wpe.weight")):
        assert sizes[part] == count(key.__eq__), part


def test_a_huge_model_is_refused_at_once_naming_the_keys():
    """1e9 layers: measured from the config, not by listing 1e10 parameter shapes."""
    import time
    start = time.perf_counter()
    with pytest.raises(UsageError, match="model.n_layer"):
        from xpmodel.train.setup import check_fits_in_memory
        check_fits_in_memory(xpmodel.GPTConfig(vocab_size=50, block_size=12, n_layer=10 ** 9,
                                               n_head=4, n_embd=16), xpmodel.get_device("cpu"))
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("options, keys", [
    (dict(n_layer=10 ** 6), "model.n_layer or model.n_embd"),
    (dict(mlp_hidden=10 ** 9), "model.mlp_hidden or model.n_embd"),
    (dict(vocab_size=10 ** 9), "model.vocab_size or model.n_embd"),
    (dict(block_size=10 ** 9), "model.block_size or model.n_embd"),
])
def test_the_memory_refusal_names_the_keys_that_size_the_model(options, keys):
    from xpmodel.train.setup import check_fits_in_memory
    config = xpmodel.GPTConfig(**dict(dict(vocab_size=50, block_size=12, n_layer=2, n_head=4,
                                           n_embd=16), **options))
    with pytest.raises(UsageError, match=f"GiB; lower {keys}$"):
        check_fits_in_memory(config, xpmodel.get_device("cpu"))
