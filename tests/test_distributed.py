"""Data-parallel training: the single-process object in this process, and real
two-rank jobs launched with `mpirun -n 2` on the scripts in tests/mpi_scripts/.

The MPI tests skip when `mpirun` or mpi4py is missing. mpi4py is looked up,
never imported here: importing it would start MPI inside the test process.
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import xpmodel
from xpmodel.distributed import (DEFAULT_TIMEOUT_S, Distributed, collective_timeout,
                                 init_distributed, launched_world_size, local_mpirun)
from xpmodel.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tests" / "mpi_scripts"
LAUNCH_ENVS = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
               "PMI_SIZE", "PMI_RANK", "PMIX_RANK")

_missing = [what for what, present in [
    ("mpirun", shutil.which("mpirun") is not None),
    ("mpi4py", importlib.util.find_spec("mpi4py") is not None)] if not present]
needs_mpi = pytest.mark.skipif(bool(_missing), reason=f"{' and '.join(_missing)} not installed "
                               f"(apt-get install openmpi-bin libopenmpi-dev; pip install mpi4py)")


def load_train_steps():
    spec = importlib.util.spec_from_file_location("train_steps", SCRIPTS / "train_steps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_ranks(script, *args, ranks=2, timeout=60, env=None):
    """Run `script` under mpirun; returns (CompletedProcess, seconds taken)."""
    command, launch_env = local_mpirun(ranks, [sys.executable, SCRIPTS / script, *args])
    launch_env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                      PYTHONPATH=f"{REPO}:{launch_env.get('PYTHONPATH', '')}", **(env or {}))
    start = time.monotonic()
    try:
        result = subprocess.run(command, env=launch_env, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"mpirun still running after {timeout} s (a hang)\n{err.stderr}")
    return result, time.monotonic() - start


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCH_ENVS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("XPMODEL_COLLECTIVE_TIMEOUT", raising=False)


# ---- one process -----------------------------------------------------------------

def test_without_a_launcher_is_one_process_with_no_op_collectives(no_launcher):
    dist = init_distributed("cpu")
    assert type(dist) is Distributed
    assert (dist.rank, dist.world_size, dist.local_rank, dist.is_main) == (0, 1, 0, True)
    assert dist.device_spec == "cpu" and dist.timeout == DEFAULT_TIMEOUT_S
    flat = np.arange(4, dtype=np.float32)
    assert dist.allreduce_mean_(flat) is flat and flat.tolist() == [0, 1, 2, 3]
    assert dist.broadcast_(flat) is flat and flat.tolist() == [0, 1, 2, 3]
    dist.barrier()
    assert dist.agree({"seed": 1}) and dist.in_sync(flat)
    assert dist.shard(7) == (0, 7)


def test_device_spec_of_one_process_keeps_an_explicit_gpu(no_launcher):
    assert init_distributed("cuda").device_spec == "cuda:0"
    assert init_distributed("cuda:1").device_spec == "cuda:1"
    assert init_distributed("auto").device_spec == "auto"


def test_shard_splits_the_global_batch_evenly_or_names_both_numbers(no_launcher):
    dist = init_distributed("cpu")
    dist.rank, dist.world_size = 2, 4
    assert dist.shard(12) == (6, 9)
    with pytest.raises(UsageError, match="global batch size 10 does not divide by the 4 ranks"):
        dist.shard(10)
    with pytest.raises(ValueError, match="batch size must be an integer > 0, got 0"):
        dist.shard(0)


def test_launch_without_mpi4py_names_the_install_command(no_launcher, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)      # makes `import mpi4py` fail
    assert launched_world_size() == 2
    with pytest.raises(UsageError, match=r"pip install 'xpmodel\[mpi\]'"):
        init_distributed("cpu")


def test_one_rank_launch_needs_no_mpi4py(no_launcher, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    assert init_distributed("cpu").world_size == 1


def test_collective_timeout_comes_from_the_environment(no_launcher, monkeypatch):
    monkeypatch.setenv("XPMODEL_COLLECTIVE_TIMEOUT", "2.5")
    assert collective_timeout() == 2.5
    monkeypatch.setenv("XPMODEL_COLLECTIVE_TIMEOUT", "soon")
    with pytest.raises(UsageError, match="XPMODEL_COLLECTIVE_TIMEOUT"):
        collective_timeout()


def test_abort_prints_one_line_and_exits(no_launcher, capsys):
    with pytest.raises(SystemExit) as exit_:
        init_distributed("cpu").abort("disk full\nwhile saving", code=3)
    assert exit_.value.code == 3
    assert capsys.readouterr().err == "disk full while saving\n"


@pytest.mark.parametrize("unique_id", [bytes(range(128)), tuple(range(-64, 64))],
                         ids=["cupy-14-bytes", "older-tuple"])
def test_the_nccl_id_reaches_each_rank_in_the_type_cupy_made_it(unique_id):
    """CuPy 14's nccl.get_unique_id gives bytes and its NcclCommunicator takes
    only bytes (before: a tuple of ints both ways). The id crosses MPI as JSON
    and must come back as it was made. MPI and NCCL are stood in for here
    (one rank; the broadcast a JSON round trip), the device by the emulator."""
    import cuda_emulator
    from xpmodel.distributed import MPIDistributed
    made = []

    class Communicator:
        def __init__(self, ranks, comm_id, rank):
            if type(comm_id) is not type(unique_id) or comm_id != unique_id:
                raise TypeError(f"NcclCommunicator: commId {type(comm_id).__name__}")
            made.append((ranks, rank))

    nccl = type("Nccl", (), {"get_unique_id": staticmethod(lambda: unique_id),
                             "NcclCommunicator": Communicator})
    dist = object.__new__(MPIDistributed)   # its collectives below, without MPI
    dist.rank, dist.world_size, dist.backend = 0, 1, "mpi"
    dist._nccl, dist._nccl_decided, dist._nccl_comms = nccl, True, {}
    dist._broadcast_json = lambda value, what: json.loads(json.dumps(value))
    with cuda_emulator.emulated_cuda() as cp:   # no kernel runs: no compiler needed
        assert isinstance(dist._nccl_comm(cp.zeros(4)), Communicator)
    assert made == [(1, 0)] and dist.backend == "nccl"


# ---- two ranks under mpirun ---------------------------------------------------------

@needs_mpi
def test_collectives_on_two_ranks(tmp_path):
    result, _ = run_ranks("api_checks.py", tmp_path)
    assert result.returncode == 0, result.stderr
    reports = [json.loads((tmp_path / f"api{r}.json").read_text()) for r in range(2)]
    for rank, report in enumerate(reports):
        assert (report["rank"], report["world_size"]) == (rank, 2)
        assert report["local_rank"] == rank and report["is_main"] == (rank == 0)
        assert report["mean32"] == [1.5 * i for i in range(6)]   # mean of i and 2i
        assert report["mean_scalar"] == 0.5
        assert report["broadcast"] == [0.0] * 5 and report["broadcast_last"] == [1.0] * 3
        assert report["agree_same"] and not report["agree_rank"] and report["agree_array"]
        assert report["in_sync"] and not report["out_of_sync"]
        assert report["shard"] == [4 * rank, 4 * rank + 4]
        assert "global batch size 9 does not divide by the 2 ranks" in report["shard_error"]
        assert "use --device cuda" in report["cuda_n_error"]


@needs_mpi
def test_two_ranks_train_like_one_process(tmp_path, no_launcher):
    steps = 5
    result, _ = run_ranks("train_steps.py", tmp_path, "--steps", steps)
    assert result.returncode == 0, result.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["checksum"] == ranks[1]["checksum"], "ranks ended with different weights"
    assert all(r["in_sync"] and r["world_size"] == 2 for r in ranks)
    two = np.load(tmp_path / "result.npz")

    train_steps = load_train_steps()
    losses, params = train_steps.train(init_distributed("cpu"), steps)
    np.testing.assert_allclose(two["losses"], losses, rtol=1e-5)
    assert losses[-1] < losses[0] - 0.3          # it did learn the batch
    # The attention key bias gets an exactly-zero gradient (adding it shifts every
    # score of a query equally, which softmax ignores), so it holds only rounding
    # noise, which AdamW normalises into full-size steps: it cannot match.
    model = xpmodel.GPT(train_steps.CONFIG)
    C, keep = train_steps.CONFIG.n_embd, np.ones(params.size, dtype=bool)
    for i in range(train_steps.CONFIG.n_layer):
        offset = model.layout.offsets[f"h.{i}.attn.c_attn.bias"]
        keep[offset + C:offset + 2 * C] = False
    np.testing.assert_allclose(two["params"][keep], params[keep], rtol=1e-5, atol=1e-6)


@needs_mpi
@pytest.mark.parametrize("fault", ["exit", "kill"])
def test_a_dying_rank_ends_the_job(tmp_path, fault):
    result, seconds = run_ranks("train_steps.py", tmp_path, "--steps", 1000,
                                "--fault", fault, "--fault-step", 2, timeout=90)
    assert result.returncode != 0
    assert seconds < 60
    assert not (tmp_path / "result.npz").exists()
    assert int((tmp_path / "progress0.txt").read_text()) < 999, "rank 0 ran on alone"


@needs_mpi
@pytest.mark.parametrize("on_error", ["guard", "exit", "uncaught"])
def test_a_hung_rank_times_out_the_others(tmp_path, on_error):
    result, seconds = run_ranks("train_steps.py", tmp_path, "--steps", 50, "--fault", "hang",
                                "--on-error", on_error, env={"XPMODEL_COLLECTIVE_TIMEOUT": "2"})
    assert result.returncode != 0
    assert "rank 0: all-reduce did not complete in 2 s; another rank probably died" \
        in result.stderr
    assert seconds < 30


@needs_mpi
def test_a_rank_that_exits_early_does_not_hang_the_job(tmp_path):
    # sys.exit finalizes MPI, which would wait forever for rank 0, itself stuck in
    # an all-reduce whose own timeout is set far beyond the test's limit
    result, seconds = run_ranks("train_steps.py", tmp_path, "--steps", 50, "--fault", "sysexit",
                                "--on-error", "uncaught", "--rank0-timeout", 600,
                                env={"XPMODEL_COLLECTIVE_TIMEOUT": "2"})
    assert result.returncode != 0
    assert "rank 1: this rank is exiting, but the other ranks did not also finish within 2 s" \
        in result.stderr
    assert seconds < 30


@needs_mpi
def test_an_exception_on_one_rank_aborts_the_job(tmp_path):
    result, seconds = run_ranks("train_steps.py", tmp_path, "--steps", 50, "--fault", "raise",
                                "--on-error", "uncaught")
    assert result.returncode != 0
    assert "RuntimeError: injected failure on rank 1" in result.stderr
    assert seconds < 30


def _rank_pids(marker):
    """{rank: pid} of the MPI ranks whose command line holds `marker` (Linux /proc)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = dict(line.split(b"=", 1) for line in (entry / "environ").read_bytes().split(b"\0")
                           if b"=" in line)
        except (OSError, ValueError):
            continue
        if marker.encode() in command and b"OMPI_COMM_WORLD_RANK" in environ:
            ranks[int(environ[b"OMPI_COMM_WORLD_RANK"])] = int(entry.name)
    return ranks


@needs_mpi
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_saved_step(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i} of a small corpus for two ranks\n" for i in range(400)))
    run = tmp_path / "run"
    command, env = local_mpirun(2, [sys.executable, "-m", "xpmodel", "train", "--device", "cpu",
                                    "--quiet", "--config", REPO / "tests" / "tiny-run.yaml",
                                    "--out", run, f"data.source={corpus}", "train.max_iters=100000",
                                    "train.save_interval=100000", "train.eval_interval=100000"])
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", XPMODEL_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=f"{REPO}:{env.get('PYTHONPATH', '')}")
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)                              # a few steps in
        os.kill(_rank_pids(str(run))[1], signal.SIGTERM)
        out, err = job.communicate(timeout=60)
    finally:
        job.kill()
    stops = [line for line in (out + err).splitlines() if "stopped by SIGTERM at step" in line]
    assert len(stops) == 2, out + err                # each rank names the same step and file
    step = int(stops[0].split("at step ")[1].split(";")[0])
    assert all(f"at step {step};" in line for line in stops)
    assert (run / "checkpoints" / f"step-{step:08d}.safetensors").is_file()
