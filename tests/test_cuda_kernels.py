"""Each fused CUDA kernel against the NumPy code it replaces, on fresh random
inputs, in every dtype it serves.

The kernel tests run twice: on a GPU through CuPy (skipped without one) and
on the CPU emulator of tests/cuda_emulator (skipped without g++), which runs
the same kernel source, launched by the same wrappers, one fiber per CUDA
thread, and with cuBLAS's two calls computed from the pointers, leading
dimensions and strides they are given."""
import re

import numpy as np
import pytest

import xpmodel
from xpmodel.backend import BFLOAT16, cuda_available, to_host

import cuda_emulator
from counter_masks import ReferenceMasks, reference_random_bits

TOLERANCE = {np.float64: 1e-12, np.float32: 1e-5, np.float16: 2e-3}
needs_gpu = pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA GPU")


def relative_error(got, want):
    got, want = to_host(got).astype(np.float64), np.asarray(want, dtype=np.float64)
    assert np.all(np.isfinite(got)), "non-finite output"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def rand(rng, shape, dtype=np.float64, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (True, False), (False, True)])
def test_gemm_2d_and_batched(cp, dtype, transpose_a, transpose_b):
    from xpmodel.layers.matmul import matmul
    rng = np.random.default_rng(0)
    for batch in [(), (3, 2)]:
        a = rand(rng, batch + ((40, 24) if transpose_a else (24, 40)), dtype)
        b = rand(rng, batch + ((33, 40) if transpose_b else (40, 33)), dtype)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        want = np.matmul(a64.swapaxes(-1, -2) if transpose_a else a64,
                         b64.swapaxes(-1, -2) if transpose_b else b64)
        got = matmul(cp.asarray(a), cp.asarray(b), transpose_a, transpose_b,
                     out_dtype=np.promote_types(dtype, np.float32))
        assert relative_error(got, want) < TOLERANCE[np.dtype(dtype).type]
        out = cp.asarray(rand(rng, want.shape, np.promote_types(dtype, np.float32)))
        start = to_host(out).astype(np.float64)
        matmul(cp.asarray(a), cp.asarray(b), transpose_a, transpose_b, out=out, accumulate=True,
               alpha=0.5)
        assert relative_error(out, start + 0.5 * want) < TOLERANCE[np.dtype(dtype).type]


def test_column_sums_add_into_float32(cp):
    from xpmodel.layers.matmul import add_column_sums
    rng = np.random.default_rng(0)
    dout = rand(rng, (300, 70), np.float16)
    db = cp.asarray(rand(rng, (70,), np.float32))
    want = to_host(db).astype(np.float64) + dout.astype(np.float64).sum(axis=0)
    add_column_sums(cp.asarray(dout), db)
    assert relative_error(db, want) < 1e-5


@pytest.mark.parametrize("C", [64, 100, 768])
@pytest.mark.parametrize("dtype,out_dtype", [(np.float64, np.float64), (np.float32, np.float32),
                                             (np.float32, np.float16)])
def test_layernorm_matches_numpy(cp, C, dtype, out_dtype):
    from xpmodel.layers.layernorm import layernorm_backward, layernorm_forward
    rng = np.random.default_rng(0)
    x, w, b = rand(rng, (37, C), dtype, 3.0) + 1.0, rand(rng, (C,), dtype), rand(rng, (C,), dtype)
    dout = rand(rng, (37, C), out_dtype)
    out, cache = layernorm_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64))
    dw, db = np.zeros(C), np.zeros(C)
    dx = layernorm_backward(dout.astype(np.float64), cache, w.astype(np.float64), dw, db)

    g_out, g_cache = layernorm_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b), out_dtype)
    assert g_out.dtype == out_dtype
    g_dw, g_db = cp.zeros(C, dtype), cp.zeros(C, dtype)
    g_dx = cp.asarray(rand(rng, (37, C), dtype))
    start = to_host(g_dx).astype(np.float64)
    layernorm_backward(cp.asarray(dout), g_cache, cp.asarray(w), g_dw, g_db, dx=g_dx)
    tol = TOLERANCE[np.dtype(out_dtype).type]
    assert relative_error(g_out, out) < tol
    assert relative_error(g_dx, start + dx) < TOLERANCE[np.dtype(dtype).type] * 10
    assert relative_error(g_dw, dw) < tol * 10
    assert relative_error(g_db, db) < tol * 10


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_gelu_matches_numpy(cp, dtype):
    from xpmodel.layers.gelu import gelu_backward, gelu_forward
    rng = np.random.default_rng(0)
    x = rand(rng, (50, 33), dtype, 4.0)
    x[0, :3] = [-200, 200, 0]
    dout = rand(rng, (50, 33), dtype)
    out, s = gelu_forward(x.astype(np.float64))
    dx = gelu_backward(dout.astype(np.float64), x.astype(np.float64), s)
    g_out, g_cache = gelu_forward(cp.asarray(x))
    wide = np.promote_types(dtype, np.float32)
    start = rand(rng, (33,), wide)
    g_dbias = cp.asarray(start)
    g_dx = gelu_backward(cp.asarray(dout), cp.asarray(x), g_cache, dbias=g_dbias)
    assert g_out.dtype == dtype and g_dx.dtype == dtype
    assert relative_error(g_out, out) < TOLERANCE[dtype]
    assert relative_error(g_dx, dx) < TOLERANCE[dtype]
    assert relative_error(g_dbias, start + dx.sum(axis=0)) < TOLERANCE[dtype]


@pytest.mark.parametrize("T", [1, 7, 64, 264, 300, 520])
@pytest.mark.parametrize("wide,low", [(np.float64, np.float64), (np.float32, np.float32),
                                      (np.float32, np.float16), (np.float16, np.float16)])
