"""Every raw CUDA kernel, in the variants the configs use (float32, float16
and bfloat16 activations), compiles with NVRTC (the compiler CuPy uses) for
the Ampere, Ada, Hopper and Blackwell architectures without register spills
(ARCHS names the one Blackwell exception), and every launch's block fits a
multiprocessor's registers; the bfloat16 builds use bfloat16 instructions
only. Needs g++ (the kernels are built by running the layers on the CPU
emulator) and the nvidia-cuda-nvrtc wheel; no GPU."""
import numpy as np
import pytest

import cuda_emulator
from xpmodel.backend import BFLOAT16, is_half
from cuda_emulator import nvrtc

NVRTC = nvrtc.library()
pytestmark = [
    pytest.mark.skipif(cuda_emulator.compiler() is None, reason="the CUDA emulator needs g++"),
    pytest.mark.skipif(NVRTC is None, reason="needs the nvidia-cuda-nvrtc wheel"),
]

# sm_80 (A100), sm_89 (L4, L40S, RTX 4090) and sm_90 (H100, H200): without spills.
# sm_100 (B200) and sm_120 (RTX 50xx): compiled and every launch fits; NVRTC 12.9
# spills 56-88 bytes of crossentropy_rows at GPT-2's vocabulary there (800 threads,
# 72 registers), left until a Blackwell GPU has timed it (tools/GPU_NOTES.md)
ARCHS, SPILLS_ALLOWED = [80, 89, 90, 100, 120], {100, 120}

# (n_embd, vocab_size, block_size): shakespeare-char, char-mid, gpt2-small
SHAPES = [(384, 65, 256), (384, 4096, 256), (768, 50304, 1024)]


