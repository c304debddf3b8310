"""bfloat16 mixed precision (train.precision=bf16): float32 master weights, a
bfloat16 working copy and activations, statistics in float32, no loss scaling.

Checked on NumPy (through ml_dtypes, matrix products in float32), on the CUDA
kernels run by the CPU emulator of tests/cuda_emulator, and on a GPU where one
is present: the conversions, each kernel in bfloat16 against NumPy, flash
attention on bfloat16 tensor cores, the loss and every gradient of GPT-2 and a
Llama-style model against float32, a training curve, and whole runs of
`xpmodel train ... train.precision=bf16` that resume.

Tolerances: bfloat16 keeps 8 significant bits (a relative rounding error up
to 2^-9, about 2e-3), eight times float16's; an output rounded once is held
to 1e-2, gradients through a two-layer model to 2e-2 per parameter (about 7e-3
measured), the loss to 2e-4."""
import contextlib
from pathlib import Path

import numpy as np
import pytest

import xpmodel
from cli_helpers import run_cli, write_corpus
from xpmodel.backend import BFLOAT16, cuda_available, to_host
from xpmodel.train.rundir import RunDir

import cuda_emulator

TINY = Path(__file__).resolve().parent / "tiny-run.yaml"

LLAMA_STYLE = dict(norm="rmsnorm", position="rope", mlp="swiglu", n_kv_head=2, bias=False)


def relative_error(got, want):
    got, want = to_host(got).astype(np.float64), np.asarray(want, dtype=np.float64)
    assert np.all(np.isfinite(got)), "non-finite output"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def bf16(rng, shape, scale=1.0):
    """Random bfloat16 values (their float64 copy is exact)."""
    return (rng.standard_normal(shape) * scale).astype(BFLOAT16)


def wide(x):
    return np.asarray(x).astype(np.float64)


# ---- conversions ------------------------------------------------------------------

_ROUND_TRIP = r"""
extern "C" __global__ void round_trip(const float* x, h16* narrow, float* back, unsigned* pairs, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    narrow[i] = float_to_h16(x[i]);
    back[i] = h16_to_float(narrow[i]);
    if (i % 2 == 0 && i + 1 < n) pairs[i / 2] = pack_h16x2(x[i], x[i + 1]);
}
"""


@pytest.mark.parametrize("half", [np.float16, BFLOAT16], ids=["float16", "bfloat16"])
def test_conversions_round_to_nearest_even_as_numpy_does(cp, half):
    """float_to_h16 / h16_to_float / pack_h16x2 of one build, against NumPy's
    (ml_dtypes') casts: ties to even, overflow to infinity, subnormals, signed
    zeros and infinities bit for bit, NaN kept a NaN."""
    from xpmodel.cuda.compile import raw_kernel
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(4000) * np.exp2(rng.integers(-30, 30, 4000))).astype(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.39e38, 65504.0, 65520.0,
                        1e-40, -1e-45, 2e-8, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 1.0 + 2.0 ** -11,
                        1.0 + 3 * 2.0 ** -11, 1.0 + 2.0 ** -8 + 2.0 ** -20], dtype=np.float32)
    x = np.concatenate([special, x, -x])
    n = x.size
    narrow, back, pairs = cp.empty(n, half), cp.empty(n, np.float32), cp.empty(n // 2, np.uint32)
    raw_kernel(_ROUND_TRIP, "round_trip", half=half)(
        ((n + 127) // 128,), (128,), (cp.asarray(x), narrow, back, pairs, np.int64(n)))
    with np.errstate(over="ignore"):
        want = x.astype(half)
    got = to_host(narrow)
    nan = np.isnan(x)
    assert np.isnan(got[nan].astype(np.float32)).all()
    assert np.array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))
    assert np.array_equal(to_host(back)[~nan], want[~nan].astype(np.float32))
    packed = to_host(pairs)
    even = ~nan[0:n - 1:2] & ~nan[1:n:2]
    assert np.array_equal((packed & 0xFFFF)[even], want[0:n - 1:2][even].view(np.uint16))
    assert np.array_equal((packed >> 16)[even], want[1:n:2][even].view(np.uint16))


# ---- each kernel in bfloat16 against NumPy -------------------------------------------

@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (True, False), (False, True)])
def test_gemm(cp, transpose_a, transpose_b):
    """cuBLAS with CUDA_R_16BF operands: a bfloat16 or float32 result, and
    accumulation into float32 gradients."""
    from xpmodel.layers.matmul import matmul
    rng = np.random.default_rng(0)
    for batch in [(), (3, 2)]:
        a = bf16(rng, batch + ((40, 24) if transpose_a else (24, 40)))
        b = bf16(rng, batch + ((33, 40) if transpose_b else (40, 33)))
        want = np.matmul(wide(a).swapaxes(-1, -2) if transpose_a else wide(a),
                         wide(b).swapaxes(-1, -2) if transpose_b else wide(b))
        got = matmul(cp.asarray(a), cp.asarray(b), transpose_a, transpose_b)
        assert got.dtype == BFLOAT16 and relative_error(got, want) < 1e-2
        exact = matmul(cp.asarray(a), cp.asarray(b), transpose_a, transpose_b, out_dtype=np.float32)
        assert relative_error(exact, want) < 1e-6
        out = cp.asarray(rng.standard_normal(want.shape).astype(np.float32))
        start = wide(to_host(out))
        matmul(cp.asarray(a), cp.asarray(b), transpose_a, transpose_b, out=out, accumulate=True,
               alpha=0.5)
        assert relative_error(out, start + 0.5 * want) < 1e-6