def test_causal_softmax_matches_numpy(cp, T, wide, low):
    """All-float16 rows with T % 8 == 0 take the vectorised kernels."""
    from xpmodel.layers.attention import causal_softmax_backward, causal_softmax_forward
    rng = np.random.default_rng(0)
    scores = rand(rng, (2, 3, T, T), wide, 5.0)
    dprobs = rand(rng, (2, 3, T, T), wide)
    probs = causal_softmax_forward(scores.astype(np.float64))
    dscores = causal_softmax_backward(dprobs.astype(np.float64), probs)
    g_probs = causal_softmax_forward(cp.asarray(scores), low)
    g_dscores = causal_softmax_backward(cp.asarray(dprobs), g_probs, low)
    assert g_probs.dtype == low and g_dscores.dtype == low
    assert relative_error(g_probs, probs) < TOLERANCE[low]
    assert relative_error(g_dscores, dscores) < TOLERANCE[low] * 5
    assert np.all(np.triu(to_host(g_probs), k=1) == 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("V", [5, 8, 1000, 4096, 50304])
def test_crossentropy_matches_numpy(cp, dtype, V):
    """float16 with V % 8 == 0 takes the vectorised kernel, the rest the general one."""
    from xpmodel.layers.crossentropy import crossentropy_fused
    rng = np.random.default_rng(0)
    logits = rand(rng, (9, V), dtype, 3.0)
    targets = rng.integers(0, V, 9)
    targets[4] = -1
    targets[0], targets[1] = 0, V - 1
    losses, dlogits = crossentropy_fused(logits.astype(np.float64), targets, 0.125)
    g_logits = cp.asarray(logits)
    g_losses, g_dlogits = crossentropy_fused(g_logits, cp.asarray(targets), cp.asarray(0.125))
    assert g_dlogits.dtype == dtype and g_dlogits is g_logits
    assert relative_error(g_losses, losses) < TOLERANCE[dtype]
    assert relative_error(g_dlogits, dlogits) < TOLERANCE[dtype] * 5
    assert to_host(g_losses)[4] == 0 and np.all(to_host(g_dlogits)[4] == 0)
    eval_losses, none = crossentropy_fused(cp.asarray(logits), cp.asarray(targets))
    assert none is None and relative_error(eval_losses, losses) < TOLERANCE[dtype]


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adamw_kernel_matches_the_cpu_update(dtype):
    import xpmodel
    config = xpmodel.GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)
    models = [xpmodel.GPT(config, device=d, dtype=dtype, seed=3) for d in ("cpu", "cuda")]
    opts = [xpmodel.AdamW(m, lr=1e-2, weight_decay=0.1) for m in models]
    rng = np.random.default_rng(0)
    for _ in range(5):
        grads = rng.standard_normal(models[0].flat_grads.shape).astype(dtype)
        for model, opt in zip(models, opts):
            model.flat_grads[...] = grads if model.xp is np else model.xp.asarray(grads)
            opt.step()
    tol = 1e-12 if dtype == "float64" else 1e-5
    assert relative_error(models[1].flat_params, models[0].flat_params) < tol
    assert relative_error(opts[1].v, opts[0].v) < tol


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_split_heads_adds_the_bias_and_scales_q(cp, dtype):
    """D = 8 takes the 16-byte float16 kernel, D = 4 the general one, as
    does a float16 qkv that starts 2 bytes into its buffer."""
    from xpmodel.layers.attention import split_heads
    rng = np.random.default_rng(0)
    for B, T, H, D in [(2, 5, 3, 8), (2, 5, 3, 4)]:
        qkv, bias = rand(rng, (B, T, 3 * H * D), dtype), rand(rng, (3 * H * D,), dtype)
        want = split_heads(qkv.astype(np.float64), bias.astype(np.float64), H)
        got = split_heads(cp.asarray(qkv), cp.asarray(bias), H)
        assert got.shape == (3, B, H, T, D) and got.dtype == dtype
        assert relative_error(got, want) < TOLERANCE[dtype]
        assert relative_error(split_heads(cp.asarray(qkv), None, H),
                              split_heads(qkv.astype(np.float64), None, H)) < TOLERANCE[dtype]
        shifted = cp.empty(qkv.size + 1, dtype)[1:].reshape(qkv.shape)
        shifted[...] = cp.asarray(qkv)
        assert relative_error(split_heads(shifted, cp.asarray(bias), H), want) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_merge_heads_sums_the_bias_gradient(cp, dtype):
    from xpmodel.layers.attention import merge_heads
    rng = np.random.default_rng(0)
    for B, T, H, D in [(2, 37, 3, 8), (2, 5, 3, 4)]:   # 74 rows: several per thread of the float16 kernel
        dheads = rand(rng, (3, B, H, T, D), dtype)
        dbias = rand(rng, (3 * H * D,), np.float32)
        want_dbias = dbias.astype(np.float64)
        want = merge_heads(dheads.astype(np.float64), want_dbias)
        got_dbias = cp.asarray(dbias)
        got = merge_heads(cp.asarray(dheads), got_dbias)
        assert got.shape == (B * T, 3 * H * D) and got.dtype == dtype
        assert relative_error(got, want) < TOLERANCE[dtype]
        assert relative_error(got_dbias, want_dbias) < 1e-5
        assert relative_error(merge_heads(cp.asarray(dheads)), want) < TOLERANCE[dtype]


@pytest.mark.parametrize("stream_dtype,branch_dtype", [(np.float64, np.float64),
                                                       (np.float32, np.float32),
                                                       (np.float32, np.float16)])
def test_residual_add_with_bias_and_dropout_mask(cp, stream_dtype, branch_dtype):
    from xpmodel.layers.dropout import KeepMask
    from xpmodel.layers.residual import residual_forward
    rng = np.random.default_rng(0)
    stream, branch = rand(rng, (7, 24), stream_dtype), rand(rng, (7, 24), branch_dtype)
    bias, keep = rand(rng, (24,), branch_dtype), rng.random((7, 24)) > 0.3
    wide = [a.astype(np.float64) for a in (stream, branch, bias)]
    for with_bias, with_mask in [(False, False), (True, False), (False, True), (True, True)]:
        want = residual_forward(wide[0].copy(), wide[1].copy(), wide[2] if with_bias else None,
                                KeepMask(keep, 1 / 0.7) if with_mask else None)
        got = cp.asarray(stream)
        out = residual_forward(got, cp.asarray(branch), cp.asarray(bias) if with_bias else None,
                               KeepMask(cp.asarray(keep), 1 / 0.7) if with_mask else None)
        assert out is got and relative_error(got, want) < TOLERANCE[np.dtype(branch_dtype).type]


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16])
@pytest.mark.parametrize("misaligned,with_bias", [("h", True), ("bias", True), ("h", False)])
def test_swiglu_in_16_byte_vectors_equals_the_element_kernel(cp, dtype, misaligned, with_bias,
                                                            monkeypatch):
    """As GELU's: 16-bit [gate | up] rows with F a multiple of 8, all 16-byte
    aligned, take the vector kernel, h or the bias off alignment the element
    kernel; outputs and biased h equal bit for bit."""
    from xpmodel.cuda import swiglu
    rng = np.random.default_rng(5)
    F = VECTOR_COLUMNS
    arrays = {"h": rand(rng, (VECTOR_ROWS, 2 * F), np.float32, 3.0).astype(dtype),
              "bias": rand(rng, (2 * F,), np.float32).astype(dtype) if with_bias else None}
    built, runs = vector_and_element_runs(cp, swiglu, swiglu.swiglu_forward, arrays, misaligned,
                                          monkeypatch)
    assert built == ["swiglu_forward_h16x8", "swiglu_forward"] and runs[0] == runs[1]


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16])
@pytest.mark.parametrize("misaligned,parts", [("stream", "branch"), ("branch", "bias"),
                                              ("mask", "mask"), ("bias", "bias and mask")])
