"""GPU training-step benchmark: xpmodel (CuPy) against the same model in
PyTorch eager with AMP (autocast to float16 or bfloat16, as xpmodel's
train.precision fp16 / bf16; float16 with a GradScaler), and torch.compile
when it works, alternating in one process on the same GPU. xpmodel runs twice: with its fused kernels
("xpmodel") and with every layer's own `xp` code on CuPy ("xpmodel xp",
GPT(kernels="xp"): cuBLAS products, CuPy's elementwise kernels); the ratio
on that line is what the fused kernels buy.

A step is zero-grad, forward, backward, global-norm clip and AdamW on random
tokens. The PyTorch model is laid out as torch.nn's GPT-2 would be ((out, in)
linear weights, scaled_dot_product_attention, fused AdamW). Prints tokens/s
(B*T / median step time), MFU against the GPU's dense 16-bit tensor-core peak
(xpmodel/train/peak_flops.py, or --peak-flops), peak GPU memory in use by each side
(arrays / tensors, not what the caching allocators hold) and the ratios.

    python tools/bench_gpu.py [--configs char-mid gpt2-small] [--steps 20] [--compile-configs gpt2-small]
    python tools/bench_gpu.py --precisions fp16 bf16   # each config in both 16-bit types
    python tools/bench_gpu.py --kernels fused   # xpmodel's fused kernels only, as before
    python tools/bench_gpu.py --device cpu --precisions fp32 bf16 --configs tiny --compile-configs   # a smoke test
"""
import statistics
import sys
from pathlib import Path

CONFIGS = {   # name: (n_layer, n_head, n_embd, block_size, batch_size, vocab_size, options)
    "tiny": (2, 2, 64, 32, 4, 256, {}),
    "char-mid": (6, 6, 384, 256, 64, 4096, {}),
    # shakespeare-char's model as it trains, dropout 0.2 (both sides drop inside flash attention)
    "shakespeare-char": (6, 6, 384, 256, 64, 256, {"dropout": 0.2}),
    "gpt2-small": (12, 12, 768, 1024, 16, 50304, {}),
}
# The Llama-style block of the llama-* presets (RMSNorm, RoPE, SwiGLU, GQA, no
# biases) at the same sizes; llama-small also unties its head, as the preset does.
LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False)
CONFIGS.update({"llama-tiny": CONFIGS["tiny"][:-1] + (dict(LLAMA, n_kv_head=1),),
                "llama-char": CONFIGS["char-mid"][:-1] + (dict(LLAMA, n_kv_head=2),),
                "llama-small": CONFIGS["gpt2-small"][:-1] + (dict(LLAMA, n_kv_head=4,
                                                                   tie_embeddings=False),)})
XPMODEL_SIDES = {"fused": "xpmodel", "xp": "xpmodel xp"}


def xpmodel_step(config, B, device, precision, kernels="fused"):
    import numpy as np
    import xpmodel
    from xpmodel.backend import synchronize
    from xpmodel.train.optim import clipped_step
    model = xpmodel.GPT(config, device=device, seed=0, precision=precision, kernels=kernels)
    opt = xpmodel.AdamW(model, lr=3e-4)
    scaler = xpmodel.LossScaler(xp=model.xp) if precision == "fp16" else None   # bf16: none
    rng = np.random.default_rng(0)
    # host arrays, as the trainer's sampler hands them over
    idx = rng.integers(0, config.vocab_size, (B, config.block_size))
    targets = rng.integers(0, config.vocab_size, (B, config.block_size))

    def step():   # as the trainer steps: decided on the device, no host wait inside
        model.zero_grad()
        scale = scaler.device_scale if scaler else 1.0
        model.forward_backward(idx, targets, scale=scale)
        _, grads_finite = clipped_step(opt, 1.0, scale)
        if scaler:
            scaler.record(grads_finite)
        synchronize(model.device)
    return step, model


def torch_step(config, B, device, precision, compiled):
    import torch
    AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
    import xpmodel
    from torch_gpt import torch_adamw, torch_loss, torch_params
    # as a torch.nn GPT-2 runs: (out, in) linear weights (one addmm with the
    # bias), fused scaled-dot-product attention, the fused AdamW on CUDA
    params = torch_params(xpmodel.GPT(config, seed=0).state_arrays(), device=device, out_in=True)
    opt = torch_adamw(params, 3e-4, (0.9, 0.95), 1e-8, 0.1, fused=device.startswith("cuda") or None)
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (B, config.block_size), generator=g).to(device)
    targets = torch.randint(0, config.vocab_size, (B, config.block_size), generator=g).to(device)

    def loss_fn(idx, targets):
        return torch_loss(params, idx, targets, config, fused_attention=True, out_in=True,
                          dropout=config.dropout, training=config.dropout > 0)
    if compiled:
        loss_fn = torch.compile(loss_fn)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.split(":")[0], dtype=AUTOCAST.get(precision),
                            enabled=precision in AUTOCAST):
            loss = loss_fn(idx, targets)
        if scaler:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return step