def test_numpy_multiplies_bfloat16_in_float32():
    """NumPy's path: float32 products of the bfloat16 values, rounded once."""
    from xpmodel.layers.matmul import matmul
    rng = np.random.default_rng(1)
    a, b = bf16(rng, (2, 24, 40)), bf16(rng, (2, 40, 33))
    want = np.matmul(a.astype(np.float32), b.astype(np.float32))
    got = matmul(a, b)
    assert got.dtype == BFLOAT16 and np.array_equal(got, want.astype(BFLOAT16))
    out = np.ones(want.shape, np.float32)
    matmul(a, b, out=out, accumulate=True)
    np.testing.assert_array_equal(out, want + 1)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norms(cp, norm):
    """float32 statistics, a bfloat16 output, and the backward's bfloat16 copy of dx."""
    from xpmodel.layers.layernorm import layernorm_backward, layernorm_forward
    from xpmodel.layers.rmsnorm import rmsnorm_backward, rmsnorm_forward
    rng = np.random.default_rng(2)
    C = 96
    x, w, b = rng.standard_normal((37, C)) * 3 + 1, rng.standard_normal(C), rng.standard_normal(C)
    dout = bf16(rng, (37, C))
    if norm == "layernorm":
        forward = lambda x_, w_, b_, low=None: layernorm_forward(x_, w_, b_, low)
        backward = lambda d, cache, w_, dw, db, **kw: layernorm_backward(d, cache, w_, dw, db, **kw)
    else:
        forward = lambda x_, w_, b_, low=None: rmsnorm_forward(x_, w_, None, low)
        backward = lambda d, cache, w_, dw, db, **kw: rmsnorm_backward(d, cache, w_, dw, None, **kw)
    out, cache = forward(x, w, b)
    dw, db = np.zeros(C), np.zeros(C)
    dx = backward(wide(dout), cache, w, dw, db)
    f32 = lambda a: cp.asarray(a.astype(np.float32))
    g_out, g_cache = forward(f32(x), f32(w), f32(b), BFLOAT16)
    assert g_out.dtype == BFLOAT16
    g_dw, g_db = cp.zeros(C, np.float32), cp.zeros(C, np.float32)
    g_dx_low = cp.empty((37, C), BFLOAT16)
    g_dx = backward(cp.asarray(dout), g_cache, f32(w), g_dw, g_db, dx_low=g_dx_low)
    assert relative_error(g_out, out) < 1e-2
    assert relative_error(g_dx, dx) < 1e-5 and relative_error(g_dw, dw) < 1e-5
    if norm == "layernorm":
        assert relative_error(g_db, db) < 1e-5
    assert np.array_equal(to_host(g_dx_low), to_host(g_dx).astype(BFLOAT16))


