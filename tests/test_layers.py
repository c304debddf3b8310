"""Each layer's backward against finite differences of its forward (float64)."""
import numpy as np
import pytest

from gradcheck import directional_check
from xpmodel.backend import BFLOAT16
from xpmodel.layers.attention import attention_backward, attention_forward
from xpmodel.layers.crossentropy import (crossentropy_backward, crossentropy_forward,
                                         lm_head_backward, lm_head_forward)
from xpmodel.layers.dropout import dropout_backward, dropout_forward
from xpmodel.layers.embedding import embedding_backward, embedding_forward
from xpmodel.layers.embedding_noise import (embedding_noise, embedding_noise_backward,
                                             embedding_noise_forward)
from xpmodel.layers.gelu import gelu_backward, gelu_forward
from xpmodel.layers.layernorm import layernorm_backward, layernorm_forward
from xpmodel.layers.linear import linear_backward, linear_forward
from xpmodel.layers.matmul import row_means, row_sums

TOL = 1e-7


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_linear(rng):
    x, w, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    r = rng.standard_normal((5, 3))
    dw, db = np.zeros_like(w), np.zeros_like(b)
    dx = linear_backward(r, x, w, dw, db)
    assert directional_check(lambda x_: np.sum(linear_forward(x_, w, b) * r), x, dx, rng) < TOL
    assert directional_check(lambda w_: np.sum(linear_forward(x, w_, b) * r), w, dw, rng) < TOL
    assert directional_check(lambda b_: np.sum(linear_forward(x, w, b_) * r), b, db, rng) < TOL


def test_linear_backward_adds_into_gradients(rng):
    x, w, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    r = rng.standard_normal((5, 3))
    dw, db = np.ones_like(w), np.ones_like(b)
    linear_backward(r, x, w, dw, db)
    np.testing.assert_allclose(dw, 1.0 + x.T @ r)
    np.testing.assert_allclose(db, 1.0 + r.sum(0))


def test_layernorm(rng):
    x, w, b = rng.standard_normal((6, 8)), rng.standard_normal(8), rng.standard_normal(8)
    r = rng.standard_normal((6, 8))
    out, cache = layernorm_forward(x, w, b)
    ref = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(out, ref, rtol=1e-12)
    dw, db = np.zeros_like(w), np.zeros_like(b)
    dx = layernorm_backward(r, cache, w, dw, db)
    f = lambda x_, w_, b_: np.sum(layernorm_forward(x_, w_, b_)[0] * r)
    assert directional_check(lambda x_: f(x_, w, b), x, dx, rng) < TOL
    assert directional_check(lambda w_: f(x, w_, b), w, dw, rng) < TOL
    assert directional_check(lambda b_: f(x, w, b_), b, db, rng) < TOL


def test_layernorm_of_a_16_bit_input_keeps_its_statistics_in_float32_and_its_dtype(rng):
    x = (rng.standard_normal((6, 8)) * 100 + 3000).astype(np.float16)   # float16 statistics lose it
    w, b = np.ones(8, np.float16), np.zeros(8, np.float16)
    out, (xhat, rstd) = layernorm_forward(x, w, b)
    assert out.dtype == np.float16 and xhat.dtype == rstd.dtype == np.float32
    ref, _ = layernorm_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(out.astype(np.float64), ref, atol=2e-2)


def test_gelu(rng):
    x = rng.standard_normal((4, 7)) * 3
    r = rng.standard_normal((4, 7))
    out, s = gelu_forward(x.copy())
    ref = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-15)
    dx = gelu_backward(r, x, s)
    assert directional_check(lambda x_: np.sum(gelu_forward(x_)[0] * r), x, dx, rng, eps=1e-5) < TOL


def test_gelu_saturates_without_overflow():
    x = np.array([-1e4, -50.0, 0.0, 50.0, 1e4], dtype=np.float32)
    out, s = gelu_forward(x)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(gelu_backward(np.ones_like(x), x, s)))
    np.testing.assert_allclose(out, [0, 0, 0, 50, 1e4], atol=1e-6)


def test_attention(rng):
    B, T, H, D = 2, 5, 3, 4
    qkv = rng.standard_normal((B, T, 3 * H * D))
    r = rng.standard_normal((B * T, H * D))
    y, cache = attention_forward(qkv, H)
    dqkv = attention_backward(r, cache).reshape(qkv.shape)
    f = lambda q_: np.sum(attention_forward(q_, H)[0] * r)
    assert directional_check(f, qkv, dqkv, rng) < TOL


def test_attention_is_causal(rng):
    B, T, H, D = 1, 6, 2, 4
    qkv = rng.standard_normal((B, T, 3 * H * D))
    y, _ = attention_forward(qkv, H)
    changed = qkv.copy()
    changed[:, 4:] += 1.0          # the future must not change earlier outputs
    y2, _ = attention_forward(changed, H)
    np.testing.assert_array_equal(y.reshape(B, T, -1)[:, :4], y2.reshape(B, T, -1)[:, :4])
    assert not np.allclose(y.reshape(B, T, -1)[:, 4:], y2.reshape(B, T, -1)[:, 4:])


def test_attention_with_dropout(rng):
    B, T, H, D = 2, 4, 2, 3
    qkv = rng.standard_normal((B, T, 3 * H * D))
    r = rng.standard_normal((B * T, H * D))
    y, cache = attention_forward(qkv, H, 0.3, np.random.default_rng(5))
    dqkv = attention_backward(r, cache).reshape(qkv.shape)
    f = lambda q_: np.sum(attention_forward(q_, H, 0.3, np.random.default_rng(5))[0] * r)
    assert directional_check(f, qkv, dqkv, rng) < TOL