def test_residual_add_in_16_byte_vectors_equals_the_element_kernel(cp, dtype, misaligned, parts,
                                                                  monkeypatch):
    """A float32 stream and 16-bit branch, bias and mask of a multiple of 8
    columns, all 16-byte aligned, take the vector kernel; any one of them off
    alignment, the element kernel. The streams after equal bit for bit."""
    from xpmodel.cuda import residual
    from xpmodel.layers.dropout import KeepMask
    rng = np.random.default_rng(4)
    shape = (VECTOR_ROWS, VECTOR_COLUMNS)
    arrays = {"stream": rand(rng, shape, np.float32),
              "branch": rand(rng, shape, np.float32).astype(dtype),
              "bias": rand(rng, shape[1:], np.float32).astype(dtype) if "bias" in parts else None,
              "keep": rng.random(shape) > 0.25 if "mask" in parts else None}
    misaligned = "keep" if misaligned == "mask" else misaligned

    def add(stream, branch, bias, keep):
        return residual.residual_add(stream, branch, bias, keep if keep is None else KeepMask(keep, 1.3))
    built, runs = vector_and_element_runs(cp, residual, add, arrays, misaligned, monkeypatch)
    assert built == ["residual_add_h16x8", "residual_add"] and runs[0] == runs[1]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, BFLOAT16])
def test_a_dropout_mask_applies_in_one_kernel_as_numpy_applies_it(cp, dtype):
    """x * keep / (1 - p) rounded once to x's dtype, bit for bit NumPy's, a
    dropped infinity NaN in both (as a product with 0 is)."""
    from xpmodel.layers.dropout import KeepMask, apply_mask
    rng = np.random.default_rng(3)
    x = rand(rng, (5, 7, 33), np.float32, 3.0).astype(dtype)
    x[0, 0, :2] = np.inf
    keep = rng.random(x.shape) > 0.1
    keep[0, 0, :2] = (False, True)
    with np.errstate(invalid="ignore"):
        want = apply_mask(x, KeepMask(keep, 1 / 0.9))
    got = to_host(apply_mask(cp.asarray(x), KeepMask(cp.asarray(keep), 1 / 0.9)))
    assert got.dtype == dtype and np.isnan(got[0, 0, 0]) and np.isinf(got[0, 0, 1])
    assert np.array_equal(got, want, equal_nan=True)


def test_residual_kernels_round_the_masked_sum_alike():
    """With a dropout mask, stream + branch x scale is one explicit fused
    multiply-add in both residual kernels, so neither multiplies on its own:
    left to NVRTC, the element kernel's was fused (without a bias) and the
    vector kernel's rounded twice, so the two would differ on a GPU though not
    on the emulator, which fuses nothing."""
    from cuda_emulator import nvrtc

    from xpmodel.layers.dropout import KeepMask
    from xpmodel.layers.residual import residual_forward
    if cuda_emulator.compiler() is None or nvrtc.library() is None:
        pytest.skip("needs g++ and the nvidia-cuda-nvrtc wheel")
    start = len(cuda_emulator.built)
    with cuda_emulator.emulated_cuda() as cp:
        for dtype in (np.float16, BFLOAT16):
            for bias in (None, cp.ones(8, dtype)):
                residual_forward(cp.zeros((2, 8), np.float32), cp.ones((2, 8), dtype), bias,
                                 KeepMask(cp.ones((2, 8), bool), 1.25))
    codes = {code for name, code in cuda_emulator.built[start:] if "residual_add" in name}
    assert len(codes) == 2                     # float16 and bfloat16
    for code in codes:
        kernels = nvrtc.ptx(nvrtc.library(), code, 80).split(".entry ")[1:]
        assert sorted(k.split("(")[0].strip() for k in kernels) == ["residual_add", "residual_add_h16x8"]
        for kernel in kernels:          # the scale's product is only ever an fma's
            assert not re.search(r"\bmul(\.rn)?\.f32", kernel) and "fma.rn.f32" in kernel


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_gelu_adds_the_bias_in_place(cp, dtype):
    from xpmodel.layers.gelu import gelu_forward
    rng = np.random.default_rng(0)
    x, bias = rand(rng, (6, 40), dtype, 2.0), rand(rng, (40,), dtype)
    want_x = x.astype(np.float64) + bias.astype(np.float64)
    want, _ = gelu_forward(want_x.copy())
    g_x = cp.asarray(x)
    got, _ = gelu_forward(g_x, cp.asarray(bias))
    assert relative_error(g_x, want_x) < TOLERANCE[dtype]
    assert relative_error(got, want) < TOLERANCE[dtype] * 2


def vector_and_element_runs(cp, module, call, arrays, misaligned, monkeypatch):
    """call(**arrays on the device) twice: with every array 16-byte aligned, then
    with arrays[misaligned] one element off (a copy inside a larger buffer);
    returns the kernels each built and, per run, the host bytes of the arrays
    and of what call returned."""
    built = []
    make = module.raw_kernel
    monkeypatch.setattr(module, "raw_kernel", lambda *a, **k: built.append(a[1]) or make(*a, **k))
    runs = []
    for off in (None, misaligned):
        placed = {}
        for name, host in arrays.items():
            if host is None:
                placed[name] = None
                continue
            shift = 1 if name == off else 0
            device = cp.zeros(host.size + shift, dtype=host.dtype)[shift:].reshape(host.shape)
            device[...] = cp.asarray(host)
            placed[name] = device
        out = call(**placed)
        runs.append([to_host(a).tobytes() for a in (out, *placed.values()) if a is not None])
    return built, runs