def test_gelu(cp):
    from xpmodel.layers.gelu import gelu_backward, gelu_forward
    rng = np.random.default_rng(4)
    x, dout = bf16(rng, (50, 40), 4.0), bf16(rng, (50, 40))
    out, s = gelu_forward(wide(x))
    dx = gelu_backward(wide(dout), wide(x), s)
    g_out, g_cache = gelu_forward(cp.asarray(x))
    g_dbias = cp.zeros(40, np.float32)
    g_dx = gelu_backward(cp.asarray(dout), cp.asarray(x), g_cache, dbias=g_dbias)
    assert g_out.dtype == BFLOAT16 and g_dx.dtype == BFLOAT16
    assert relative_error(g_out, out) < 1e-2 and relative_error(g_dx, dx) < 1e-2
    assert relative_error(g_dbias, dx.sum(axis=0)) < 1e-2


@pytest.mark.parametrize("T", [7, 64])
def test_causal_softmax(cp, T):
    """T = 64 takes the 16-byte vector kernels, T = 7 the general ones."""
    from xpmodel.layers.attention import causal_softmax_backward, causal_softmax_forward
    rng = np.random.default_rng(5)
    scores, dprobs = bf16(rng, (1, 2, T, T), 5.0), bf16(rng, (1, 2, T, T))
    probs = causal_softmax_forward(wide(scores))
    dscores = causal_softmax_backward(wide(dprobs), probs)
    g_probs = causal_softmax_forward(cp.asarray(scores), BFLOAT16)
    g_dscores = causal_softmax_backward(cp.asarray(dprobs), g_probs, BFLOAT16)
    assert g_probs.dtype == BFLOAT16 and g_dscores.dtype == BFLOAT16
    assert relative_error(g_probs, probs) < 1e-2
    assert relative_error(g_dscores, dscores) < 3e-2
    assert np.all(np.triu(to_host(g_probs).astype(np.float32), k=1) == 0)


@pytest.mark.parametrize("V", [5, 1000])
def test_crossentropy(cp, V):
    """V = 1000 takes the row-in-registers kernel, V = 5 the general one."""
    from xpmodel.layers.crossentropy import crossentropy_fused
    rng = np.random.default_rng(6)
    logits = bf16(rng, (9, V), 3.0)
    targets = rng.integers(0, V, 9)
    targets[4] = -1
    losses, dlogits = crossentropy_fused(wide(logits), targets, 0.125)
    g_losses, g_dlogits = crossentropy_fused(cp.asarray(logits), cp.asarray(targets), cp.asarray(0.125))
    assert g_dlogits.dtype == BFLOAT16 and g_losses.dtype == np.float32
    assert relative_error(g_losses, losses) < 1e-5      # float32 statistics of the same logits
    assert relative_error(g_dlogits, dlogits) < 1e-2


@pytest.mark.parametrize("options", [dict(D=8), dict(D=4), dict(D=8, n_kv_head=2, rotary=True)],
                         ids=["vectors", "general", "rope-grouped"])
def test_head_split_and_merge(cp, options):
    """The split (bias, scale, rotation, groups) and merge (bias gradient) of
    attention's heads: 16-byte vectors for D = 8, the general kernels for
    D = 4, the rotary ones with grouped keys."""
    from xpmodel.backend import get_device
    from xpmodel.layers.attention import attention_backward, attention_forward
    from xpmodel.layers.rope import rope_tables
    rng = np.random.default_rng(7)
    B, T, H, D = 2, 12, 4, options["D"]
    n_kv = options.get("n_kv_head", H)
    width = (H + 2 * n_kv) * D
    qkv, bias, dy = bf16(rng, (B, T, width)), bf16(rng, (width,), 0.1), bf16(rng, (B * T, H * D))
    rope = rope_tables(T, D, 100.0, get_device("cpu"), np.float64) if options.get("rotary") else None
    y, cache = attention_forward(wide(qkv), H, bias=wide(bias), n_kv_head=n_kv, rope=rope)
    dbias = np.zeros(width)
    dqkv = attention_backward(wide(dy), cache, dbias)
    g_rope = tuple(cp.asarray(t.astype(np.float32)) for t in rope) if rope else None
    g_y, g_cache = attention_forward(cp.asarray(qkv), H, bias=cp.asarray(bias), n_kv_head=n_kv,
                                     rope=g_rope)
    g_dbias = cp.zeros(width, np.float32)
    g_dqkv = attention_backward(cp.asarray(dy), g_cache, g_dbias)
    assert g_y.dtype == BFLOAT16 and g_dqkv.dtype == BFLOAT16
    assert relative_error(g_y, y) < 2e-2
    assert relative_error(g_dqkv, dqkv) < 3e-2
    assert relative_error(g_dbias, dbias) < 3e-2


