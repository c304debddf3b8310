"""Two xpmodel processes on one run at once, each window provoked directly
(the competing file or lock put in place between the steps, not timed):

- `train --out R --overwrite` removes the temporaries of dead writers only: a
  live `plot`'s `.loss-health.png.tmp-PID` is that plot's;
- `xpmodel.load` reading a run whose trainer prunes the checkpoint it was
  about to read lists checkpoints/ again, with no warning, rather than fall
  back to best.safetensors;
- a reader of a run another process is creating or replacing (it holds the
  run's lock) is told so, naming that process, where it was told the folder
  is not a run or a file is missing; the reader writes nothing into the run.
"""
import json
import os
import subprocess
import sys

import pytest

import xpmodel
from cli_helpers import assert_one_line_error, copy_run, run_cli, train_tiny_run
from xpmodel.errors import UsageError
from xpmodel.train.rundir import RunDir

pytestmark = pytest.mark.usefixtures("private_cache")   # conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 10-step tiny run (checkpoints at steps 5 and 10, and best) and its corpus."""
    return train_tiny_run(tmp_path_factory.mktemp("concurrent_runs"), "train.max_iters=10",
                          "train.save_interval=5", "train.eval_interval=5")


@pytest.fixture
def run(trained, tmp_path):
    return RunDir(copy_run(trained, tmp_path))


@pytest.fixture
def live_process():
    """A process that runs until the test ends: a live writer or lock holder."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.kill()
    process.wait()


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_overwrite_keeps_a_live_writers_temporary_and_removes_dead_ones(capsys, run, trained,
                                                                         live_process):
    """`plot R` writing loss-health.png failed with 'No such file or directory'
    when `train --out R --overwrite` unlinked its temporary mid-write."""
    live = run.path / f".loss-health.png.tmp-{live_process.pid}"
    live.write_bytes(b"plot's half-written figure")
    dead = [run.path / f".loss.png.tmp-{dead_pid()}", run.checkpoint_dir / f".best.safetensors.tmp-{dead_pid()}"]
    for path in dead:
        path.write_bytes(b"left by a killed writer")
    code, _, err = run_cli(capsys, "train", "--config", trained["run"] / "config.yaml", "--quiet",
                           "--out", run.path, "--overwrite", "train.max_iters=2")
    assert code == 0, err
    assert live.read_bytes() == b"plot's half-written figure"
    assert [path for path in dead if path.exists()] == []


def test_load_lists_checkpoints_again_when_the_one_it_reads_was_pruned(run, monkeypatch):
    """A trainer saving every step with keep_last=1 removes the newest
    checkpoint load listed (and any older one) before load reads it: load
    printed 'skipping checkpoint: ...: checkpoint not found; using
    best.safetensors'. It takes the trainer's newer checkpoint instead."""
    newer = run.path.parent / "step-10-to-be-saved"
    os.replace(run.step_path(10), newer)       # listed: step 5 alone
    read = RunDir.read_checkpoint
    reads = []

    def pruned_after_listing(self, path):
        if not reads:    # the trainer saves step 10 and prunes step 5
            os.replace(newer, run.step_path(10))
            run.step_path(5).unlink()
        reads.append(path)
        return read(self, path)

    monkeypatch.setattr(RunDir, "read_checkpoint", pruned_after_listing)
    warnings = []
    xpmodel.load(run.path, warn=warnings.append)
    assert warnings == []
    assert reads == [run.step_path(5), run.step_path(10)]


def hold_lock(run, live_process):
    """The run's lock file as `live_process`, another xpmodel process, holds it."""
    import socket
    import time
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, sys.argv[2].encode())\n"
         "print('holding', flush=True)\n"
         "time.sleep(600)\n",
         str(run.lock_path),
         json.dumps({"pid": live_process.pid, "host": socket.gethostname(),
                     "started": time.time(), "command": "xpmodel train --overwrite"})],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


def _remove(*names):
    def remove(run):
        for name in names:
            (run.path / name).unlink()
    return remove


def _remove_checkpoints(run):
    for path in run.checkpoint_dir.iterdir():
        path.unlink()


@pytest.mark.parametrize("removed, alone", [
    (_remove("run.json"), "not an xpmodel run (no run.json)"),
    (_remove("config.yaml"), "config.yaml: missing"),
    (_remove("tokenizer.json"), "tokenizer.json"),
    (_remove_checkpoints, "the run has no checkpoint"),
])
def test_a_reader_of_a_run_being_written_is_told_so(capsys, run, live_process, removed, alone):
    """A run's file gone while another process holds its lock (creating it,
    or replacing it with --overwrite) said 'not an xpmodel run (no run.json);
    did you mean ...?' or 'no such tokenizer file'; now the reader names the
    writer. With no writer the message is what it was, and a reader never
    makes a lock file."""
    removed(run)
    with pytest.raises(Exception) as alone_error:
        xpmodel.load(run.path)
    assert alone in str(alone_error.value)
    assert not run.lock_path.exists()
    holder = hold_lock(run, live_process)
    try:
        with pytest.raises(UsageError) as error:
            xpmodel.load(run.path)
        message = str(error.value)
        assert message.startswith(f"RUN_DIR {run.path}: being written by another xpmodel process "
                                  f"(pid {live_process.pid} on "), message
        assert message.endswith("); wait for it to finish"), message
        code, _, err = run_cli(capsys, "sample", run.path, "--max-new-tokens", 2)
        assert code == 2
        assert_one_line_error(err)
        assert f"being written by another xpmodel process (pid {live_process.pid} on " in err
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("lock", ["held by the sweep", "left by a killed sweep", "none"])
def test_a_sweep_folder_given_as_a_run_is_named_as_one(capsys, trained, tmp_path, live_process,
                                                       lock):
    """`sample SW` on a sweep folder said 'being written by another xpmodel
    process (...); wait for it to finish' while the sweep ran (it holds
    SW/.xpmodel.lock), and 'the run was stopped while it was being created;
    start it again' once a killed sweep had left the lock file: neither makes
    a run of it. The reader is told it is a sweep folder whose trials are the
    runs, and writes nothing there."""
    import socket
    from xpmodel.tune.preset import open_sweep
    sweep = RunDir(tmp_path / "sweep")
    open_sweep(sweep.path, trained["run"] / "config.yaml", ["train.lr=1e-3,2e-3"], max_iters=3,
               show=False).close()
    holder = hold_lock(sweep, live_process) if lock == "held by the sweep" else None
    if lock == "left by a killed sweep":
        sweep.lock_path.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    before = sorted(path.name for path in sweep.path.iterdir())
    try:
        with pytest.raises(UsageError) as error:
            xpmodel.load(sweep.path)
        assert str(error.value) == (f"RUN_DIR {sweep.path}: not an xpmodel run (no run.json) "
                                    f"but a sweep folder (sweep.json); its trials are the runs: "
                                    f"{sweep.path / 'trials'}/trial-NNN")
        code, _, err = run_cli(capsys, "sample", sweep.path, "--max-new-tokens", 2)
        assert code == 2
        assert_one_line_error(err)
        assert f"error: {error.value}" in err
        assert sorted(path.name for path in sweep.path.iterdir()) == before
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
