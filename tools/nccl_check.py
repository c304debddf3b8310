"""The NCCL path of data-parallel training, on however many GPUs the launcher
gives (one is enough), checked against the CPU.

`mpirun -n 1 xpmodel train --device cuda` never reaches NCCL: one rank is a
single process with no collectives (distributed.init_distributed). This
script builds the K-rank group (MPIDistributed) even for K = 1, so the NCCL
communicator is set up and used:

1. all-reduce: each rank's float32 buffer (2^20 + 3 values drawn from its rank)
   is averaged on the GPUs through NCCL and compared with the mean computed
   on the host by NumPy; then a broadcast from rank 0;
2. training: a few steps of a small model in bf16 (and fp16) through the
   trainer with this group (rank 0's weights broadcast, every gradient
   all-reduced by NCCL), against the same steps without any group: the L2
   norm of the difference in the weights within 5% of the L2 norm of the
   change the steps made. With one rank the all-reduce averages one buffer,
   so the runs differ only by the order of the GPU's float atomics (AdamW
   turns that into 0.3% in six fp16 steps on the kernel emulator, where a
   lost or negated all-reduce gives 100% or more); with K ranks each trains
   its shard of the same global batch. (The largest difference of one weight
   says little: Adam moves a weight whose gradient is near zero by a whole
   step either way, so noise can flip it.)

    mpirun -n 1 python tools/nccl_check.py        # or plain `python tools/nccl_check.py`
    mpirun -n 8 python tools/nccl_check.py        # one rank per GPU
    python tools/nccl_check.py --emulated         # no GPU: the logic on the kernel emulator,
                                                  # MPI through host memory instead of NCCL

Prints one line per check and exits 1 when a check fails. Needs CuPy (with
cupy.cuda.nccl), mpi4py and an MPI library; without mpirun, mpi4py starts a
singleton group of one rank.
"""
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CORPUS_LINE = "The king shall speak of love and war to my lord; good night, sweet prince.\n"


def allreduce_check(dist, cupy):
    from xpmodel.backend import to_host
    n = (1 << 20) + 3
    local = np.random.default_rng(dist.rank).standard_normal(n).astype(np.float32)
    want = np.mean([np.random.default_rng(r).standard_normal(n).astype(np.float32)
                    for r in range(dist.world_size)], axis=0, dtype=np.float64)
    flat = cupy.asarray(local)
    dist.allreduce_mean_(flat)
    error = float(np.abs(to_host(flat) - want).max())
    ok = dist.backend == EXPECTED_BACKEND and error <= 1e-6 * dist.world_size
    report(dist, ok, f"all-reduce of {n:,} float32 values over {dist.world_size} rank(s) by "
                     f"{dist.backend}: max |GPU - CPU mean| = {error:.2e}")
    flat = cupy.asarray(np.full(1000, float(dist.rank), np.float32))
    dist.broadcast_(flat)
    report(dist, bool((to_host(flat) == 0).all()), "broadcast from rank 0")


def training_check(dist, precision, folder):
    from xpmodel.backend import to_host
    from xpmodel.config import load_config
    from xpmodel.train import Trainer
    corpus = Path(folder, "corpus.txt")
    if dist.is_main:
        corpus.write_text(CORPUS_LINE * 400)
    dist.barrier()
    settings = [f"data.source={corpus}", "data.tokenizer=byte", "model.n_layer=2", "model.n_head=2",
                "model.n_embd=128", "model.block_size=64", f"train.batch_size={4 * dist.world_size}",
                "train.max_iters=6", "train.eval_interval=6", "train.save_interval=6",
                "train.sample_interval=0", "model.dropout=0.0",
                f"train.precision={precision}"]
    config = load_config("default", settings)
    group = Trainer.start(config, device=dist.device_spec, out=Path(folder, f"dp-{precision}"),
                          dist=dist, show=False)
    group.run()
    ok = group.dist is dist and dist.backend == EXPECTED_BACKEND
    if dist.is_main:   # the same steps in one process, no group
        alone = Trainer.start(config, device=dist.device_spec, out=Path(folder, f"one-{precision}"),
                              show=False)
        start = to_host(alone.model.flat_params).copy()
        alone.run()
        a, b = to_host(group.model.flat_params), to_host(alone.model.flat_params)
        error = float(np.linalg.norm(a - b) / np.linalg.norm(b - start))
        ok = ok and error < TRAINING_TOLERANCE
        detail = f"difference {error:.2e} of the change the steps made (L2 norms)"
    else:
        detail = ""
    report(dist, ok, f"6 {precision} training steps through {dist.backend} against one process: {detail}")


FAILED = []
EXPECTED_BACKEND = "nccl"
TRAINING_TOLERANCE = 0.05   # of the change the steps made, in L2 norm (see the module docstring)


def report(dist, ok, text):
    if not ok:
        FAILED.append(text)
    if dist.is_main:
        print(f"{'ok  ' if ok else 'FAIL'} {text}", flush=True)


def main():
    global EXPECTED_BACKEND
    import contextlib
    import os
    sys.path.insert(0, str(ROOT))
    context = contextlib.nullcontext()
    if "--emulated" in sys.argv:   # no GPU: the kernel emulator, which has no NCCL
        sys.path.insert(0, str(ROOT / "tests"))
        import cuda_emulator
        context, EXPECTED_BACKEND = cuda_emulator.emulated_cuda(), "mpi-host"
    from mpi4py import MPI
    from xpmodel.backend import import_cupy
    from xpmodel.distributed import MPIDistributed
    with context, tempfile.TemporaryDirectory() as folder:
        cupy = import_cupy()
        dist = MPIDistributed(MPI, MPI.COMM_WORLD, "cuda")
        cupy.cuda.Device(int(dist.device_spec.split(":")[1])).use()
        if dist.is_main:
            print(f"{dist.world_size} rank(s); rank 0 on {dist.device_spec}", flush=True)
        folder = dist._broadcast_json(folder if dist.is_main else None, "folder")
        os.environ["XPMODEL_CACHE"] = str(Path(folder, "cache"))
        allreduce_check(dist, cupy)
        for precision in ("bf16", "fp16"):
            training_check(dist, precision, folder)
        passed = dist._all_true(not FAILED, "check results")
    if dist.is_main:
        print("NCCL check " + ("passed" if passed else "FAILED"), flush=True)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