def test_embedding(rng):
    V, Tmax, C, B, T = 7, 6, 4, 3, 5
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((Tmax, C))
    idx = rng.integers(0, V, (B, T))
    idx[0, :3] = 2                  # repeated ids must accumulate
    r = rng.standard_normal((B, T, C))
    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    embedding_backward(r, idx, dwte, dwpe)
    assert directional_check(lambda w: np.sum(embedding_forward(idx, w, wpe) * r), wte, dwte, rng) < TOL
    assert directional_check(lambda w: np.sum(embedding_forward(idx, wte, w) * r), wpe, dwpe, rng) < TOL
    assert np.all(dwpe[T:] == 0)


def test_crossentropy_with_ignore_index(rng):
    N, V, C = 6, 5, 3
    x, wte = rng.standard_normal((N, C)), rng.standard_normal((V, C))
    targets = rng.integers(0, V, N)
    targets[2] = -1
    weights = rng.standard_normal(N)

    def loss(x_, w_):
        losses, _ = crossentropy_forward(lm_head_forward(x_, w_), targets)
        return float(np.sum(losses * weights))

    logits = lm_head_forward(x, wte)
    losses, probs = crossentropy_forward(logits.copy(), targets)
    ref = np.log(np.exp(logits).sum(1)) - logits[np.arange(N), np.maximum(targets, 0)]
    np.testing.assert_allclose(losses[targets >= 0], ref[targets >= 0], rtol=1e-12)
    assert losses[2] == 0.0
    dwte = np.zeros_like(wte)
    dx = lm_head_backward(crossentropy_backward(weights, probs, targets), x, wte, dwte)
    assert directional_check(lambda x_: loss(x_, wte), x, dx, rng) < TOL
    assert directional_check(lambda w_: loss(x, w_), wte, dwte, rng) < TOL


def test_crossentropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4]])
    losses, probs = crossentropy_forward(logits, np.array([1]))
    assert np.isfinite(losses).all() and losses[0] == pytest.approx(1e4)


def test_dropout(rng):
    x = rng.standard_normal((200, 50))
    out, mask = dropout_forward(x, 0.25, np.random.default_rng(1))
    dropped = np.mean(out == 0)
    assert 0.2 < dropped < 0.3
    np.testing.assert_allclose(out[out != 0], x[out != 0] / 0.75)
    r = rng.standard_normal(x.shape)
    # the gradient flows where forward kept a unit, scaled as forward scaled it
    np.testing.assert_allclose(dropout_backward(r, mask), np.where(out != 0, r / 0.75, 0.0))
    same, none = dropout_forward(x, 0.0, None)
    assert same is x and none is None


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16])
def test_dropout_scales_16_bit_values_by_the_unrounded_scale(rng, dtype):
    """Kept 16-bit values are x / (1 - p) rounded once, not x times 1 / (1 - p)
    rounded to 16 bits (1.109375 in bfloat16 for p = 0.1); the mask is a byte an
    element whatever the values' dtype."""
    x = rng.standard_normal((300, 64)).astype(dtype)
    out, mask = dropout_forward(x, 0.1, np.random.default_rng(1))
    assert out.dtype == dtype and mask.keep.dtype == np.bool_ and 0.07 < 1 - mask.keep.mean() < 0.13
    want = np.where(mask.keep, x.astype(np.float32) * np.float32(1 / 0.9), 0).astype(dtype)
    assert np.array_equal(out, want)
    np.testing.assert_array_equal(dropout_backward(x, mask), want)


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_embedding_noise(rng, kind):
    B, T, C, alpha = 4, 8, 16, 5.0
    x, r = rng.standard_normal((B, T, C)), rng.standard_normal((B, T, C))
    # the same seeded draw on every call, as within one training pass
    f = lambda x_: np.sum(embedding_noise_forward(x_, alpha, kind, np.random.default_rng(3))[0] * r)
    out, cache = embedding_noise_forward(x, alpha, kind, np.random.default_rng(3))
    dx = embedding_noise_backward(r, cache)
    assert directional_check(f, x, dx, rng) < TOL
    noise = out - x
    scale = alpha / np.sqrt(T * C)
    if kind == "uniform":       # NEFTune: uniform in [-1, 1], times alpha / sqrt(T C)
        assert np.abs(noise).max() <= scale and np.abs(noise).max() > 0.9 * scale
        assert np.std(noise) == pytest.approx(scale / np.sqrt(3), rel=0.1)
    else:
        assert np.std(noise) == pytest.approx(scale, rel=0.1)
    np.testing.assert_allclose(noise, embedding_noise(x, alpha, kind, np.random.default_rng(3)), atol=1e-14)
    # outside training (no generator) and at alpha 0 the embeddings pass unchanged
    assert embedding_noise_forward(x, alpha, kind, None)[0] is x
    assert embedding_noise_forward(x, 0.0, kind, np.random.default_rng(3))[0] is x
    assert embedding_noise(x.astype(np.float32), alpha, kind, np.random.default_rng(3)).dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 4, 6), (1, 1)])
def test_row_sums_and_means_equal_numpys_over_the_last_axis(shape, dtype):
    a = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    for got, want in ((row_sums(a), a.sum(axis=-1, keepdims=True)),
                      (row_sums(a, 0.5), 0.5 * a.sum(axis=-1, keepdims=True)),
                      (row_means(a), a.mean(axis=-1, keepdims=True)),
                      (row_means(a.swapaxes(-1, -2)), a.swapaxes(-1, -2).mean(axis=-1, keepdims=True))):
        assert got.shape == want.shape and got.dtype == a.dtype
        np.testing.assert_allclose(got, want, **tolerance)