def test_residual_add(cp):
    """The dropout scale 1 / 0.9 applies in float32, not rounded to bfloat16's 1.109375."""
    from xpmodel.layers.dropout import KeepMask
    from xpmodel.layers.residual import residual_forward
    rng = np.random.default_rng(8)
    stream = rng.standard_normal((20, 24)).astype(np.float32)
    branch, bias = bf16(rng, (20, 24)), bf16(rng, (24,))
    keep = rng.random((20, 24)) > 0.1
    g_stream = cp.asarray(stream)
    residual_forward(g_stream, cp.asarray(branch), cp.asarray(bias), KeepMask(cp.asarray(keep), 1 / 0.9))
    want = wide(stream) + (wide(branch) + wide(bias)) * keep / 0.9
    assert relative_error(g_stream, want) < 1e-6


@pytest.mark.parametrize("H,n_kv_head", [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_flash_attention(cp, monkeypatch, H, n_kv_head):
    """bfloat16 heads of 64 take the tensor-core kernels (bf16 mma.sync,
    ldmatrix and cp.async of bfloat16 tiles): output and the q, k, v and bias
    gradients against float64 on the same bfloat16 inputs. T = 128: two query
    tiles, the second seeing two key tiles. With grouped keys and values the
    kernels read H_kv key/value heads, each for its group of query heads."""
    from xpmodel.cuda import flash
    from xpmodel.layers import attention
    monkeypatch.setattr(flash, "ENABLED", True)
    rng = np.random.default_rng(9)
    B, T, D = 1, 128, 64
    width = (H + 2 * n_kv_head) * D
    qkv, bias, dy = bf16(rng, (B, T, width)), bf16(rng, (width,), 0.1), bf16(rng, (B * T, H * D))
    y, cache = attention.attention_forward(wide(qkv), H, bias=wide(bias), n_kv_head=n_kv_head)
    dqkv = attention.attention_backward(wide(dy), cache)
    g_y, g_cache = attention.attention_forward(cp.asarray(qkv), H, bias=cp.asarray(bias),
                                               n_kv_head=n_kv_head)
    assert isinstance(g_cache.core, attention.FlashCache)
    assert g_cache.core.heads[1].shape == (B, n_kv_head, T, D)
    g_dbias = cp.zeros(width, np.float32)
    g_dqkv = attention.attention_backward(cp.asarray(dy), g_cache, dbias=g_dbias)
    assert g_y.dtype == BFLOAT16 and g_dqkv.dtype == BFLOAT16
    assert relative_error(g_y, y) < 1e-2
    for name, heads in [("q", range(H)), ("k", range(H, H + n_kv_head)),
                        ("v", range(H + n_kv_head, H + 2 * n_kv_head))]:
        columns = slice(heads.start * D, heads.stop * D)
        assert relative_error(g_dqkv[:, columns], dqkv[:, columns]) < 3e-2, name
    assert relative_error(g_dbias, dqkv.sum(axis=0)) < 3e-2


# ---- the model ---------------------------------------------------------------------

MODELS = {
    # heads of 16: attention through the T x T scores (the 16-byte vector kernels on CUDA)
    "gpt2": (dict(n_head=4, n_embd=64, block_size=32), {}),
    # heads of 64, T = 64: flash attention on CUDA, with RoPE and grouped keys
    "llama-style": (dict(n_head=2, n_embd=128, block_size=64), LLAMA_STYLE),
    # squared ReLU, and QK-norm: the RMSNorm kernel on bfloat16 heads
    "relu2-qk-norm": (dict(n_head=4, n_embd=64, block_size=32),
                      dict(mlp="relu2", qk_norm=True, position="rope")),
}


@pytest.mark.parametrize("name", MODELS)
def test_loss_and_every_gradient_track_float32(device, name, monkeypatch):
    from xpmodel.cuda import flash
    shape, options = MODELS[name]
    config = xpmodel.GPTConfig(vocab_size=96, n_layer=2, **shape, **options)
    rng = np.random.default_rng(11)
    T = config.block_size
    idx = rng.integers(0, config.vocab_size, (2, T))
    targets = np.roll(idx, -1, axis=1)
    full = xpmodel.GPT(config, seed=5)
    ref_loss = float(full.forward_backward(idx, targets))
    monkeypatch.setattr(flash, "ENABLED", True)
    calls, original = [], flash.flash_forward
    monkeypatch.setattr(flash, "flash_forward", lambda heads, dropout=None:
                        calls.append(heads.dtype) or original(heads, dropout))
    model = xpmodel.GPT(config, device=device, seed=5, precision="bf16")
    assert model.flat_params.dtype == np.float32 and model.flat_working.dtype == BFLOAT16
    assert model.compute_dtype == BFLOAT16
    loss = float(model.forward_backward(idx, targets))
    on_flash = device == "cuda" and config.head_size == 64
    assert calls == ([BFLOAT16] * config.n_layer if on_flash else [])
    assert abs(loss - ref_loss) / ref_loss < 2e-4
    for key, grad in model.grads.items():
        assert relative_error(grad, to_host(full.grads[key])) < 2e-2, key
    logits = model.forward(idx)
    assert relative_error(logits, to_host(full.forward(idx))) < 2e-2


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_training_follows_the_float32_loss_curve(device):
    """30 AdamW steps without loss scaling: every bf16 loss within 3% of the
    fp32 run's. Not on the emulator, where the 60 steps take half a minute
    (the whole runs below train there)."""
    if device == "cuda" and not cuda_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    config = xpmodel.GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=64)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, config.vocab_size, (4, 32))
    targets = np.roll(idx, -1, axis=1)
    curves = {}
    for precision in ("fp32", "bf16"):
        model = xpmodel.GPT(config, device=device, seed=1, precision=precision)
        opt = xpmodel.AdamW(model, lr=2e-3)
        losses = []
        for _ in range(30):
            model.zero_grad()
            losses.append(float(model.forward_backward(idx, targets)))
            xpmodel.clip_grad_norm(model, 1.0)
            opt.step()
        curves[precision] = np.array(losses)
    assert curves["fp32"][-1] < 0.7 * curves["fp32"][0]
    np.testing.assert_allclose(curves["bf16"], curves["fp32"], rtol=3e-2)


