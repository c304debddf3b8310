"""Data-parallel benchmark: training-step throughput on 1 and 2 CPU ranks, and
a cost model of the gradient all-reduce for GPT-2 small on 8 GPUs.

A step is zero-grad, forward and backward on this rank's shard of a fixed
global batch, the all-reduce of the flat gradient buffer, global-norm clip and
AdamW. Three runs, each in a fresh process so its BLAS thread count holds:
1 rank with 2 BLAS threads, 1 rank with 1 thread, and 2 ranks under mpirun
with 1 thread each (two ranks on two cores leave no room for more). The three
alternate for a few rounds and each keeps its best round, which damps other
load on a shared machine. Prints global tokens/s (B*T / median step time),
the all-reduce's share of a step, and the scaling ratios.

The cost model prints, for the given tokens per GPU per optimizer step, the
compute time at an assumed achieved FLOP rate against the time to all-reduce
fp32 gradients at NVLink and PCIe bus bandwidths. Every figure is computed
from the arguments, none is a measurement.

    python tools/bench_distributed.py [--batch 12] [--steps 30] [--rounds 3] [--ranks 2]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cli_args import (ArgumentParser, DocstringFormatter, int_at_least, non_negative_int,
                      positive_float, positive_int)

NANO_CPU = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=256)
GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
THREAD_ENVS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


# ---- one run (possibly one of several ranks) ---------------------------------------

def worker(args):
    import numpy as np
    import xpmodel
    from xpmodel.distributed import init_distributed

    dist = init_distributed("cpu")
    config = xpmodel.GPTConfig(**NANO_CPU)
    model = xpmodel.GPT(config, seed=0)
    dist.broadcast_(model.flat_params)
    opt = xpmodel.AdamW(model, lr=3e-4)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, config.vocab_size, (args.batch, config.block_size))
    targets = rng.integers(0, config.vocab_size, (args.batch, config.block_size))
    start, stop = dist.shard(args.batch)

    def step():
        model.zero_grad()
        model.forward_backward(idx[start:stop], targets[start:stop])
        began = time.perf_counter()
        dist.allreduce_mean_(model.flat_grads)
        reduce_s = time.perf_counter() - began
        xpmodel.clip_grad_norm(model, 1.0)
        opt.step()
        return reduce_s

    for _ in range(args.warmup):
        step()
    dist.barrier()
    step_times, reduce_times = [], []
    for _ in range(args.steps):
        began = time.perf_counter()
        reduce_times.append(step())
        step_times.append(time.perf_counter() - began)
    dist.barrier()
    alone = []   # the all-reduce by itself, ranks lined up by a barrier first
    for _ in range(args.steps if dist.world_size > 1 else 0):
        dist.barrier()
        began = time.perf_counter()
        dist.allreduce_mean_(model.flat_grads)
        alone.append(time.perf_counter() - began)
    in_sync = dist.in_sync(model.flat_params)
    step_s = dist.max_across(statistics.median(step_times))
    if dist.is_main:
        print(json.dumps({
            "ranks": dist.world_size, "threads": os.environ.get("OPENBLAS_NUM_THREADS"),
            "step_s": step_s, "reduce_s": statistics.median(reduce_times),
            "reduce_alone_s": statistics.median(alone) if alone else 0.0,
            "tokens_per_s": args.batch * config.block_size / step_s,
            "grad_bytes": model.flat_grads.nbytes, "in_sync": in_sync}), flush=True)


# ---- the driver ---------------------------------------------------------------------

def launch(args, ranks, threads):
    """Run `worker` in a fresh process (under mpirun when ranks > 1); its report."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--batch", args.batch,
            "--steps", args.steps, "--warmup", args.warmup]
    if ranks > 1:
        from xpmodel.distributed import local_mpirun
        command, env = local_mpirun(ranks, argv)
    else:
        command, env = [str(a) for a in argv], dict(os.environ)
        for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
            env.pop(name, None)
    env.update({name: str(threads) for name in THREAD_ENVS})
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{ranks}-rank run failed (exit {result.returncode}):\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_cost_model(args):
    import xpmodel
    N = xpmodel.GPTConfig(**GPT2_SMALL).num_params()
    K, tokens = args.gpus, args.tokens_per_gpu
    flops = 6 * N * tokens
    compute_s = flops / (args.tflops * 1e12)
    grad_bytes = 4 * N
    ring_bytes = 2 * (K - 1) / K * grad_bytes   # sent (and received) by each GPU
    print(f"\ncost model: GPT-2 small ({N / 1e6:.1f}M parameters) on {K} GPU{'s' if K > 1 else ''}, "
          f"{tokens:,} tokens per GPU per optimizer step")
    print(f"  compute: 6*N*tokens = {flops / 1e12:.1f} TFLOP per GPU per step; at an assumed "
          f"{args.tflops:g} TFLOP/s achieved: {compute_s * 1e3:.1f} ms")
    if K == 1:
        print("  one GPU: no all-reduce, so no communication time")
        return
    print(f"  all-reduce of fp32 gradients: 4*N = {grad_bytes / 1e6:.0f} MB; a ring moves "
          f"2*(K-1)/K of that = {ring_bytes / 1e6:.0f} MB per GPU")
    for name, gbps in (("NVLink (H100 SXM)", args.nvlink_gbps), ("PCIe", args.pcie_gbps)):
        comm_s = ring_bytes / (gbps * 1e9)
        print(f"  {name}, bus bandwidth {gbps:g} GB/s: all-reduce {comm_s * 1e3:.1f} ms "
              f"= {100 * comm_s / compute_s:.1f}% of compute\n"
              f"      step efficiency with no overlap: "
              f"{100 * compute_s / (compute_s + comm_s):.1f}%; the all-reduce would take as "
              f"long as compute at {flops / comm_s / 1e12:.0f} TFLOP/s achieved")


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=DocstringFormatter)
    parser.add_argument("--batch", type=positive_int, default=12,
                        help="global batch (rows of T=64), at least --ranks")
    parser.add_argument("--steps", type=positive_int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=non_negative_int, default=5, help="untimed steps first")
    parser.add_argument("--rounds", type=positive_int, default=3, help="alternations; best one kept")
    parser.add_argument("--ranks", type=int_at_least(2), default=2, help="ranks of the multi-rank run")
    parser.add_argument("--gpus", type=positive_int, default=8, help="cost model: GPUs")
    parser.add_argument("--tokens-per-gpu", type=positive_int, default=2**19 // 8,
                        help="cost model: tokens per GPU per optimizer step "
                             "(configs/gpt2-small.yaml: 2**19 per step over all GPUs)")
    parser.add_argument("--tflops", type=positive_float, default=400.0,
                        help="cost model: achieved TFLOP/s per GPU (H100 SXM dense fp16 "
                             "peak is 989)")
    parser.add_argument("--nvlink-gbps", type=positive_float, default=400.0,
                        help="cost model: NCCL all-reduce bus bandwidth over NVLink")
    parser.add_argument("--pcie-gbps", type=positive_float, default=25.0,
                        help="cost model: NCCL all-reduce bus bandwidth over PCIe")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-runs", action="store_true", help="print only the cost model")
    args = parser.parse_args()
    if args.batch < args.ranks and not args.no_runs:
        parser.error(f"--batch {args.batch} is smaller than --ranks {args.ranks}: "
                     f"every rank needs a row")
    if args.worker:
        return worker(args)

    if not args.no_runs:
        c = NANO_CPU
        print(f"nano-cpu ({c['n_layer']} layers, {c['n_head']} heads, C={c['n_embd']}, "
              f"T={c['block_size']}, V={c['vocab_size']}), global batch {args.batch}, "
              f"median of {args.steps} steps, best of {args.rounds} rounds, "
              f"{os.cpu_count()} CPU cores")
        setups = {"1 rank, 2 threads": (1, 2), "1 rank, 1 thread": (1, 1),
                  f"{args.ranks} ranks, 1 thread each": (args.ranks, 1)}
        runs = {}
        for _ in range(args.rounds):
            for name, (ranks, threads) in setups.items():
                run = launch(args, ranks, threads)
                if name not in runs or run["tokens_per_s"] > runs[name]["tokens_per_s"]:
                    runs[name] = run
        for name, run in runs.items():
            extra = ""
            if run["ranks"] > 1:
                extra = (f"   all-reduce {run['reduce_s'] * 1e3:.2f} ms in a step "
                         f"({100 * run['reduce_s'] / run['step_s']:.0f}%), "
                         f"{run['reduce_alone_s'] * 1e3:.2f} ms alone for "
                         f"{run['grad_bytes'] / 1e6:.1f} MB; weights in sync: {run['in_sync']}")
            print(f"  {name:24s} {run['tokens_per_s']:8.0f} tokens/s   "
                  f"step {run['step_s'] * 1e3:6.1f} ms{extra}")
        multi = runs[f"{args.ranks} ranks, 1 thread each"]["tokens_per_s"]
        print(f"  scaling: {args.ranks} ranks / 1 rank 1 thread = "
              f"{multi / runs['1 rank, 1 thread']['tokens_per_s']:.2f}x;  "
              f"{args.ranks} ranks / 1 rank 2 threads = "
              f"{multi / runs['1 rank, 2 threads']['tokens_per_s']:.2f}x")
    print_cost_model(args)


if __name__ == "__main__":
    main()
