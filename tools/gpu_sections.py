"""Where an xpmodel training step spends its GPU time: the whole step, its
parts, and each layer's forward + backward at the config's shapes, timed
with CUDA events (median of repeats). For finding the next thing to speed up.

    python tools/gpu_sections.py [--config gpt2-small] [--precision fp16]
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np


def timed(fn, repeat=10):
    """Median milliseconds of fn() on the GPU, after one warm-up call."""
    import cupy
    fn()
    times = []
    for _ in range(repeat):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_gpu import CONFIGS
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="gpt2-small", choices=list(CONFIGS))
    parser.add_argument("--precision", default="fp16", choices=("fp16", "fp32"))
    args = parser.parse_args()
    import cupy
    import xpmodel
    from xpmodel.layers import attention, crossentropy, gelu, layernorm, linear
    L, H, C, T, B, V, options = CONFIGS[args.config]
    config = xpmodel.GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C, **options)
    model = xpmodel.GPT(config, device="cuda", precision=args.precision)
    opt = xpmodel.AdamW(model, lr=1e-4)
    rng = np.random.default_rng(0)
    idx, targets = (rng.integers(0, V, (B, T)) for _ in range(2))
    low = model.compute_dtype
    N = B * T

    def step():
        model.zero_grad()
        model.forward_backward(idx, targets)
        xpmodel.clip_grad_norm(model, 1.0)
        opt.step()

    rows = {"step": timed(step), "forward_backward": timed(lambda: model.forward_backward(idx, targets)),
            "loss (forward only)": timed(lambda: model.loss(idx, targets)),
            "clip + AdamW": timed(lambda: (xpmodel.clip_grad_norm(model, 1.0), opt.step()))}
    g = cupy.random.default_rng(0)
    x = g.standard_normal((N, C), dtype=np.float32)
    w, b = cupy.ones(C, np.float32), cupy.zeros(C, np.float32)
    dw, db = cupy.zeros(C, np.float32), cupy.zeros(C, np.float32)
    d_low = g.standard_normal((N, C), dtype=np.float32).astype(low)

    def ln():
        out, cache = layernorm.layernorm_forward(x, w, b, low)
        layernorm.layernorm_backward(d_low, cache, w, dw, db, dx=x)
    h = g.standard_normal((N, 4 * C), dtype=np.float32).astype(low)

    fc_bias = cupy.zeros(4 * C, low)

    def gelu_pair():
        out, cache = gelu.gelu_forward(h, fc_bias)
        gelu.gelu_backward(out, h, cache)
    qkv = g.standard_normal((B, T, 3 * C), dtype=np.float32).astype(low)

    qkv_bias = cupy.zeros(3 * C, low)

    def attention_pair():
        y, cache = attention.attention_forward(qkv, H, bias=qkv_bias)
        attention.attention_backward(y, cache)

    def attention_pair_tt():   # the path through T x T scores, for comparison
        from xpmodel.cuda import flash
        enabled, flash.ENABLED = flash.ENABLED, False
        try:
            attention_pair()
        finally:
            flash.ENABLED = enabled
    scores = g.standard_normal((B, H, T, T), dtype=np.float32).astype(low)   # as the model keeps them

    def softmax_pair():
        probs = attention.causal_softmax_forward(scores, low)
        attention.causal_softmax_backward(scores, probs, low)
    W = model.weights["h.0.mlp.c_fc.weight"]
    Wb = model.weights["h.0.mlp.c_fc.bias"]
    G, Gb = model.grads["h.0.mlp.c_fc.weight"], model.grads["h.0.mlp.c_fc.bias"]
    a = d_low

    def fc_pair():
        out = linear.linear_forward(a, W, Wb)
        linear.linear_backward(out, a, W, G, Gb)
    rows_per_chunk = min(N, max(1, (1 << 27) // V))
    logits_in = g.standard_normal((rows_per_chunk, V), dtype=np.float32).astype(low)
    tgt = cupy.asarray(rng.integers(0, V, rows_per_chunk))

    def xent():
        crossentropy.crossentropy_fused(logits_in.copy(), tgt, 1.0)
    per_layer = {"layernorm fwd+bwd (x2 per layer)": timed(ln), "gelu fwd+bwd": timed(gelu_pair),
                 "attention fwd+bwd (core, no projections)": timed(attention_pair),
                 "  the same through T x T scores": timed(attention_pair_tt),
                 "  of which causal softmax fwd+bwd": timed(softmax_pair),
                 "mlp c_fc linear fwd+bwd": timed(fc_pair),
                 f"cross-entropy fused, one chunk of {rows_per_chunk} rows (+copy)": timed(xent)}
    flops = config.flops_per_token() * N
    print(f"{args.config} {args.precision}: step {rows['step']:.2f} ms "
          f"({N / rows['step'] * 1e3:,.0f} tokens/s, {flops / rows['step'] / 1e9:.0f} TFLOP/s)")
    for name, ms in {**rows, **per_layer}.items():
        print(f"  {name:58s} {ms:8.3f} ms")
    print(f"  chunks of logits per pass: {math.ceil(N / rows_per_chunk)}")


if __name__ == "__main__":
    main()