# rows past the emulator's 64 blocks of rows, and more than 256 vectors a row: two column blocks
VECTOR_ROWS, VECTOR_COLUMNS = 150, 8 * 260


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16])
@pytest.mark.parametrize("misaligned,with_bias", [("x", True), ("bias", True), ("x", False)])
def test_gelu_in_16_byte_vectors_equals_the_element_kernel(cp, dtype, misaligned, with_bias,
                                                          monkeypatch):
    """16-bit rows of a multiple of 8 columns, every array 16-byte aligned, take
    the vector kernel (a thread per 8 columns walking the rows); with x or the
    bias off alignment, the element kernel. Outputs and biased inputs equal bit
    for bit."""
    from xpmodel.cuda import gelu
    rng = np.random.default_rng(3)
    arrays = {"x": rand(rng, (VECTOR_ROWS, VECTOR_COLUMNS), np.float32, 4.0).astype(dtype),
              "bias": rand(rng, (VECTOR_COLUMNS,), np.float32).astype(dtype) if with_bias else None}
    built, runs = vector_and_element_runs(cp, gelu, gelu.gelu_forward, arrays, misaligned,
                                          monkeypatch)
    assert built == ["gelu_forward_h16x8", "gelu_forward"] and runs[0] == runs[1]


def test_vector_kernels_leave_empty_rows_to_the_element_kernels(cp):
    """No columns is no vector: the element kernels take (and finish) it."""
    from xpmodel.cuda.gelu import gelu_forward
    from xpmodel.cuda.residual import residual_add
    from xpmodel.cuda.swiglu import swiglu_forward
    assert gelu_forward(cp.zeros((4, 0), np.float16)).shape == (4, 0)
    assert swiglu_forward(cp.zeros((4, 0), np.float16)).shape == (4, 0)
    assert residual_add(cp.zeros((4, 0), np.float32), cp.zeros((4, 0), np.float16)).shape == (4, 0)


def test_layernorm_backward_writes_a_low_precision_copy_and_column_sums_of_dx(cp):
    from xpmodel.layers.layernorm import layernorm_backward, layernorm_forward
    rng = np.random.default_rng(0)
    C = 96
    x, w = cp.asarray(rand(rng, (40, C), np.float32)), cp.asarray(rand(rng, (C,), np.float32))
    _, cache = layernorm_forward(x, w, w, np.float16)
    dx = cp.asarray(rand(rng, (40, C), np.float32))
    dx_low, start = cp.empty((40, C), np.float16), rand(rng, (C,), np.float32)
    dx_sum = cp.asarray(start)
    layernorm_backward(cp.asarray(rand(rng, (40, C), np.float16)), cache, w, cp.zeros(C, np.float32),
                       cp.zeros(C, np.float32), dx=dx, dx_low=dx_low, dx_sum=dx_sum)
    assert np.array_equal(to_host(dx_low), to_host(dx).astype(np.float16))
    assert relative_error(dx_sum, start + to_host(dx).astype(np.float64).sum(axis=0)) < 1e-5


@pytest.mark.parametrize("T,dropout", [(8, 0.0), (20, 0.0), (20, 0.3)])
def test_attention_in_causal_query_chunks_matches_numpy(cp, T, dropout, monkeypatch):
    """With chunks of 8 queries, T = 20 runs three chunks (the last one short),
    and the softmax leaves the part of a row past its chunk's keys unwritten.
    With dropout the masks must match: the emulator draws them with NumPy."""
    from xpmodel.layers import attention
    if dropout and cp is not cuda_emulator:
        pytest.skip("CuPy's random numbers differ from NumPy's")
    monkeypatch.setattr(attention, "_QUERY_CHUNK", 8)
    rng = np.random.default_rng(0)
    B, H, D = 2, 2, 8
    qkv, bias = rand(rng, (B, T, 3 * H * D), np.float32), rand(rng, (3 * H * D,), np.float32)
    dy = rand(rng, (B * T, H * D), np.float32)
    y, cache = attention.attention_forward(qkv, H, dropout, np.random.default_rng(7), bias=bias)
    dqkv = attention.attention_backward(dy, cache)
    g_y, g_cache = attention.attention_forward(cp.asarray(qkv), H, dropout, cp.random.default_rng(7),
                                               bias=cp.asarray(bias))
    g_dbias = cp.zeros(3 * H * D, np.float32)
    g_dqkv = attention.attention_backward(cp.asarray(dy), g_cache, dbias=g_dbias)
    assert relative_error(g_y, y) < 1e-5
    assert relative_error(g_dqkv, dqkv) < 1e-5
    assert relative_error(g_dbias, dqkv.sum(axis=0)) < 1e-5


@pytest.mark.parametrize("B,H,T", [(1, 2, 192), (2, 2, 128)])
def test_flash_attention_matches_float64(cp, B, H, T, monkeypatch):
    """Float16 heads of 64 dimensions take the tensor-core kernels: output and
    the gradients of q, k, v and the c_attn bias against float64 NumPy on the
    same float16 inputs. T = 192 has query tiles that see one, two and three
    key tiles (the last masked), so the pipelined copies run two deep; B = H =
    2 checks the batch and head indexing."""
    from xpmodel.cuda import flash
    from xpmodel.layers import attention
    monkeypatch.setattr(flash, "ENABLED", True)
    rng = np.random.default_rng(0)
    D = 64
    qkv = rand(rng, (B, T, 3 * H * D), np.float16)
    bias = rand(rng, (3 * H * D,), np.float16, 0.1)
    dy = rand(rng, (B * T, H * D), np.float16)
    y, cache = attention.attention_forward(qkv.astype(np.float64), H, bias=bias.astype(np.float64))
    dqkv = attention.attention_backward(dy.astype(np.float64), cache)
    g_y, g_cache = attention.attention_forward(cp.asarray(qkv), H, bias=cp.asarray(bias))
    assert isinstance(g_cache.core, attention.FlashCache)
    g_dbias = cp.zeros(3 * H * D, np.float32)
    g_dy = cp.asarray(dy)
    if B == 2:    # a gradient 2 bytes into its buffer: copied to an aligned one for the kernels
        g_dy = cp.empty(dy.size + 1, np.float16)[1:].reshape(dy.shape)
        g_dy[...] = cp.asarray(dy)
    g_dqkv = attention.attention_backward(g_dy, g_cache, dbias=g_dbias)
    assert g_y.dtype == np.float16 and g_dqkv.dtype == np.float16
    assert relative_error(g_y, y) < 2e-3
    for part in range(3):   # q, k, v
        columns = slice(part * H * D, (part + 1) * H * D)
        assert relative_error(g_dqkv[:, columns], dqkv[:, columns]) < 5e-3, "qkv"[part]
    assert relative_error(g_dbias, dqkv.sum(axis=0)) < 5e-3
    lse = to_host(g_cache.core.lse).astype(np.float64)                    # (B, H, T)
    heads = cache.core.heads
    scores = np.einsum("bhqd,bhkd->bhqk", heads[0], heads[1])
    scores = np.where(np.tri(T, dtype=bool), scores, -np.inf)
    top = scores.max(axis=-1)
    assert np.abs(lse - (top + np.log(np.exp(scores - top[..., None]).sum(axis=-1)))).max() < 1e-2


