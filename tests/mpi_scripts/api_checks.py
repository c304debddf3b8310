"""Exercise every collective of `Distributed` under mpirun and write what each
rank saw to OUT/api{rank}.json, for tests/test_distributed.py to check.

    python api_checks.py OUT
"""
import json
import sys
from pathlib import Path

import numpy as np

from xpmodel.distributed import init_distributed
from xpmodel.errors import UsageError


def usage_error(call):
    try:
        call()
    except UsageError as err:
        return str(err)
    return None


def main():
    out = Path(sys.argv[1])
    dist = init_distributed("cpu")
    rank, size = dist.rank, dist.world_size
    with dist.abort_on_error():
        grads32 = np.arange(6, dtype=np.float32) * (rank + 1)
        dist.allreduce_mean_(grads32)
        scalar = np.array(float(rank), dtype=np.float64)      # 0-d, like a loss
        dist.allreduce_mean_(scalar)
        weights = np.full(5, float(rank), dtype=np.float64)
        dist.broadcast_(weights)
        from_last = np.full(3, float(rank), dtype=np.float32)
        dist.broadcast_(from_last, root=size - 1)
        dist.barrier(timeout=30)
        report = {
            "rank": rank, "world_size": size, "local_rank": dist.local_rank,
            "is_main": dist.is_main, "backend": dist.backend,
            "mean32": grads32.tolist(), "mean_scalar": float(scalar),
            "broadcast": weights.tolist(), "broadcast_last": from_last.tolist(),
            "agree_same": dist.agree({"n_layer": 2, "lr": 3e-4}),
            "agree_rank": dist.agree({"seed": rank}),
            "agree_array": dist.agree(np.arange(3)),
            "in_sync": dist.in_sync(weights),
            "out_of_sync": dist.in_sync(np.array([rank])),
            "shard": list(dist.shard(8)),
            "shard_error": usage_error(lambda: dist.shard(9)),
            "cuda_n_error": usage_error(lambda: dist._rank_device_spec("cuda:1")),
        }
        (out / f"api{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
