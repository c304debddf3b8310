"""What a run folder may hold that xpmodel must not trust: an entry planted
under the name of one of its files or folders.

- a `.xpmodel.lock` that is a symbolic link, a hard link or a FIFO is refused
  in one line naming it by every writer (train --out / --resume, import-hf,
  sweep), and its target is left as it was; `runs` and `compare` never wait
  on a FIFO and name it;
- a checkpoints/ (tensorboard/, wandb/) that is a link is a folder the run
  does not own: nothing is started, resumed, replaced, deleted or pruned
  through it;
- metrics.jsonl records whose fields `runs`, `compare` and `plot` read have
  the wrong type or range are skipped with the warning that names the file;
- a health record of thousands of groups draws a figure of bounded size.
"""
import contextlib
import json
import os
import shutil
import signal
import struct
import zlib
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, copy_run, run_cli, train_tiny_run
from xpmodel.train.rundir import RunDir

TINY = Path(__file__).resolve().parent / "tiny-run.yaml"
try:
    import matplotlib
    HAVE_MATPLOTLIB = bool(matplotlib)
except ImportError:
    HAVE_MATPLOTLIB = False

pytestmark = pytest.mark.usefixtures("private_cache")   # conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 10-step tiny run (checkpoints at steps 0 .. 10) and its corpus; tests copy it."""
    return train_tiny_run(tmp_path_factory.mktemp("run_folder_safety"), "train.max_iters=10",
                          "train.save_interval=5", "train.eval_interval=5")


@pytest.fixture
def run(trained, tmp_path):
    return copy_run(trained, tmp_path)


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_text("the user's own file\n")
    return path


