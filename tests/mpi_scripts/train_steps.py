"""Train a tiny GPT for a few data-parallel steps on a fixed global batch.

Run under `mpirun -n K` by tests/test_distributed.py, or imported and run in
one process as the reference; either way `train` follows the same code path,
which is the point: its results must not depend on K.

    python train_steps.py OUT [--steps N] [--fault {none,exit,kill,hang,raise,sysexit}]
                              [--fault-step S] [--on-error {guard,exit,uncaught}]
                              [--rank0-timeout SECONDS]

Rank 0 writes OUT/result.npz (final flat parameters and per-step global
losses); every rank writes OUT/rank{R}.json (its parameter checksum) and
OUT/progress{R}.txt (the last step it started). A fault makes rank 1 misbehave
at step S: exit without finalizing MPI, SIGKILL itself, hang, raise, or leave
through sys.exit(2), which finalizes MPI like a normal exit.
"""
import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

import xpmodel
from xpmodel.distributed import init_distributed

CONFIG = xpmodel.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
GLOBAL_BATCH = 8


def fixed_batch(config=CONFIG, B=GLOBAL_BATCH, seed=1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (B, config.block_size + 1))
    return tokens[:, :-1], tokens[:, 1:]


def train(dist, steps, out=None, fault="none", fault_step=1):
    """`steps` AdamW steps on the same global batch; returns (losses, flat params)."""
    model = xpmodel.GPT(CONFIG, device=dist.device_spec, dtype="float32", seed=0)
    if dist.rank != 0:   # make rank 0's weights the only ones that can survive broadcast_
        model.flat_params += 1.0
    dist.broadcast_(model.flat_params)
    opt = xpmodel.AdamW(model, lr=1e-2, weight_decay=0.1)
    idx, targets = fixed_batch()
    start, stop = dist.shard(GLOBAL_BATCH)
    losses = []
    for step in range(steps):
        if out is not None:
            (out / f"progress{dist.rank}.txt").write_text(str(step))
        if step == fault_step and dist.rank == 1:
            inject(fault)
        model.zero_grad()
        # forward_backward's loss is the mean over this rank's positions; the
        # shards are equal, so averaging over ranks gives the global mean
        loss = model.forward_backward(idx[start:stop], targets[start:stop])
        dist.allreduce_mean_(model.flat_grads)
        losses.append(float(dist.allreduce_mean_(np.array([float(loss)]))[0]))
        xpmodel.clip_grad_norm(model, 1.0)
        opt.step()
    return losses, model.flat_params


def inject(fault):
    sys.stdout.flush()
    if fault == "exit":
        os._exit(3)
    elif fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "hang":
        time.sleep(3600)
    elif fault == "raise":
        raise RuntimeError("injected failure on rank 1")
    elif fault == "sysexit":
        sys.exit(2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--fault", choices=["none", "exit", "kill", "hang", "raise", "sysexit"],
                        default="none")
    parser.add_argument("--fault-step", type=int, default=1)
    parser.add_argument("--on-error", choices=["guard", "exit", "uncaught"], default="guard")
    parser.add_argument("--rank0-timeout", type=float, default=None,
                        help="rank 0's collective timeout, to outlast the other ranks'")
    args = parser.parse_args()
    dist = init_distributed("cpu")
    if dist.rank == 0 and args.rank0_timeout is not None:
        dist.timeout = args.rank0_timeout

    def run():
        assert dist.agree(("seed", 0, CONFIG)), "ranks disagree on the config"
        losses, params = train(dist, args.steps, args.out, args.fault, args.fault_step)
        checksum = hashlib.sha256(params.tobytes()).hexdigest()
        (args.out / f"rank{dist.rank}.json").write_text(json.dumps(
            {"rank": dist.rank, "world_size": dist.world_size, "local_rank": dist.local_rank,
             "checksum": checksum, "in_sync": dist.in_sync(params),
             "backend": dist.backend}))
        dist.barrier()
        if dist.is_main:
            np.savez(args.out / "result.npz", params=params, losses=np.array(losses))

    if args.on_error == "guard":
        with dist.abort_on_error():
            run()
    elif args.on_error == "exit":   # a caller that reports the error and exits
        try:
            run()
        except xpmodel.errors.XpmodelError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
    else:
        run()


if __name__ == "__main__":
    main()
