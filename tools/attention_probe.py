"""Attention alone on the GPU, forward and backward, at the benchmark configs'
shapes: the flash kernels (xpmodel/cuda/flash.py) against the path through
T x T scores, in milliseconds (CUDA events, median of repeats) and TFLOP/s
of the causal half, for float16 and bfloat16 heads.

    python tools/attention_probe.py [--configs char-mid gpt2-small] [--dtypes float16 bfloat16]
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_gpu import CONFIGS
    from gpu_sections import timed
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", nargs="+", default=["char-mid", "gpt2-small"], choices=list(CONFIGS))
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=("float16", "bfloat16"))
    args = parser.parse_args()
    import cupy
    from xpmodel.backend import BFLOAT16
    from xpmodel.cuda import flash
    from xpmodel.layers import attention
    for name, dtype_name in [(n, d) for d in args.dtypes for n in args.configs]:
        dtype = BFLOAT16 if dtype_name == "bfloat16" else np.dtype(np.float16)
        _, H, C, T, B, _, _ = CONFIGS[name]
        D = C // H
        g = cupy.random.default_rng(0)
        heads = (g.standard_normal((3, B, H, T, D), dtype=np.float32) *
                 cupy.asarray([1.0 / math.sqrt(D), 1.0, 1.0], np.float32)[:, None, None, None, None]).astype(dtype)
        dout = g.standard_normal((B * T, C), dtype=np.float32).astype(dtype)
        flops = 2 * 2 * B * H * T * (T + 64) / 2 * D       # two products over the causal tiles
        print(f"{name} {dtype_name}: B={B} H={H} T={T} D={D}")
        out, lse = flash.flash_forward(heads)
        forward = timed(lambda: flash.flash_forward(heads))
        backward = timed(lambda: flash.flash_backward(dout, heads, out, lse, 1.0 / math.sqrt(D)))
        print(f"  flash kernels         forward {forward:7.3f} ms ({flops / forward / 1e9:5.0f} TFLOP/s)"
              f"  backward {backward:7.3f} ms ({2.5 * flops / backward / 1e9:5.0f} TFLOP/s)")
        qkv = cupy.ascontiguousarray(heads.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * C))
        flash.ENABLED = False
        try:
            y, cache = attention.attention_forward(qkv, H)
            forward = timed(lambda: attention.attention_forward(qkv, H))
            backward = timed(lambda: attention.attention_backward(dout, cache))
        finally:
            flash.ENABLED = True
        print(f"  through T x T scores  forward {forward:7.3f} ms  backward {backward:7.3f} ms"
              " (with the head split and merge)")


if __name__ == "__main__":
    main()
