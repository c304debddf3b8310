"""CPU training-step benchmark: xpmodel (NumPy) against the same model in
PyTorch eager, timed alternately in one process.

A step is zero-grad, forward, backward, global-norm clip and AdamW, on
random tokens. Prints tokens/s (B*T / median step time), xpmodel's peak
traced memory for one step, and the ratio to PyTorch.

    python tools/bench_cpu.py [--configs seed nano-cpu llama-seed llama-nano-cpu] [--steps 20] [--threads N]

The llama-* configs are the same sizes with the Llama-style block (RMSNorm,
RoPE, SwiGLU, grouped-query attention, no biases); PyTorch runs them with
F.rms_norm and scaled-dot-product attention with GQA.

The first line names the CPU and the BLAS kernel NumPy runs. OpenBLAS picks
its kernel from the CPU unless OPENBLAS_CORETYPE forces one (some machines
set it to work around old OpenBLAS bugs); a forced older kernel (Haswell's
AVX2 on an AVX-512 CPU) slows xpmodel's matrix products, not PyTorch's, so
the line says when it is forced.
"""
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

CONFIGS = {   # name: (n_layer, n_head, n_embd, block_size, batch_size, vocab_size, options)
    "nano-cpu": (4, 4, 128, 64, 12, 256, {}),
    "seed": (6, 8, 256, 128, 16, 4096, {}),
}
# The Llama-style block of the shipped llama-* presets at the same sizes.
LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", n_kv_head=2, bias=False)
CONFIGS.update({"llama-nano-cpu": CONFIGS["nano-cpu"][:-1] + (LLAMA,),
                "llama-seed": CONFIGS["seed"][:-1] + (dict(LLAMA, n_kv_head=4),)})


def model_config(name, xpmodel):
    """(GPTConfig of the package `xpmodel`, batch size) of CONFIGS[name]."""
    L, H, C, T, B, V, options = CONFIGS[name]
    return xpmodel.GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C,
                             **options), B


def xpmodel_step(config, B, xpmodel=None):
    """A training step of `config` at batch B, by the package `xpmodel` (default:
    the installed one; tools/ab_checkouts.py passes another checkout's)."""
    import numpy as np
    if xpmodel is None:
        import xpmodel
    model = xpmodel.GPT(config, seed=0)
    opt = xpmodel.AdamW(model, lr=3e-4)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, config.vocab_size, (B, config.block_size))
    targets = rng.integers(0, config.vocab_size, (B, config.block_size))

    def step():
        model.zero_grad()
        loss = model.forward_backward(idx, targets)
        xpmodel.clip_grad_norm(model, 1.0)
        opt.step()
        return float(loss)
    return step


def torch_step(config, B):
    import torch
    from torch_gpt import torch_adamw, torch_loss, torch_params
    import xpmodel
    params = torch_params(xpmodel.GPT(config, seed=0).state_arrays())
    opt = torch_adamw(params, 3e-4, (0.9, 0.95), 1e-8, 0.1)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (B, config.block_size), generator=g)
    targets = torch.randint(0, config.vocab_size, (B, config.block_size), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch_loss(params, idx, targets, config, fused_attention=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        return loss.item()
    return step


def cpu_model():
    """The CPU's model name and whether it has AVX-512, from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "unknown CPU")
    return name + (" with AVX-512" if " avx512f" in info else "")


def blas_kernel():
    """NumPy's BLAS, its version and kernel, and whether the environment forced the kernel."""
    from threadpoolctl import threadpool_info
    blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
    if not blas:
        return "BLAS unknown"
    lib = blas[0]
    text = f"{lib['internal_api']} {lib['version']}, kernel {lib.get('architecture') or '?'}"
    forced = os.environ.get("OPENBLAS_CORETYPE")
    if forced and lib["internal_api"] == "openblas":
        text += f" (forced by OPENBLAS_CORETYPE={forced})"
    return text


def time_steps(step, n):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cli_args import ArgumentParser, DocstringFormatter, positive_int
    parser = ArgumentParser(description=__doc__, formatter_class=DocstringFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="models to time")
    parser.add_argument("--steps", type=positive_int, default=20,
                        help="timed steps per framework, at least --rounds")
    parser.add_argument("--rounds", type=positive_int, default=4, help="alternations between frameworks")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1,
                        help="PyTorch's threads (default: the CPU count)")
    args = parser.parse_args()
    if args.steps < args.rounds:
        parser.error(f"--steps {args.steps} is fewer than --rounds {args.rounds}: each round times "
                     f"--steps // --rounds steps")
    import xpmodel
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
        print("torch not installed: timing xpmodel alone")
    import numpy
    print(f"numpy {numpy.__version__}, torch {torch.__version__ if torch else '-'}, "
          f"threads {args.threads}, cpus {os.cpu_count()}")
    print(f"{cpu_model()}; NumPy's BLAS: {blas_kernel()}")
    for name in args.configs:
        L, H, C, T, B, V, _ = CONFIGS[name]
        config, _ = model_config(name, xpmodel)
        ours = xpmodel_step(config, B)
        ours()                                  # warm up
        tracemalloc.start()
        ours()
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        theirs = torch_step(config, B) if torch else None
        if theirs:
            theirs()
        our_times, their_times = [], []
        per_round = args.steps // args.rounds
        for _ in range(args.rounds):
            our_times += time_steps(ours, per_round)
            if theirs:
                their_times += time_steps(theirs, per_round)
        tokens = B * T
        our_tps = tokens / statistics.median(our_times)
        line = (f"{name:14s} B={B} T={T} C={C} L={L} V={V}: xpmodel {our_tps:9,.0f} tok/s "
                f"(peak {peak_mb:,.0f} MB traced)")
        if theirs:
            their_tps = tokens / statistics.median(their_times)
            line += f" | torch eager {their_tps:9,.0f} tok/s | ratio {our_tps / their_tps:.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