def test_cached_generation_matches_uncached(device):
    """Sampling from a bf16 model (as the trainer's samples do): the KV-cache
    path gives the uncached path's tokens."""
    from xpmodel.model.generate import generate
    config = xpmodel.GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=4, n_embd=32)
    model = xpmodel.GPT(config, device=device, seed=4, precision="bf16")
    for kwargs in (dict(temperature=0.0), dict(temperature=1.5, seed=3)):
        cached = list(generate(model, [1, 5, 9, 2], 24, use_cache=True, **kwargs))
        uncached = list(generate(model, [1, 5, 9, 2], 24, use_cache=False, **kwargs))
        assert cached == uncached and len(cached) == 24


def test_a_gpu_without_bfloat16_is_refused_clearly(monkeypatch):
    """Compute capability below 8.0 (V100, T4): no bfloat16 tensor cores or
    conversions, so the model says to use fp16."""
    with cuda_emulator.emulated_cuda_or_skip():
        monkeypatch.setattr(cuda_emulator._Device, "compute_capability", "75")
        config = xpmodel.GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16)
        with pytest.raises(ValueError, match="compute capability 8.0 or later.*use fp16"):
            xpmodel.GPT(config, device="cuda", precision="bf16")
        xpmodel.GPT(config, device="cuda", precision="fp16")