class CupyPeakTracker:
    """Peak bytes in use by CuPy arrays (not bytes its pool holds), the same
    quantity as torch.cuda.max_memory_allocated."""

    def __init__(self):
        import cupy
        self.pool = cupy.get_default_memory_pool()
        self.peak = 0
        cupy.cuda.set_allocator(self.malloc)

    def malloc(self, size):
        memory = self.pool.malloc(size)
        self.peak = max(self.peak, self.pool.used_bytes())
        return memory

    def reset(self):
        self.base = self.peak = self.pool.used_bytes()

    @property
    def peak_since_reset(self):
        """Peak bytes in use since reset, beyond those in use then (another side's model)."""
        return self.peak - self.base


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cli_args import ArgumentParser, DocstringFormatter, positive_float, positive_int
    parser = ArgumentParser(description=__doc__, formatter_class=DocstringFormatter)
    parser.add_argument("--configs", nargs="+", default=["char-mid", "gpt2-small"], choices=list(CONFIGS))
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu or auto")
    parser.add_argument("--precisions", nargs="+", default=["fp16"], choices=("fp16", "bf16", "fp32"),
                        help="each config is timed in each (PyTorch under autocast to the same type)")
    parser.add_argument("--peak-flops", type=positive_float, default=None,
                        help="FLOP/s for MFU (default: xpmodel/train/peak_flops.py's entry for this GPU)")
    parser.add_argument("--steps", type=positive_int, default=20,
                        help="timed steps per side, at least --rounds")
    parser.add_argument("--rounds", type=positive_int, default=4, help="alternations between sides")
    parser.add_argument("--compile-configs", nargs="*", default=["gpt2-small"],
                        help="configs also timed under torch.compile (compiling takes minutes); "
                             "none after the flag: none")
    parser.add_argument("--kernels", nargs="+", default=["fused", "xp"], choices=("fused", "xp"),
                        help="xpmodel's sides: its fused kernels, the layers' own xp code")
    args = parser.parse_args()
    unknown = [name for name in args.compile_configs if name not in CONFIGS]
    if unknown:   # (not argparse's choices: with nargs="*", Python 3.10 checks an empty list too)
        parser.error(f"--compile-configs: unknown config {unknown[0]!r} "
                     f"(choose from {', '.join(CONFIGS)})")
    if args.steps < args.rounds:
        parser.error(f"--steps {args.steps} is fewer than --rounds {args.rounds}: each round times "
                     f"--steps // --rounds steps")
    from xpmodel.backend import DeviceError, get_device
    try:
        args.device = str(get_device(args.device))
    except DeviceError as exc:
        parser.error(f"--device: {exc}")
    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: PyTorch sees no GPU")
    import xpmodel
    from bench_cpu import time_steps
    from xpmodel.train.peak_flops import mfu_peak
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {gpu}, torch {torch.__version__}")
    tracker = CupyPeakTracker() if args.device.startswith("cuda") else None
    for name, precision in [(n, p) for p in args.precisions for n in args.configs]:
        peak, source = mfu_peak(gpu, precision, args.peak_flops)
        source = source.replace("train.peak_flops", "--peak-flops")     # this tool's name for it
        print(f"{precision}: MFU against {source}" if peak else f"{precision}: {source}")
        L, H, C, T, B, V, options = CONFIGS[name]
        config = xpmodel.GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C,
                                   **options)
        flops_per_token = config.flops_per_token()
        sides, memory = {}, {}
        on_gpu = args.device.startswith("cuda")
        for kernels in args.kernels:
            side = XPMODEL_SIDES[kernels]
            if on_gpu:
                tracker.reset()
            ours, model = xpmodel_step(config, B, args.device, precision, kernels)
            ours()
            sides[side] = ours
            if on_gpu:
                memory[side] = tracker.peak_since_reset
            del model
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        sides["torch eager"] = torch_step(config, B, args.device, precision, compiled=False)
        sides["torch eager"]()
        if on_gpu:
            memory["torch eager"] = torch.cuda.max_memory_allocated()
        if name in args.compile_configs:
            try:
                if on_gpu:
                    torch.cuda.reset_peak_memory_stats()
                compiled = torch_step(config, B, args.device, precision, compiled=True)
                compiled()
                sides["torch.compile"] = compiled
                if on_gpu:
                    memory["torch.compile"] = torch.cuda.max_memory_allocated()
            except Exception as exc:   # compile needs a working toolchain
                print(f"  torch.compile unavailable: {exc.__class__.__name__}: {str(exc)[:120]}")
        times = {side: [] for side in sides}
        for _ in range(args.rounds):
            for side, step in sides.items():
                times[side] += time_steps(step, args.steps // args.rounds)
        tokens = B * T
        tps = {side: tokens / statistics.median(t) for side, t in times.items()}
        print(f"{name} {precision}: L={L} H={H} C={C} T={T} B={B} V={V}")
        ours = XPMODEL_SIDES[args.kernels[0]]   # the side the others are compared with
        for side, value in tps.items():
            mfu = f", MFU {100 * value * flops_per_token / peak:.1f}%" if peak else ""
            mem = f", peak memory {memory[side] / 2**30:.2f} GiB" if memory.get(side) else ""
            ratio = "" if side == ours else f", {ours}/this {tps[ours] / value:.2f}x"
            print(f"  {side:14s} {value:12,.0f} tokens/s{mfu}{mem}{ratio}", flush=True)
        del sides


if __name__ == "__main__":
    main()
