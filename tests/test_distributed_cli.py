"""`mpirun -n 2 xpmodel train`: the same run as one process, printed once,
and a resume with a different number of ranks refused clearly."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xpmodel.distributed import local_mpirun

TINY = Path(__file__).resolve().parent / "tiny-run.yaml"
needs_mpi = pytest.mark.skipif(
    shutil.which("mpirun") is None or importlib.util.find_spec("mpi4py") is None,
    reason="mpirun or mpi4py not installed (apt-get install openmpi-bin libopenmpi-dev; "
           "pip install mpi4py)")


def train(out, data, env, ranks=None, extra=()):
    argv = [sys.executable, "-m", "xpmodel.cli.main", "train", "--config", str(TINY), "--device", "cpu",
            "--quiet", "--out", str(out), f"data.source={data}", "train.batch_size=8", *extra]
    if ranks:
        command, launch_env = local_mpirun(ranks, argv)
        launch_env.update(env)
    else:
        command, launch_env = argv, env
    return subprocess.run(command, env=launch_env, capture_output=True, text=True, timeout=180)


def losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in records if r["type"] == "train"])


@needs_mpi
def test_two_ranks_train_like_one_process(tmp_path, tinyshakespeare):
    env = {**os.environ, "XPMODEL_CACHE": str(tmp_path / "cache"), "XPMODEL_COLLECTIVE_TIMEOUT": "60"}
    single = train(tmp_path / "one", tinyshakespeare, env)
    assert single.returncode == 0, single.stderr
    double = train(tmp_path / "two", tinyshakespeare, env, ranks=2)
    assert double.returncode == 0, double.stderr
    assert double.stdout.count("done (finished)") == 1          # only rank 0 prints
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)

    resumed = train(tmp_path / "two", tinyshakespeare, env, extra=())
    assert resumed.returncode == 2                               # --out on an existing run
    resumed = subprocess.run([sys.executable, "-m", "xpmodel.cli.main", "train", "--resume",
                              str(tmp_path / "two"), "--device", "cpu", "train.max_iters=40"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode != 0
    assert "mpirun -n 2" in resumed.stderr and len(resumed.stderr.strip().splitlines()) == 1


@needs_mpi
def test_a_batch_the_ranks_cannot_split_is_refused_before_writing(tmp_path, tinyshakespeare):
    env = {**os.environ, "XPMODEL_CACHE": str(tmp_path / "cache")}
    result = train(tmp_path / "run", tinyshakespeare, env, ranks=2, extra=("train.batch_size=7",))
    assert result.returncode != 0 and "does not divide by the 2 ranks" in result.stderr
    assert not (tmp_path / "run").exists()


@needs_mpi
def test_a_failure_on_the_ranks_ends_the_job_each_failing_rank_saying_why_in_one_line(tmp_path):
    """Every rank misses the file: the job ends (no rank left waiting in a
    collective), each rank that got to say so names the file in one line of
    its own (Open MPI's abort banner comes with it), and nothing is written."""
    env = {**os.environ, "XPMODEL_CACHE": str(tmp_path / "cache")}
    result = train(tmp_path / "run", tmp_path / "missing.txt", env, ranks=2)
    assert result.returncode != 0
    # mpirun forwards each rank's output as it comes, so its own messages (the
    # abort banner, an ORTE log line) can land on a rank's line before its newline
    lines = [line for line in result.stderr.splitlines() if line.startswith("rank ")]
    one_line = re.compile(r"rank \d: data\.source \S*missing\.txt: no such file or folder")
    assert lines and all(one_line.match(line) for line in lines), result.stderr
    # rank 0 may be ended by rank 1's abort as it makes the run folder: at most an empty one stays
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@needs_mpi
def test_a_checkpoint_records_the_shards_of_each_ranks_part_of_the_batch(tmp_path):
    """Two ranks each take half of the global batch of 8; with 8 threads a rank
    splits its 4 rows into 4 shards, and that is what a resume compares."""
    from cli_helpers import write_corpus
    from xpmodel.train.checkpoint import read_checkpoint_meta
    from xpmodel.train.rundir import RunDir
    env = {**os.environ, "XPMODEL_CACHE": str(tmp_path / "cache"), "XPMODEL_NUM_THREADS": "8"}
    corpus = write_corpus(tmp_path / "corpus.txt", lines=300)
    result = train(tmp_path / "run", corpus, env, ranks=2, extra=("train.max_iters=4",))
    assert result.returncode == 0, result.stderr
    run = RunDir(tmp_path / "run")
    assert read_checkpoint_meta(run.step_path(run.checkpoint_steps()[-1]))["shards"] == 4


@needs_mpi
def test_two_ranks_print_plain_lines_without_quiet_from_rank_0_alone(tmp_path):
    """Open MPI gives each rank a terminal, even with the job's output going to
    a pipe here (or to a log): the live display would write its escape codes
    there, so several ranks print plain log lines without --quiet too."""
    from cli_helpers import write_corpus
    env = {**os.environ, "XPMODEL_CACHE": str(tmp_path / "cache")}
    corpus = write_corpus(tmp_path / "corpus.txt", lines=300)
    argv = [sys.executable, "-m", "xpmodel.cli.main", "train", "--config", str(TINY), "--device",
            "cpu", "--out", str(tmp_path / "run"), f"data.source={corpus}", "train.batch_size=8",
            "train.max_iters=20"]
    command, launch_env = local_mpirun(2, argv)
    result = subprocess.run(command, env={**launch_env, **env}, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x1b" not in result.stderr
    assert result.stdout.count("step 20/20 eta") == 1 and result.stdout.count("done (finished)") == 1