def test_a_cupy_that_cannot_compute_in_bfloat16_is_refused_clearly(monkeypatch):
    """A CuPy that holds bfloat16 arrays but cannot compile arithmetic on them
    (older CUDA headers) is found before training, and the message says what
    is needed."""
    with cuda_emulator.emulated_cuda_or_skip():
        def no_bfloat16_kernels(self, *args, **kwargs):
            if BFLOAT16 in (self.dtype, *(getattr(x, "dtype", None) for x in args)):
                raise RuntimeError("bfloat16 arithmetic does not compile")
            return NotImplemented
        monkeypatch.setattr(cuda_emulator.EmulatedArray, "__mul__", no_bfloat16_kernels)
        config = xpmodel.GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16)
        with pytest.raises(ValueError, match="cannot compute in bfloat16 \\(RuntimeError\\).*"
                                             "CUDA 12.2 or later, or use fp16"):
            xpmodel.GPT(config, device="cuda", precision="bf16")


def test_bfloat16_master_weights_are_refused():
    config = xpmodel.GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16)
    with pytest.raises(ValueError, match="bfloat16 trains as mixed precision over float32 "
                                         "weights: precision='bf16'"):
        xpmodel.GPT(config, dtype=BFLOAT16)
    with pytest.raises(ValueError, match="bf16 mixed precision keeps float32 master weights"):
        xpmodel.GPT(config, dtype="float64", precision="bf16")


# ---- whole runs --------------------------------------------------------------------

@pytest.mark.parametrize("where", ["cpu", "cuda", "emulated-cuda"])
def test_xpmodel_train_in_bf16_runs_and_resumes(where, tmp_path, capsys, monkeypatch):
    """`xpmodel train ... train.precision=bf16` end to end (evaluations,
    checkpoints, no loss scale anywhere); a run stopped after step 8 and
    continued by `xpmodel train --resume` ends where the whole run ends: bit
    for bit on the CPU, within 1e-3 on a GPU or the emulator (whose float
    atomics add in a different order every launch)."""
    from xpmodel.config import load_config
    from xpmodel.train import Trainer
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    if where == "cuda" and not cuda_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    corpus = write_corpus(tmp_path / "corpus.txt", lines=300)
    context = cuda_emulator.emulated_cuda_or_skip() if where == "emulated-cuda" else contextlib.nullcontext()
    device = "cpu" if where == "cpu" else "cuda"
    settings = [f"data.source={corpus}", "train.precision=bf16", "train.max_iters=12",
                "train.save_interval=4", "train.eval_interval=4", "train.log_interval=2"]
    with context:
        code, out, err = run_cli(capsys, "train", "--config", TINY, "--device", device,
                                 "--out", tmp_path / "whole", *settings)
        assert code == 0, err
        assert "bf16" in out and "step 12: val loss" in out
        if where == "emulated-cuda":    # the emulator's GPU has no entry in xpmodel/train/peak_flops.py
            assert "no MFU: CPU emulator is not in xpmodel's peak table; set train.peak_flops" in out
        first = Trainer.start(load_config(TINY, settings), device=device, out=tmp_path / "parts",
                              show=False)
        first.total_steps = 8      # stops after step 8, the last checkpoint
        first.run()
        assert first.scaler is None
        code, out, err = run_cli(capsys, "train", "--resume", tmp_path / "parts", "--device", device)
        assert code == 0, err
        assert "at step 8" in out
    losses = {}
    for name in ("whole", "parts"):
        train = [r for r in RunDir(tmp_path / name).read_metrics() if r["type"] == "train"]
        assert [r["step"] for r in train] == list(range(1, 13))
        assert all(np.isfinite(r["loss"]) and not r.get("skipped") and "loss_scale" not in r
                   for r in train)
        losses[name] = np.array([r["loss"] for r in train])
    assert losses["whole"][-1] < losses["whole"][0]
    whole, _ = xpmodel.load(tmp_path / "whole", device="cpu")
    parts, _ = xpmodel.load(tmp_path / "parts", device="cpu")
    assert whole.flat_params.dtype == np.float32
    if where == "cpu":
        np.testing.assert_array_equal(losses["parts"], losses["whole"])
        np.testing.assert_array_equal(parts.flat_params, whole.flat_params)
    else:
        np.testing.assert_allclose(losses["parts"], losses["whole"], rtol=1e-3)
        assert relative_error(parts.flat_params, whole.flat_params) < 1e-3
