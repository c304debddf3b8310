"""Where an xpmodel training step spends its GPU time: the whole step, its
parts, and each layer's forward + backward at the config's shapes (its own
norm, MLP activation and attention options), timed with CUDA events (median
of repeats), once with the fused kernels of xpmodel/cuda and once with every
layer's own `xp` code on CuPy (GPT(kernels="xp")), with the ratio: what each
fused kernel buys. For finding the next thing to speed up.

    python tools/gpu_sections.py [--config gpt2-small] [--precision fp16|bf16|fp32] [--kernels fused xp]
"""
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
    from cli_args import ArgumentParser
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="gpt2-small", choices=list(CONFIGS))
    parser.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--kernels", nargs="+", default=["fused", "xp"], choices=("fused", "xp"))
    args = parser.parse_args()
    try:
        import cupy
    except ImportError:
        parser.error("CuPy is not importable: the sections run on a GPU (pip install 'xpmodel[cuda12]')")
    import xpmodel
    from xpmodel.backend import use_kernels
    from xpmodel.layers import attention, crossentropy, linear
    from xpmodel.layers.block import ACTIVATIONS, NORM_LAYERS
    from xpmodel.layers.matmul import matmul
    L, H, C, T, B, V, options = CONFIGS[args.config]
    config = xpmodel.GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C, **options)
    model = xpmodel.GPT(config, device="cuda", precision=args.precision)
    opt = xpmodel.AdamW(model, lr=1e-4)
    muon = xpmodel.Muon(model, lr=1e-4)
    rng = np.random.default_rng(0)
    idx, targets = (rng.integers(0, V, (B, T)) for _ in range(2))
    low = model.compute_dtype
    N = B * T

    def step():
        model.zero_grad()
        model.forward_backward(idx, targets)
        xpmodel.clip_grad_norm(model, 1.0)
        opt.step()

    passes = {"step": step, "forward_backward": lambda: model.forward_backward(idx, targets),
              "loss (forward only)": lambda: model.loss(idx, targets),
              "clip + AdamW": lambda: (xpmodel.clip_grad_norm(model, 1.0), opt.step()),
              "clip + Muon": lambda: (xpmodel.clip_grad_norm(model, 1.0), muon.step())}
    g = cupy.random.default_rng(0)
    x = g.standard_normal((N, C), dtype=np.float32)
    has_bias = config.norm == "layernorm" and config.bias
    w, b = cupy.ones(C, np.float32), (cupy.zeros(C, np.float32) if has_bias else None)
    dw, db = cupy.zeros(C, np.float32), (cupy.zeros(C, np.float32) if has_bias else None)
    d_low = g.standard_normal((N, C), dtype=np.float32).astype(low)
    norm_forward, norm_backward = NORM_LAYERS[config.norm]

    def norm_pair():
        out, cache = norm_forward(x, w, b, low)
        norm_backward(d_low, cache, w, dw, db, dx=x)
    fc = model.weights["h.0.mlp.c_fc.weight"]                                  # (C, F or 2F)
    h = g.standard_normal((N, fc.shape[1]), dtype=np.float32).astype(low)
    fc_bias = cupy.zeros(fc.shape[1], low) if config.bias else None
    activation_forward, activation_backward = ACTIVATIONS[config.mlp]

    def activation_pair():
        out, cache = activation_forward(h, fc_bias)
        activation_backward(out, h, cache)
    qkv = g.standard_normal((B, T, config.qkv_width), dtype=np.float32).astype(low)
    qkv_bias = cupy.zeros(config.qkv_width, low) if config.bias else None
    rope = model.rope_tables(0, T)
    qk_norm = ((model.params["h.0.attn.q_norm.weight"], model.params["h.0.attn.k_norm.weight"],
                config.norm_eps) if config.qk_norm else None)
    dqk_norm = ((model.grads["h.0.attn.q_norm.weight"], model.grads["h.0.attn.k_norm.weight"])
                if config.qk_norm else None)

    def attention_pair():
        y, cache = attention.attention_forward(qkv, H, bias=qkv_bias, n_kv_head=config.kv_heads,
                                               qk_norm=qk_norm, rope=rope)
        attention.attention_backward(y, cache, qk_norm=qk_norm, dqk_norm=dqk_norm)

    def attention_pair_tt():   # the path through T x T scores, for comparison
        from xpmodel.cuda import flash
        enabled, flash.ENABLED = flash.ENABLED, False
        try:
            attention_pair()
        finally:
            flash.ENABLED = enabled

    def softmax_pair():   # scores in the dtype the mode keeps them in (float32 for the xp code)
        scores = softmax_scores[attention._score_dtype(qkv)]
        probs = attention.causal_softmax_forward(scores, low)
        attention.causal_softmax_backward(scores, probs, low)
    softmax_scores = {}
    for dtype in {np.dtype(low), np.dtype(np.float32)}:
        softmax_scores[dtype] = g.standard_normal((B, H, T, T), dtype=np.float32).astype(dtype)
    W = model.weights["h.0.mlp.c_fc.weight"]
    Wb = model.weights.get("h.0.mlp.c_fc.bias")
    G, Gb = model.grads["h.0.mlp.c_fc.weight"], model.grads.get("h.0.mlp.c_fc.bias")
    a = d_low

    def fc_pair():
        out = linear.linear_forward(a, W, Wb) if Wb is not None else matmul(a, W)
        linear.linear_backward(out, a, W, G, Gb)
    rows_per_chunk = min(N, max(1, (1 << 27) // V))
    logits_in = g.standard_normal((rows_per_chunk, V), dtype=np.float32).astype(low)
    tgt = cupy.asarray(rng.integers(0, V, rows_per_chunk))

    def xent():
        crossentropy.crossentropy_fused(logits_in.copy(), tgt, 1.0)
    qk = ", QK-norm" if config.qk_norm else ""
    rope_name = ", RoPE" if rope is not None else ""
    gqa = f", {config.kv_heads} kv heads" if config.kv_heads != H else ""
    per_layer = {f"{config.norm} fwd+bwd (x2 per layer)": norm_pair,
                 f"{config.mlp} fwd+bwd": activation_pair,
                 f"attention fwd+bwd (core{gqa}{rope_name}{qk}, no projections)": attention_pair,
                 "  the same through T x T scores": attention_pair_tt,
                 "  of which causal softmax fwd+bwd": softmax_pair,
                 "mlp c_fc linear fwd+bwd": fc_pair,
                 f"cross-entropy, one chunk of {rows_per_chunk} rows (+copy)": xent}
    fused_only = {"  the same through T x T scores"}   # the xp code has no flash path to leave

    times = {}   # (row, kernels) -> ms
    for kernels in args.kernels:
        model.kernels = kernels
        with use_kernels(kernels):
            for name, fn in {**passes, **per_layer}.items():
                if kernels == "fused" or name not in fused_only:
                    times[name, kernels] = timed(fn)
    model.kernels = "fused"

    flops = config.flops_per_token() * N
    print(f"{args.config} {args.precision}:", ", ".join(
        f"{kernels} step {times['step', kernels]:.2f} ms ({N / times['step', kernels] * 1e3:,.0f} "
        f"tokens/s, {flops / times['step', kernels] / 1e9:.0f} TFLOP/s)" for kernels in args.kernels))
    both = args.kernels == ["fused", "xp"]
    print(f"  {'ms':58s} " + " ".join(f"{k:>8s}" for k in args.kernels) + ("  xp/fused" if both else ""))
    for name in {**passes, **per_layer}:
        cells = [times.get((name, k)) for k in args.kernels]
        ratio = (f"  {cells[1] / cells[0]:7.2f}x" if both and None not in cells else "")
        print(f"  {name:58s} " + " ".join("       -" if c is None else f"{c:8.3f}" for c in cells)
              + ratio)
    print(f"  chunks of logits per pass: {math.ceil(N / rows_per_chunk)}")


if __name__ == "__main__":
    main()