def kernels_of_a_pass(cp, C, V, T, low):
    """Run every fused layer once on small inputs with C channels, V classes,
    T positions and activations in `low`, so each kernel variant a model of
    that shape uses is built."""
    from xpmodel.layers.attention import (causal_softmax_backward, causal_softmax_forward,
                                          merge_heads, split_heads)
    from xpmodel.layers.crossentropy import crossentropy_fused
    from xpmodel.layers.gelu import gelu_backward, gelu_forward
    from xpmodel.layers.layernorm import layernorm_backward, layernorm_forward
    from xpmodel.layers.dropout import KeepMask
    from xpmodel.layers.residual import residual_forward
    x, w = cp.ones((2, C), np.float32), cp.ones(C, np.float32)
    out, cache = layernorm_forward(x, w, w, low)
    layernorm_backward(out, cache, w, cp.zeros(C, np.float32), cp.zeros(C, np.float32), dx=x,
                       dx_low=cp.empty((2, C), low))
    residual_forward(x, cp.ones((2, C), low), cp.ones(C, low), KeepMask(cp.ones((2, C), bool), 1.25))
    split_heads(cp.ones((1, 2, 3 * C), low), cp.ones(3 * C, low), C // 64)
    h = cp.ones((2, 4 * C), low)
    gelu_forward(h, cp.ones(4 * C, low))
    gelu_backward(h, h, None, dbias=cp.zeros(4 * C, np.float32))
    merge_heads(cp.ones((3, 1, C // 64, 2, 64), low), cp.zeros(3 * C, np.float32))
    probs = causal_softmax_forward(cp.ones((1, 1, T, T), low), low)
    causal_softmax_backward(probs, probs, low)
    crossentropy_fused(cp.ones((2, V), low), cp.asarray(np.array([0, V - 1])), cp.asarray(0.5))
    # the architecture options: RMSNorm, and the head split / merge with RoPE and grouped kv heads
    from xpmodel.cuda.rope_heads import merge_rope_heads, split_rope_heads
    from xpmodel.layers.rmsnorm import rmsnorm_backward, rmsnorm_forward
    out, cache = rmsnorm_forward(x, w, None, low)
    rmsnorm_backward(out, cache, w, cp.zeros(C, np.float32), dx=x, dx_low=cp.empty((2, C), low))
    H = C // 64
    rope = (cp.ones((2, 32), np.float32), cp.ones((2, 32), np.float32))
    heads = split_rope_heads(cp.ones((1, 2, (H + 2) * 64), low), cp.ones((H + 2) * 64, low), H, 1,
                             rope, 0.125)
    merge_rope_heads(heads, rope, cp.zeros((H + 2) * 64, np.float32))
    from xpmodel.layers.relu2 import relu2_backward, relu2_forward
    from xpmodel.layers.swiglu import swiglu_backward, swiglu_forward
    h = cp.ones((2, 4 * C), low)
    g, _ = swiglu_forward(h, cp.ones(4 * C, low))
    swiglu_backward(g, h, None, dbias=cp.zeros(4 * C, np.float32))
    g, _ = relu2_forward(h, cp.ones(4 * C, low))
    relu2_backward(g, h, None, dbias=cp.zeros(4 * C, np.float32))
    from xpmodel.cuda.random import CounterGenerator
    from xpmodel.layers.dropout import apply_mask
    apply_mask(h, KeepMask(CounterGenerator(0).keep_mask(h.shape, 0.1), 1 / 0.9))
    CounterGenerator(0).random((2, C), np.float32)
    if is_half(low):
        from xpmodel.cuda.flash import flash_backward, flash_forward
        heads = cp.ones((3, 1, 1, 64, 64), low)
        for dropout in (None, (0.1, (1, 2))):   # the flash builds without and with dropout
            out, lse = flash_forward(heads, dropout)
            flash_backward(out, heads, out, lse, 0.125, dropout)


def every_kernel_variant():
    """{source: names of its kernels built} and [(name, source, block)] of
    every launch, for every kernel variant of a pass at SHAPES."""
    start, launches = len(cuda_emulator.built), len(cuda_emulator.launched)
    with cuda_emulator.emulated_cuda() as cp:
        for C, V, T in SHAPES:
            for low in (np.float16, BFLOAT16, np.float32):
                kernels_of_a_pass(cp, C, V, T, low)
        from xpmodel.layers.attention import merge_heads, split_heads
        for low in (np.float16, BFLOAT16):   # the widest head grids: 1024 threads from C = 2731
            heads = split_heads(cp.ones((1, 2, 3 * 3072), low), cp.ones(3 * 3072, low), 48)
            merge_heads(heads, cp.zeros(3 * 3072, np.float32))
    names_by_code = {}
    for name, code in cuda_emulator.built[start:]:
        names_by_code.setdefault(code, set()).add(name)
    return names_by_code, cuda_emulator.launched[launches:]


def check_launches_fit(code, log, launches, arch):
    """Each launch of `code`'s kernels asks for no more registers than a
    multiprocessor has (ptxas's count a thread times the block's threads)."""
    registers = nvrtc.registers(log)
    for name, launched_code, block in launches:
        if launched_code == code:
            threads = block[0] * block[1] * block[2]
            assert nvrtc.fits_a_multiprocessor(registers[name], threads), \
                f"{name}: {threads} threads of {registers[name]} registers do not fit sm_{arch}"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles_without_spills_and_every_launch_fits(arch):
    variants, launches = every_kernel_variant()
    every_name = set().union(*variants.values())
    assert {"layernorm_forward", "layernorm_backward", "gelu_forward", "gelu_backward",
            "causal_softmax_forward", "causal_softmax_backward", "crossentropy",
            "crossentropy_rows", "residual_add", "split_heads", "causal_softmax_forward_h16",
            "causal_softmax_backward_h16", "merge_heads", "flash_forward", "flash_delta",
            "flash_backward", "flash_dq_store", "split_heads_h16", "merge_heads_h16",
            "split_rope_heads", "merge_rope_heads", "split_rope_heads_h16x8",
            "merge_rope_heads_h16x8", "swiglu_forward", "swiglu_backward",
            "relu2_forward", "relu2_backward", "keep_mask", "uniform", "apply_keep_mask"} <= every_name
    for code, names in variants.items():
        name = "/".join(sorted(names))
        ok, log = nvrtc.compile_kernel(NVRTC, code, arch)
        assert ok, f"{name} does not compile for sm_{arch}:\n{log}"
        assert arch in SPILLS_ALLOWED or nvrtc.spills(log) == 0, \
            f"{name} spills registers on sm_{arch}:\n{log}"
        check_launches_fit(code, log, launches, arch)
    assert {name for name, _, _ in launches} == every_name


@pytest.mark.parametrize("arch", ARCHS)
def test_norm_kernels_compile_without_spills_at_larger_widths(arch):
    """The norm kernels hold a row's C values in registers (and, a warp a row,
    the block's column sums in shared memory), so they are the ones C can
    break: checked at the widths of GPT-2 medium, large and XL (the README's
    bigger-model table), where a row takes one warp or two, and at the Llama
    widths of 4096 and MAX_WIDTH (8192), where it takes a block of four or
    eight warps; float16, bfloat16 and float32 activations. (RMSNorm's build is
    LayerNorm's without the mean's sums.)"""
    from xpmodel.cuda.layernorm import MAX_WIDTH
    start, launches = len(cuda_emulator.built), len(cuda_emulator.launched)
    widths = (1024, 1280, 1600, 4096, MAX_WIDTH)
    with cuda_emulator.emulated_cuda() as cp:
        from xpmodel.layers.layernorm import layernorm_backward, layernorm_forward
        for C in widths:
            for low in (np.float16, BFLOAT16, np.float32):
                x, w = cp.ones((2, C), np.float32), cp.ones(C, np.float32)
                out, cache = layernorm_forward(x, w, w, low)
                layernorm_backward(out, cache, w, cp.zeros(C, np.float32), cp.zeros(C, np.float32),
                                   dx=x, dx_low=cp.empty((2, C), low))
    codes = {code for _, code in cuda_emulator.built[start:]}
    assert len(codes) == 2 * 3 * len(widths)   # forward and backward, per width and activation type
    for code in codes:
        ok, log = nvrtc.compile_kernel(NVRTC, code, arch)
        assert ok and nvrtc.spills(log) == 0, log
        check_launches_fit(code, log, cuda_emulator.launched[launches:], arch)


def test_bfloat16_builds_use_bfloat16_instructions():
    """One source, two 16-bit types: a kernel built for bfloat16 arrays converts
    with cvt.rn.bf16.f32 and multiplies with bf16 mma.sync; none of it keeps a
    float16 instruction (which would read the bits as the wrong type)."""
    start = len(cuda_emulator.built)
    with cuda_emulator.emulated_cuda() as cp:
        from xpmodel.cuda.flash import flash_backward, flash_forward
        heads = cp.ones((3, 1, 1, 64, 64), BFLOAT16)
        out, lse = flash_forward(heads)
        flash_backward(out, heads, out, lse, 0.125)
    codes = {code for _, code in cuda_emulator.built[start:]}
    assert codes and all("#define H16_IS_BF16 1" in code for code in codes)
    ptx = "\n".join(nvrtc.ptx(NVRTC, code, 80) for code in codes)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx
    assert "cvt.rn.bf16.f32" in ptx
    assert ".f16.f16" not in ptx and "cvt.rn.f16.f32" not in ptx and "cvt.f32.f16" not in ptx