@pytest.mark.parametrize("H,n_kv_head", [(2, 2), (4, 2), (8, 2), (4, 1)],
                         ids=["group1", "group2", "group4", "mqa"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_grouped_query_attention_matches_float64(cp, H, n_kv_head, dtype, monkeypatch):
    """Grouped-query attention with rotary positions, heads of 64, T = 128 (two
    query tiles, the causal diagonal in each), B = 2: output and the gradients
    of qkv and its bias against float64 NumPy on the same inputs. Float16 takes
    the flash kernels on the split's H + 2 H_kv heads: query head h reads
    key/value head h / (H / H_kv) in place, and dk, dv come back summed over
    each group. Float32 runs through T x T scores, k and v repeated per group."""
    from xpmodel.backend import get_device
    from xpmodel.cuda import flash
    from xpmodel.layers import attention
    from xpmodel.layers.rope import rope_tables
    monkeypatch.setattr(flash, "ENABLED", True)
    rng = np.random.default_rng(0)
    B, T, D = 2, 128, 64
    width = (H + 2 * n_kv_head) * D
    qkv, bias = rand(rng, (B, T, width), dtype), rand(rng, (width,), dtype, 0.1)
    dy = rand(rng, (B * T, H * D), dtype)
    rope = rope_tables(T, D, 10000.0, get_device("cpu"), np.float64)
    y, cache = attention.attention_forward(qkv.astype(np.float64), H, bias=bias.astype(np.float64),
                                           n_kv_head=n_kv_head, rope=rope)
    dqkv = attention.attention_backward(dy.astype(np.float64), cache)
    g_rope = tuple(cp.asarray(table.astype(np.float32)) for table in rope)
    g_y, g_cache = attention.attention_forward(cp.asarray(qkv), H, bias=cp.asarray(bias),
                                               n_kv_head=n_kv_head, rope=g_rope)
    g_dbias = cp.zeros(width, np.float32)
    g_dqkv = attention.attention_backward(cp.asarray(dy), g_cache, dbias=g_dbias)
    q, k, v = g_cache.core.heads
    if dtype == np.float16:
        assert isinstance(g_cache.core, attention.FlashCache)
        assert q.shape == (B, H, T, D) and k.shape == v.shape == (B, n_kv_head, T, D)
        tolerance = {"y": 2e-3, "grad": 5e-3}
    else:
        assert isinstance(g_cache.core, attention.SoftmaxCache)
        tolerance = {"y": 1e-5, "grad": 1e-5}
    assert g_y.dtype == dtype and g_dqkv.dtype == dtype
    assert relative_error(g_y, y) < tolerance["y"]
    for name, heads in [("q", range(H)), ("k", range(H, H + n_kv_head)),
                        ("v", range(H + n_kv_head, H + 2 * n_kv_head))]:
        columns = slice(heads.start * D, heads.stop * D)
        assert relative_error(g_dqkv[:, columns], dqkv[:, columns]) < tolerance["grad"], name
    assert relative_error(g_dbias, dqkv.sum(axis=0)) < tolerance["grad"]


def test_counter_generator_masks_are_their_definition(cp):
    """A CounterGenerator's masks are the hash of their key and index (the
    NumPy reference), about 1 - rate of them kept; each draw is a new stream,
    the same seed gives the same streams."""
    from xpmodel.cuda.random import CounterGenerator
    shape, rate = (7, 300), 0.25
    generator, reference = CounterGenerator([3, 1]), ReferenceMasks([3, 1])
    first = to_host(generator.keep_mask(shape, rate))
    assert first.dtype == np.bool_ and np.array_equal(first, reference.keep_mask(shape, rate))
    assert abs(first.mean() - (1 - rate)) < 0.04      # 4 standard deviations
    second = to_host(generator.keep_mask(shape, rate))
    assert np.array_equal(second, reference.keep_mask(shape, rate))
    assert abs((first == second).mean() - (rate ** 2 + (1 - rate) ** 2)) < 0.04
    assert np.array_equal(to_host(CounterGenerator([3, 1]).keep_mask(shape, rate)), first)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_counter_generator_draws_uniform_and_normal_values(cp, dtype):
    from xpmodel.cuda.random import CounterGenerator
    generator, shape = CounterGenerator([3, 1]), (7, 300)
    values = to_host(generator.random(shape, dtype))
    assert values.dtype == dtype and values.min() >= 0.0 and values.max() < 1.0
    assert abs(values.mean() - 0.5) < 0.03
    normal = to_host(generator.standard_normal((20000,), dtype))
    assert abs(normal.mean()) < 0.05 and abs(normal.std() - 1.0) < 0.05


def test_counter_keys_are_splitmix64_of_the_seed():
    """A CounterGenerator's keys are the outputs of SplitMix64 started from its
    64-bit seed (SeedSequence's two words), one a draw: 64 bits of key each,
    a new one each time (here from the generator's usual loop, written apart
    from next_key's closed form)."""
    from xpmodel.cuda.random import CounterGenerator
    mask = (1 << 64) - 1
    low, high = np.random.SeedSequence([5, 2]).generate_state(2, np.uint32)
    state, outputs = int(low) | int(high) << 32, []
    for _ in range(3):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        outputs.append(z ^ (z >> 31))
    generator = CounterGenerator([5, 2])
    keys = [generator.next_key() for _ in range(3)]
    assert [int(key0) | int(key1) << 32 for key0, key1 in keys] == outputs


def test_random_bits_past_two_to_the_32_match_their_reference(cp):
    """The kernels' random_bits takes 64-bit indices (the flash kernels' reach
    2^32 at B H T^2 >= 2^32): the CUDA source against the NumPy reference on
    indices either side of 2^32."""
    from xpmodel.cuda.compile import raw_kernel
    from xpmodel.cuda.random import RANDOM_BITS
    source = RANDOM_BITS + r"""
extern "C" __global__ void bits_from(unsigned* out, unsigned long long first, int n,
        unsigned key0, unsigned key1) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = random_bits(key0, key1, first + i);
}
"""
    first, n, key = (1 << 32) - 64, 128, (np.uint32(0x1234567), np.uint32(0x89ABCDE))
    out = cp.zeros(n, dtype=np.uint32)
    raw_kernel(source, "bits_from")((1,), (n,), (out, np.uint64(first), np.int32(n), *key))
    want = reference_random_bits(key, np.arange(first, first + n, dtype=np.uint64))
    assert np.array_equal(to_host(out), want)
    assert not np.array_equal(want[:64], want[64:])   # the high word changes the bits


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16])
@pytest.mark.parametrize("H,n_kv_head", [(2, 2), (4, 2)], ids=["mha", "gqa"])
def test_flash_attention_with_dropout_matches_float64(cp, dtype, H, n_kv_head, monkeypatch):
    """With a counter-based generator, dropout on the probabilities runs inside
    the flash kernels: output and the qkv and bias gradients against float64
    NumPy through T x T scores with the same mask (the NumPy reference of the
    same stream), for multi-head attention and grouped-query attention with
    rotary positions; B = 2, T = 128 (two query tiles)."""
    from xpmodel.backend import get_device
    from xpmodel.cuda import flash
    from xpmodel.cuda.random import CounterGenerator
    from xpmodel.layers import attention
    from xpmodel.layers.rope import rope_tables
    monkeypatch.setattr(flash, "ENABLED", True)
    rng = np.random.default_rng(1)
    B, T, D, rate = 2, 128, 64, 0.2
    width = (H + 2 * n_kv_head) * D
    qkv, bias = rand(rng, (B, T, width), dtype), rand(rng, (width,), dtype, 0.1)
    dy = rand(rng, (B * T, H * D), dtype)
    rope = rope_tables(T, D, 10000.0, get_device("cpu"), np.float64) if n_kv_head < H else None
    y, cache = attention.attention_forward(qkv.astype(np.float64), H, rate, ReferenceMasks(4),
                                           bias=bias.astype(np.float64), n_kv_head=n_kv_head,
                                           rope=rope)
    dqkv = attention.attention_backward(dy.astype(np.float64), cache)
    g_rope = None if rope is None else tuple(cp.asarray(t.astype(np.float32)) for t in rope)
    g_y, g_cache = attention.attention_forward(cp.asarray(qkv), H, rate, CounterGenerator(4),
                                               bias=cp.asarray(bias), n_kv_head=n_kv_head,
                                               rope=g_rope)
    assert isinstance(g_cache.core, attention.FlashCache) and g_cache.core.dropout is not None
    g_dbias = cp.zeros(width, np.float32)
    g_dqkv = attention.attention_backward(cp.asarray(dy), g_cache, dbias=g_dbias)
    tolerance = 4e-3 if dtype == np.float16 else 3e-2
    assert relative_error(g_y, y) < tolerance
    assert relative_error(g_dqkv, dqkv) < 2 * tolerance
    assert relative_error(g_dbias, dqkv.sum(axis=0)) < 2 * tolerance
    plain, _ = attention.attention_forward(qkv.astype(np.float64), H, bias=bias.astype(np.float64),
                                           n_kv_head=n_kv_head, rope=rope)
    assert relative_error(g_y, plain) > 0.1   # the dropout took effect


