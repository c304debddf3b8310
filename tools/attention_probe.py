"""Attention alone on the GPU, forward and backward, at the benchmark configs'
shapes: the flash kernels (xpmodel/cuda/flash.py) against the path through
T x T scores, in milliseconds (CUDA events, median of repeats) and TFLOP/s
of the causal half, for float16 and bfloat16 heads; a config with grouped-query
attention (llama-char, llama-small) gets its H_kv key/value heads. Both
paths' outputs and input gradients are compared at these full sizes with a
float32 reference on the first batch element: the layers' own `xp` code
(use_kernels("xp"): no CUDA kernel of xpmodel, not even the head split, but
for the dropout mask's) on the same 16-bit inputs upcast. With --dropout RATE every path drops the
probabilities with the same counter-based mask (cuda/random.py), which the
flash kernels draw themselves.

    python tools/attention_probe.py [--configs char-mid gpt2-small llama-small] [--dtypes float16 bfloat16]
    python tools/attention_probe.py --configs char-mid --dropout 0.2
"""
import math
import sys
from pathlib import Path

import numpy as np


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_gpu import CONFIGS
    from cli_args import ArgumentParser, DocstringFormatter, non_negative_float
    from gpu_sections import timed
    parser = ArgumentParser(description=__doc__, formatter_class=DocstringFormatter)
    parser.add_argument("--configs", nargs="+", default=["char-mid", "gpt2-small", "llama-small"],
                        choices=list(CONFIGS))
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=("float16", "bfloat16"))
    parser.add_argument("--dropout", type=non_negative_float, default=0.0,
                        help="dropout on the probabilities, below 1")
    args = parser.parse_args()
    if args.dropout >= 1:
        parser.error(f"--dropout {args.dropout:g}: must be below 1")
    try:
        import cupy
    except ImportError:
        parser.error("CuPy is not importable: the probe runs on a GPU (pip install 'xpmodel[cuda12]')")
    from xpmodel.backend import BFLOAT16, use_kernels
    from xpmodel.cuda import flash
    from xpmodel.cuda.random import CounterGenerator
    from xpmodel.layers import attention
    rate = args.dropout

    def generator():   # the same first stream, so every path drops the same probabilities
        return CounterGenerator(0)

    def layer(qkv, H, H_kv):
        return attention.attention_forward(qkv, H, rate, generator(), n_kv_head=H_kv)
    for name, dtype_name in [(n, d) for d in args.dtypes for n in args.configs]:
        dtype = BFLOAT16 if dtype_name == "bfloat16" else np.dtype(np.float16)
        _, H, C, T, B, _, options = CONFIGS[name]
        D = C // H
        H_kv = options.get("n_kv_head", H)
        g = cupy.random.default_rng(0)
        qkv = g.standard_normal((B, T, (H + 2 * H_kv) * D), dtype=np.float32).astype(dtype)
        heads = attention.split_heads(qkv, None, H) if H_kv == H else _grouped_heads(qkv, H, H_kv, D)
        dout = g.standard_normal((B * T, C), dtype=np.float32).astype(dtype)
        flops = 2 * 2 * B * H * T * (T + 64) / 2 * D       # two products over the causal tiles
        print(f"{name} {dtype_name}: B={B} H={H} H_kv={H_kv} T={T} D={D} dropout={rate}")
        flash_on = flash.ENABLED                            # XPMODEL_FLASH=0 leaves the kernels out
        if flash_on:
            dropout = (rate, generator().next_key()) if rate else None
            out, lse = flash.flash_forward(heads, dropout)
            forward = timed(lambda: flash.flash_forward(heads, dropout))
            backward = timed(lambda: flash.flash_backward(dout, heads, out, lse, 1.0 / math.sqrt(D),
                                                          dropout))
            print(f"  flash kernels         forward {forward:7.3f} ms ({flops / forward / 1e9:5.0f} TFLOP/s)"
                  f"  backward {backward:7.3f} ms ({2.5 * flops / backward / 1e9:5.0f} TFLOP/s)")
            y_flash, cache = layer(qkv, H, H_kv)
            dqkv_flash = attention.attention_backward(dout, cache)
        flash.ENABLED = False
        try:
            y, cache = layer(qkv, H, H_kv)
            dqkv = attention.attention_backward(dout, cache)
            forward = timed(lambda: layer(qkv, H, H_kv))
            backward = timed(lambda: attention.attention_backward(dout, cache))
        finally:
            flash.ENABLED = flash_on
        print(f"  through T x T scores  forward {forward:7.3f} ms  backward {backward:7.3f} ms"
              " (with the head split and merge)")
        with use_kernels("xp"):   # batch element 0's masks are the full batch's first
            y_ref, cache = layer(qkv[:1].astype(np.float32), H, H_kv)
            dqkv_ref = attention.attention_backward(dout[:T].astype(np.float32), cache)
        results = [("T x T", y, dqkv)] + ([("flash", y_flash, dqkv_flash)] if flash_on else [])
        for label, out_, grad in results:           # rows [0, T): the first batch element
            print(f"  {label:6s} against float32  output {_relative(out_[:T], y_ref):.1e}, input gradient "
                  f"{_relative(grad[:T], dqkv_ref):.1e} (max |difference| / max |reference|)")


def _relative(a, reference):
    a = a.astype(np.float32)
    return float(abs(a - reference).max() / abs(reference).max())


def _grouped_heads(qkv, H, H_kv, D):
    """qkv (B, T, (H + 2 H_kv) D) -> q (B, H, T, D) scaled by 1/sqrt(D), k, v (B, H_kv, T, D)."""
    import cupy
    B, T, _ = qkv.shape
    q = qkv[..., :H * D].reshape(B, T, H, D).transpose(0, 2, 1, 3) * (1.0 / math.sqrt(D))
    k, v = (qkv[..., (H + i * H_kv) * D:(H + (i + 1) * H_kv) * D].reshape(B, T, H_kv, D).transpose(0, 2, 1, 3)
            for i in range(2))
    return tuple(cupy.ascontiguousarray(x.astype(qkv.dtype)) for x in (q, k, v))


if __name__ == "__main__":
    main()