@contextlib.contextmanager
def within(seconds):
    """Fail, rather than hang, when the block takes longer than `seconds`."""
    def expired(*_):
        raise TimeoutError(f"still waiting after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refused(capsys, *args):
    code, out, err = run_cli(capsys, *args)
    assert code == 2, (code, out, err)
    assert_one_line_error(err)
    return err


def plant(folder, kind, victim):
    """A .xpmodel.lock in `folder` that is a symbolic or hard link to `victim`, or a FIFO."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".xpmodel.lock"
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "hardlink":
        os.link(victim, lock)
    else:
        os.mkfifo(lock)
    return lock


# ---- the lock file ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_train_never_writes_through_a_planted_lock_file(kind, capsys, run, victim, trained):
    before = victim.read_bytes()
    lock = plant(run, kind, victim)
    train = ["train", "--config", TINY, "--quiet", f"data.source={trained['corpus']}"]
    for args in ([*train, "--out", run], [*train, "--out", run, "--overwrite"], ["train", "--resume", run]):
        err = refused(capsys, *args)
        assert str(lock) in err and "lock file" in err
        assert victim.read_bytes() == before
        assert os.path.lexists(lock)
    assert RunDir(run).checkpoint_steps() == [5, 10]   # nothing replaced either


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_import_hf_and_sweep_never_write_through_a_planted_lock_file(kind, capsys, run, victim,
                                                                     tmp_path, trained):
    before = victim.read_bytes()
    hf = tmp_path / "hf"
    assert run_cli(capsys, "export-hf", run, hf)[0] == 0
    imported, sweep = tmp_path / "imported", tmp_path / "sweep"
    plant(imported, kind, victim)
    err = refused(capsys, "import-hf", hf, "--out", imported)
    assert str(imported / ".xpmodel.lock") in err and victim.read_bytes() == before
    assert [p.name for p in imported.iterdir()] == [".xpmodel.lock"]
    plant(sweep, kind, victim)
    err = refused(capsys, "sweep", "--config", TINY, f"data.source={trained['corpus']}",
                  "train.lr=1e-3,2e-3", "--max-iters", "2", "--out", sweep)
    assert str(sweep / ".xpmodel.lock") in err and victim.read_bytes() == before
    assert [p.name for p in sweep.iterdir()] == [".xpmodel.lock"]


def test_a_fifo_lock_file_is_named_and_never_waited_on(capsys, run, tmp_path):
    lock = plant(run, "fifo", None)
    with within(20):
        code, out, err = run_cli(capsys, "runs", run)
    assert code == 0 and "running" not in out and run.name in out
    assert f"warning: {lock}: is a FIFO" in err
    with within(20):
        code, out, err = run_cli(capsys, "compare", run, "--out", tmp_path / "compare.png")
    assert f"{lock}: is a FIFO" in err
    with within(20):
        err = refused(capsys, "train", "--resume", run)
    assert f"its lock file {lock} is a FIFO" in err
    assert not RunDir(run).is_locked()


def test_a_run_whose_lock_file_was_made_by_xpmodel_still_works(capsys, run):
    """The checks do not refuse a lock file left by a killed process."""
    (run / ".xpmodel.lock").write_text(json.dumps({"pid": 1 << 30, "host": "elsewhere"}) + "\n")
    assert run_cli(capsys, "train", "--resume", run, "train.max_iters=12")[0] == 0
    assert not os.path.lexists(run / ".xpmodel.lock")


def test_releasing_a_lock_removes_only_the_empty_folders_it_created(tmp_path):
    """Taking the lock of a/b/run creates a, a/b and a/b/run; releasing it
    removes those still empty, and keeps a folder that was there before or
    that something was written in meanwhile."""
    with RunDir(tmp_path / "a" / "b" / "run").lock():
        assert (tmp_path / "a" / "b" / "run" / ".xpmodel.lock").is_file()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a").mkdir()
    with RunDir(tmp_path / "a" / "b" / "run").lock():
        pass
    assert list(tmp_path.iterdir()) == [tmp_path / "a"] and list((tmp_path / "a").iterdir()) == []
    with RunDir(tmp_path / "a" / "b" / "run").lock():
        (tmp_path / "a" / "b" / "notes.txt").write_text("mine")
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["notes.txt"]


def test_a_lock_through_a_missing_folder_and_dotdot_removes_only_that_folder(tmp_path):
    """With b there and a not, a/../b is b: the lock makes a, which the path
    needs as written, and on release removes a but never b, even empty; a/../c
    makes c too and removes both."""
    (tmp_path / "b").mkdir()
    with RunDir(tmp_path / "a" / ".." / "b").lock():
        assert (tmp_path / "b" / ".xpmodel.lock").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    with RunDir(tmp_path / "a" / ".." / "c").lock():
        assert (tmp_path / "c" / ".xpmodel.lock").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_lock_this_process_holds_is_found_through_a_missing_folder_and_dotdot(tmp_path):
    """Inside b's lock, a/../b (a missing) is the same lock, not "in use by
    another process": the inner lock makes a, finds b held, removes a again,
    and leaves b locked until the outer lock ends."""
    (tmp_path / "b").mkdir()
    with RunDir(tmp_path / "b").lock() as outer:
        with RunDir(tmp_path / "a" / ".." / "b").lock() as inner:
            assert inner is outer and not (tmp_path / "a").exists()
        assert (tmp_path / "b" / ".xpmodel.lock").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert not (tmp_path / "b" / ".xpmodel.lock").exists()


def test_a_folder_that_takes_a_held_folders_inode_is_not_taken_for_it(tmp_path, monkeypatch):
    """A held run folder removed, and another made with its inode (as XFS
    reuses them; simulated here): the new folder's lock is a lock of its own,
    with its own lock file, not the old folder's held lock."""
    import xpmodel.train.runlock as runlock
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    identity = runlock._key
    monkeypatch.setattr(runlock, "_key", lambda path: identity(tmp_path / "old"))
    with RunDir(tmp_path / "old").lock() as old:
        with RunDir(tmp_path / "new").lock() as new:
            assert new is not old and (tmp_path / "new" / ".xpmodel.lock").is_file()
        assert not (tmp_path / "new" / ".xpmodel.lock").exists()
        assert (tmp_path / "old" / ".xpmodel.lock").is_file()
        with RunDir(tmp_path / "new").lock() as new:   # the old lock's release leaves it held
            old.release()
            assert runlock.held_lock(tmp_path / "new") is new


def test_a_folder_another_process_makes_while_the_lock_is_taken_is_kept(tmp_path, monkeypatch):
    """a is missing when the lock looks, then made by someone else before the
    lock makes it: the lock makes a/b and a/b/run, and removes only those."""
    import xpmodel.files as files
    walk = files.missing_folders

    def walk_then_another_process_makes_a(path):
        found = walk(path)
        (tmp_path / "a").mkdir()
        return found

    monkeypatch.setattr(files, "missing_folders", walk_then_another_process_makes_a)
    with RunDir(tmp_path / "a" / "b" / "run").lock():
        assert (tmp_path / "a" / "b" / "run" / ".xpmodel.lock").is_file()
    assert list(tmp_path.iterdir()) == [tmp_path / "a"] and list((tmp_path / "a").iterdir()) == []


def test_a_made_folder_replaced_by_a_link_is_not_followed_on_release(tmp_path):
    """The lock made a and a/run; a replaced by a link to the user's folder
    before the release: the user's empty run folder it leads to is kept."""
    (tmp_path / "user" / "run").mkdir(parents=True)
    with RunDir(tmp_path / "a" / "run").lock():
        (tmp_path / "a" / "run" / ".xpmodel.lock").unlink()
        (tmp_path / "a" / "run").rmdir()
        (tmp_path / "a").rmdir()
        (tmp_path / "a").symlink_to(tmp_path / "user")
    assert (tmp_path / "user" / "run").is_dir()


# ---- folders a run writes in ----------------------------------------------------------------
def link_checkpoints(run, other):
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").symlink_to(other / "checkpoints")


def test_a_linked_checkpoints_folder_is_never_written_or_emptied(capsys, run, tmp_path, trained):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    link_checkpoints(run, other)
    before = sorted(p.name for p in (other / "checkpoints").iterdir())
    train = ["train", "--config", TINY, "--quiet", f"data.source={trained['corpus']}"]
    for args in ([*train, "--out", run, "--overwrite"], ["train", "--resume", run, "train.max_iters=20"]):
        err = refused(capsys, *args)
        assert f"{run / 'checkpoints'} is a link" in err
        assert sorted(p.name for p in (other / "checkpoints").iterdir()) == before
    assert RunDir(run).is_run()
    RunDir(run).prune_checkpoints(keep_last=1)
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == before


def test_a_folder_holding_only_a_linked_checkpoints_folder_is_refused(capsys, tmp_path, trained):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("mine\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoints").symlink_to(elsewhere)
    err = refused(capsys, "train", "--config", TINY, "--quiet", f"data.source={trained['corpus']}",
                  "--out", out)
    assert f"{out / 'checkpoints'} is a link" in err
    assert [p.name for p in elsewhere.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


@pytest.mark.parametrize("folder", ["tensorboard", "wandb"])
def test_a_linked_mirror_folder_is_refused_on_resume(folder, capsys, run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / folder).symlink_to(elsewhere)
    err = refused(capsys, "train", "--resume", run, "train.max_iters=12")
    assert f"{run / folder} is a link" in err
    assert list(elsewhere.iterdir()) == []


def test_a_linked_checkpoints_folder_is_not_read_as_the_runs(capsys, run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    link_checkpoints(run, other)
    code, _, err = run_cli(capsys, "sample", run, "--max-new-tokens", "2")
    assert code != 0 and "checkpoints is a link" in err
    assert_one_line_error(err)


# ---- damaged metrics records ----------------------------------------------------------------
DAMAGED_RECORDS = [
    {"type": "warning", "step": 3, "kind": 5},
    {"type": "warning", "step": 3, "kind": ["a"]},
    {"type": "warning", "step": 3},
    {"type": "train", "step": 11, "loss": 1.0, "time": "abc"},
    {"type": "train", "step": 11, "loss": 1.0, "time": -1},
    {"type": "train", "step": 11, "loss": 1.0, "epoch": "x"},
    {"type": "train", "step": 11, "loss": 10 ** 400},
    {"type": "train", "step": 10 ** 400, "loss": 1.0},
    {"type": "train", "step": -1, "loss": 1.0},
    {"type": ["train"], "step": 11, "loss": 1.0},
    {"type": "eval", "step": 11, "val_loss": "low"},
    {"type": "health", "step": 11, "groups": 5, "grad_norm": [1]},
    {"type": "health", "step": 11, "groups": ["a"], "grad_norm": [1, 2, 3], "update_ratio": [1]},
    {"type": "health", "step": 11, "groups": ["a"]},
    {"type": "health", "step": 11, "groups": ["a"], "grad_norm": ["x"], "update_ratio": [1]},
]
# Non-finite numbers, which json.dumps of a Python dict cannot spell as JSON does.
DAMAGED_LINES = ['{"type":"train","step":11,"loss":1.0,"time":NaN}',
                 '{"type":"train","step":11,"loss":1.0,"time":1e400}']


def append_line(run, line):
    with open(run / "metrics.jsonl", "a") as f:
        f.write(line + "\n")


@pytest.mark.parametrize("line", [json.dumps(r) for r in DAMAGED_RECORDS] + DAMAGED_LINES)
def test_a_damaged_metrics_record_is_skipped_with_a_warning_naming_the_file(line, capsys, run, tmp_path):
    append_line(run, line)
    warning = f"warning: {run / 'metrics.jsonl'}: skipped 1 damaged line"
    code, out, err = run_cli(capsys, "runs", run)
    assert code == 0 and warning in err, err
    if not HAVE_MATPLOTLIB:
        return
    code, out, err = run_cli(capsys, "compare", run, "--out", tmp_path / "compare.png")
    assert code == 0 and warning in err, err
    code, out, err = run_cli(capsys, "plot", run, "--out", tmp_path / "plot.png")
    assert code == 0 and warning in err, err


def test_resume_keeps_the_records_it_skips_for_their_fields(capsys, run):
    """truncate_metrics drops only records past the resumed step, not those
    `runs` skips: bad input loses nothing."""
    line = json.dumps({"type": "warning", "step": 3, "kind": 5})
    append_line(run, line)
    assert run_cli(capsys, "train", "--resume", run, "train.max_iters=12")[0] == 0
    assert line in (run / "metrics.jsonl").read_text().splitlines()


def png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib not installed")
def test_a_health_record_of_thousands_of_groups_draws_a_bounded_figure(capsys, run, tmp_path):
    groups = 500   # unbounded, a figure 35,000 pixels high
    append_line(run, json.dumps({"type": "health", "step": 10, "groups": ["g"] * groups,
                                 "grad_norm": [1] * groups, "update_ratio": [1] * groups},
                                separators=(",", ":")))
    code, out, err = run_cli(capsys, "plot", run, "--out", tmp_path / "plot.png")
    assert code == 0, err
    width, height = png_size(tmp_path / "plot-health.png")
    assert width <= 2000 and height <= 5000, (width, height)


def test_a_lock_file_that_cannot_be_written_leaves_no_folder(capsys, tmp_path, monkeypatch):
    """A full disk met writing the lock record: one line naming the lock file,
    and neither the lock file nor the folders made for the run are left."""
    import errno
    from cli_helpers import write_corpus
    corpus = write_corpus(tmp_path / "corpus.txt", lines=50)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "pwrite", full)
    out = tmp_path / "runs" / "new"
    code, _, err = run_cli(capsys, "train", "--config", TINY, "--device", "cpu", "--quiet",
                           "--out", out, f"data.source={corpus}")
    assert code == 1, err
    assert_one_line_error(err)
    assert f"cannot write its lock file {out / '.xpmodel.lock'} (No space left on device)" in err
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_while_overwrite_removes_the_old_run_leaves_a_run_overwrite_takes(
        capsys, run, trained, monkeypatch):
    """SIGINT at the first file --overwrite removes: the removal finishes, then
    the interrupt acts; the folder is no half-removed run that no command
    would take again (run.json went first, then the lock file)."""
    import signal
    real_unlink, sent = Path.unlink, []

    def interrupted_at_the_first(path, missing_ok=False):
        real_unlink(path, missing_ok=missing_ok)
        if not sent and path.parent == run:
            sent.append(path)
            os.kill(os.getpid(), signal.SIGINT)
    command = ("train", "--config", TINY, "--device", "cpu", "--quiet", "--out", run,
               "--overwrite", f"data.source={trained['corpus']}", "train.max_iters=4")
    with monkeypatch.context() as patch:
        patch.setattr(Path, "unlink", interrupted_at_the_first)
        code, _, _ = run_cli(capsys, *command)
    assert code == 130 and sent
    code, _, err = run_cli(capsys, *command)
    assert code == 0, err
    assert RunDir(run).checkpoint_steps()[-1] == 4


def test_deferred_signals_hold_a_signal_until_the_block_ends():
    import signal
    from xpmodel.interrupts import deferred_signals
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("after the signal")
    assert done == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