def test_flash_attention_serves_only_its_shapes(cp):
    from xpmodel.layers import attention
    rng = np.random.default_rng(0)
    for dtype, D, T, dropout in [(np.float32, 64, 64, 0.0), (np.float16, 32, 64, 0.0),
                                 (np.float16, 64, 72, 0.0), (np.float16, 64, 64, 0.1)]:
        qkv = cp.asarray(rand(rng, (1, T, 3 * D), dtype))
        _, cache = attention.attention_forward(qkv, 1, dropout, cp.random.default_rng(0))
        assert isinstance(cache.core, attention.SoftmaxCache), (dtype, D, T, dropout)
    # (dropout above came from CuPy's generator;) from the counter-based one, flash draws the mask
    from xpmodel.cuda.random import CounterGenerator
    qkv = cp.asarray(rand(rng, (1, 64, 3 * 64), np.float16))
    _, cache = attention.attention_forward(qkv, 1, 0.1, CounterGenerator(0))
    assert isinstance(cache.core, attention.FlashCache) and cache.core.dropout[0] == 0.1


def test_flash_kernels_refuse_operands_they_cannot_read_in_vectors(cp):
    """A strided or misaligned q, k, v, out or lse would be read wrongly in
    16-byte vectors: refused by name instead."""
    from xpmodel.cuda import flash
    rng = np.random.default_rng(0)
    B, H, T, D = 1, 2, 64, 64
    q, k, v = (cp.asarray(rand(rng, (B, H, T, D), np.float16)) for _ in range(3))
    strided = cp.asarray(rand(rng, (B, H, T, 2 * D), np.float16))[..., ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        flash.flash_forward((q, strided, v))
    out, lse = flash.flash_forward((q, k, v))
    shifted = cp.empty(lse.size + 1, np.float32)[1:].reshape(lse.shape)
    shifted[...] = lse
    with pytest.raises(ValueError, match="16-byte aligned"):
        flash.flash_backward(cp.asarray(rand(rng, (B * T, H * D), np.float16)), (q, k, v), out, shifted, 0.125)


def test_vector_kernels_fall_back_on_unaligned_rows(cp):
    """A C-contiguous view that starts 2 bytes into its buffer cannot take the
    16-byte vector kernels; the general ones give the same results."""
    from xpmodel.layers.attention import causal_softmax_forward
    from xpmodel.layers.crossentropy import crossentropy_fused
    rng = np.random.default_rng(0)
    V, n = 64, 3
    logits = rand(rng, (n, V), np.float16, 3.0)
    targets = rng.integers(0, V, n)
    want, want_grad = crossentropy_fused(logits.astype(np.float64), targets, 0.5)
    shifted = cp.empty(n * V + 1, np.float16)[1:].reshape(n, V)
    shifted[...] = cp.asarray(logits)
    losses, grad = crossentropy_fused(shifted, cp.asarray(targets), cp.asarray(0.5))
    assert relative_error(losses, want) < 2e-3 and relative_error(grad, want_grad) < 1e-2
    scores = rand(rng, (1, 1, 16, 16), np.float16)
    shifted = cp.empty(16 * 16 + 1, np.float16)[1:].reshape(1, 1, 16, 16)
    shifted[...] = cp.asarray(scores)
    probs = causal_softmax_forward(shifted, np.float16)
    assert relative_error(probs, causal_softmax_forward(scores.astype(np.float64))) < 2e-3


def test_gemm_plans_are_reused_across_data_and_copy_unreadable_layouts(cp):
    """A layout cuBLAS cannot read (every other column) is copied first; the
    second call with the same layouts reuses the first call's plan on new data."""
    from xpmodel.cuda import gemm
    from xpmodel.layers.matmul import matmul
    rng = np.random.default_rng(0)
    for _ in range(2):
        a, b = rand(rng, (12, 20), np.float32), rand(rng, (10, 7), np.float32)
        got = matmul(cp.asarray(a)[:, ::2], cp.asarray(b))
        assert relative_error(got, a[:, ::2].astype(np.float64) @ b) < 1e-5
    plans = [p for key, p in gemm._plans.items() if key[0] == (12, 10)]
    assert len(plans) == 1 and plans[0].copy_a and not plans[0].copy_b


@pytest.mark.parametrize("C", [64, 100])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm-without-bias"])
def test_norm_kernel_without_centring_or_bias_matches_numpy(cp, C, norm):
    """RMSNorm is the LayerNorm kernel compiled without the mean; a LayerNorm
    without a bias passes null bias pointers."""
    from xpmodel.layers.layernorm import layernorm_backward, layernorm_forward
    from xpmodel.layers.rmsnorm import rmsnorm_backward, rmsnorm_forward
    rng = np.random.default_rng(0)
    x, w, dout = rand(rng, (37, C), scale=3.0) + 1.0, rand(rng, (C,)), rand(rng, (37, C))
    if norm == "rmsnorm":
        forward = lambda x_, w_: rmsnorm_forward(x_, w_, eps=1e-6)
        backward = lambda d, cache, w_, dw: rmsnorm_backward(d, cache, w_, dw)
    else:
        forward = lambda x_, w_: layernorm_forward(x_, w_, None, eps=1e-6)
        backward = lambda d, cache, w_, dw: layernorm_backward(d, cache, w_, dw, None)
    out, cache = forward(x, w)
    dw = np.zeros(C)
    dx = backward(dout, cache, w, dw)
    g_out, g_cache = forward(cp.asarray(x), cp.asarray(w))
    g_dw = cp.zeros(C)
    g_dx = backward(cp.asarray(dout), g_cache, cp.asarray(w), g_dw)
    assert relative_error(g_out, out) < 1e-12
    assert relative_error(g_dx, dx) < 1e-11
    assert relative_error(g_dw, dw) < 1e-11


# every dtype at the two widths that bound the wide rows' cases; one dtype each at
# the other two (each width and dtype is its own compiled kernel: about 1.5 s on CI)
WIDE_NORM_CASES = [(C, dtype) for C in (2050, 4096) for dtype in (np.float32, np.float16, BFLOAT16)] \
    + [(2304, BFLOAT16), (3072, np.float16)]


@pytest.mark.parametrize("C,dtype", WIDE_NORM_CASES,
                         ids=[f"{C}-{np.dtype(dtype).name}" for C, dtype in WIDE_NORM_CASES])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norm_kernel_spreads_a_wide_row_over_the_warps_of_a_block(cp, C, dtype, norm, monkeypatch):
    """Rows of more than 1024 channels take a block of ceil(C / 1024) warps:
    three at 2050 (its last values part-filled), 2304 and 3072, four at 4096.
    The backward's grid on the emulator's four multiprocessors is 8 blocks, so
    each block adds three of the 24 rows into the column sums its threads
    keep. The fused kernels run both ways, on activations in `dtype` and
    float32 weights (the mixed-precision model's), against the layers' float64
    NumPy code; only the output is rounded to `dtype`."""
    from xpmodel.cuda import layernorm as kernels
    from xpmodel.layers.layernorm import layernorm_backward, layernorm_forward
    from xpmodel.layers.rmsnorm import rmsnorm_backward, rmsnorm_forward
    calls = []
    for name in ("layernorm_forward", "layernorm_backward"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    rng = np.random.default_rng(0)
    N = 24
    x, dout = (rand(rng, (N, C), scale=3.0) + 1.0).astype(dtype), rand(rng, (N, C), dtype)
    w, b = rand(rng, (C,), np.float32), rand(rng, (C,), np.float32)
    if norm == "rmsnorm":
        forward, b = rmsnorm_forward, None
        backward = lambda d, cache, w_, dw, db, **kwargs: rmsnorm_backward(d, cache, w_, dw, **kwargs)
    else:
        forward, backward = layernorm_forward, layernorm_backward
    wide = lambda a: None if a is None else a.astype(np.float64)
    out, cache = forward(wide(x), wide(w), wide(b))
    dw, db = np.zeros(C), np.zeros(C)
    dx = backward(wide(dout), cache, wide(w), dw, None if b is None else db)

    g_out, g_cache = forward(cp.asarray(x), cp.asarray(w), None if b is None else cp.asarray(b), dtype)
    g_dw, g_db = cp.zeros(C, np.float32), cp.zeros(C, np.float32)
    dx_start, sum_start = rand(rng, (N, C), np.float32), rand(rng, (C,), np.float32)
    g_dx, g_dx_low, g_dx_sum = cp.asarray(dx_start), cp.empty((N, C), dtype), cp.asarray(sum_start)
    backward(cp.asarray(dout), g_cache, cp.asarray(w), g_dw, None if b is None else g_db, dx=g_dx,
             dx_low=g_dx_low, dx_sum=g_dx_sum)
    assert calls == ["layernorm_forward", "layernorm_backward"]
    assert g_out.dtype == dtype
    assert relative_error(g_out, out) < {np.float32: 1e-6, np.float16: 1e-3, BFLOAT16: 5e-3}[dtype]
    assert relative_error(g_dx, dx_start + dx) < 1e-6
    assert np.array_equal(to_host(g_dx_low), to_host(g_dx).astype(dtype))
    assert relative_error(g_dx_sum, sum_start + to_host(g_dx).astype(np.float64).sum(axis=0)) < 1e-6
    assert relative_error(g_dw, dw) < 1e-5
    if b is not None:
        assert relative_error(g_db, db) < 1e-5


@pytest.mark.parametrize("C", [64, 100])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_rows_wider_than_the_norm_kernel_takes_the_xp_expressions(cp, C, norm, monkeypatch):
    """Past cuda.layernorm.MAX_WIDTH (lowered here to 64) the norms run as
    CuPy expressions, both ways, with the same results."""
    from xpmodel.cuda import layernorm as kernels
    from xpmodel.layers.layernorm import layernorm_backward, layernorm_forward
    from xpmodel.layers.rmsnorm import rmsnorm_backward, rmsnorm_forward
    monkeypatch.setattr(kernels, "MAX_WIDTH", 64)
    calls = []
    for name in ("layernorm_forward", "layernorm_backward"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    rng = np.random.default_rng(0)
    x, w, b, dout = rand(rng, (37, C), scale=3.0) + 1.0, rand(rng, (C,)), rand(rng, (C,)), rand(rng, (37, C))
    if norm == "rmsnorm":
        forward, backward = rmsnorm_forward, lambda d, cache, w_, dw, db: rmsnorm_backward(d, cache, w_, dw)
        b = None
    else:
        forward, backward = layernorm_forward, layernorm_backward
    out, cache = forward(x, w, b)
    dw, db = np.zeros(C), np.zeros(C)
    dx = backward(dout, cache, w, dw, None if b is None else db)
    g_out, g_cache = forward(cp.asarray(x), cp.asarray(w), None if b is None else cp.asarray(b))
    g_dw, g_db = cp.zeros(C), cp.zeros(C)
    g_dx = backward(cp.asarray(dout), g_cache, cp.asarray(w), g_dw, None if b is None else g_db)
    assert calls == (["layernorm_forward", "layernorm_backward"] if C <= 64 else [])
    assert relative_error(g_out, out) < 1e-12 and relative_error(g_dx, dx) < 1e-11
    assert relative_error(g_dw, dw) < 1e-11 and relative_error(g_db, db) < 1e-11


@pytest.mark.parametrize("n_kv_head,rotary", [(2, True), (1, True), (4, True), (2, False)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_rope_and_grouped_head_split_and_merge_match_numpy(cp, n_kv_head, rotary, dtype):
    """Attention with rotary positions and grouped keys/values, through T x T
    scores: the fused split (bias, rotation, scale; H + 2 H_kv heads), the core's
    repeat of k and v over their groups and its group sums of their gradients,
    and the merge (rotation back, bias gradient) against the layer's NumPy
    expressions."""
    from xpmodel.backend import get_device
    from xpmodel.layers.attention import attention_backward, attention_forward
    from xpmodel.layers.rope import rope_tables
    rng = np.random.default_rng(0)
    B, T, H, D = 2, 12, 4, 8
    width = (H + 2 * n_kv_head) * D
    qkv, bias, dy = rand(rng, (B, T, width)), rand(rng, (width,)), rand(rng, (B * T, H * D))
    rope = rope_tables(T, D, 100.0, get_device("cpu"), np.float64) if rotary else None
    y, cache = attention_forward(qkv.copy(), H, bias=bias, n_kv_head=n_kv_head, rope=rope)
    dbias = np.zeros(width)
    dqkv = attention_backward(dy, cache, dbias)

    g_rope = tuple(cp.asarray(t.astype(np.float64 if dtype == np.float64 else np.float32))
                   for t in rope) if rotary else None
    g_y, g_cache = attention_forward(cp.asarray(qkv.astype(dtype)), H, bias=cp.asarray(bias.astype(dtype)),
                                     n_kv_head=n_kv_head, rope=g_rope)
    g_dbias = cp.zeros(width, dtype=np.float32 if dtype == np.float16 else dtype)
    g_dqkv = attention_backward(cp.asarray(dy.astype(dtype)), g_cache, g_dbias)
    tol = TOLERANCE[dtype] * 5
    assert relative_error(g_y, y) < tol
    assert relative_error(g_dqkv, dqkv) < tol
    assert relative_error(g_dbias, dbias) < tol


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_mlp_activation_kernels_match_numpy(cp, activation, dtype):
    """SwiGLU and squared ReLU, one kernel each way: the bias added into h in
    place, the output, the input gradient and the bias gradient against NumPy."""
    from xpmodel.layers import relu2, swiglu
    forward, backward = {"swiglu": (swiglu.swiglu_forward, swiglu.swiglu_backward),
                         "relu2": (relu2.relu2_forward, relu2.relu2_backward)}[activation]
    rng = np.random.default_rng(0)
    rows, width = 37, 2 * 100
    out_width = width // 2 if activation == "swiglu" else width
    h, bias = rand(rng, (rows, width), dtype, 2.0), rand(rng, (width,), dtype)
    dout = rand(rng, (rows, out_width), dtype)
    h64 = h.astype(np.float64)
    out, cache = forward(h64, bias.astype(np.float64))
    dbias = np.zeros(width)
    dh = backward(dout.astype(np.float64), h64, cache, dbias)

    g_h = cp.asarray(h)
    g_out, g_cache = forward(g_h, cp.asarray(bias))
    g_dbias = cp.zeros(width, np.float64 if dtype == np.float64 else np.float32)
    g_dh = backward(cp.asarray(dout), g_h, g_cache, g_dbias)
    tol = TOLERANCE[dtype] * 5
    assert g_out.dtype == dtype and g_dh.dtype == dtype
    assert relative_error(g_h, h64) < tol                    # h now holds h + bias
    assert relative_error(g_out, out) < tol
    assert relative_error(g_dh, dh) < tol
    assert relative_error(g_dbias, dbias) < tol


@pytest.mark.parametrize("device", ["cuda", "emulated-cuda"], indirect=True)
@pytest.mark.parametrize("kernels", ["fused", "xp"])
def test_one_attention_head_trains_on_the_cuda_path(device, kernels):
    """With n_head = 1 the heads' axis has size 1, and a contiguous copy keeps
    its stride arbitrary: the batched products must not read it."""
    config = xpmodel.GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=1, n_embd=8)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 11, (2, 4))
    targets = np.roll(idx, -1, axis=1)
    reference = xpmodel.GPT(config, seed=0)
    want = float(reference.forward_backward(idx, targets))
    model = xpmodel.GPT(config, device=device, seed=0, kernels=kernels)
    assert float(model.forward_backward(idx, targets)) == pytest.approx(want, rel=1e-5)
    assert relative_error(model.flat_grads, to_host(reference.flat_grads)) < 1e-4
