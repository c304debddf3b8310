"""How often the commands that pick a checkpoint read checkpoint headers:
once per file they consider, counted at the one header reader
(hf/safetensors_file.py), and what keeps a header read earlier honest (a file
replaced or changed since is refused, or read again)."""
import collections
import os
import shutil
from pathlib import Path

import pytest
from safetensors.numpy import load_file

import xpmodel
from xpmodel.errors import CheckpointError
from xpmodel.hf import safetensors_file
from xpmodel.train.checkpoint import read_checkpoint_header, read_checkpoint_meta, save_checkpoint
from xpmodel.train.rundir import RunDir
from cli_helpers import copy_run, run_cli, train_tiny_run

STEPS = ("step-00000010.safetensors", "step-00000020.safetensors", "step-00000030.safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run holding three step checkpoints (10, 20, 30) and best."""
    return train_tiny_run(tmp_path_factory.mktemp("checkpoint_reads"), "train.keep_last=3")


@pytest.fixture
def run(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("XPMODEL_CACHE", str(trained["run"].parent / "cache"))
    return copy_run(trained, tmp_path)


@pytest.fixture
def header_reads(monkeypatch):
    """file name -> how many times its safetensors header has been read."""
    counts = collections.Counter()
    read_header = safetensors_file._read_header

    def counting(file, path, *args):
        counts[Path(path).name] += 1
        return read_header(file, path, *args)

    monkeypatch.setattr(safetensors_file, "_read_header", counting)
    return counts


def test_a_resume_reads_each_checkpoint_header_once(run, header_reads, capsys):
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.safetensors", *STEPS]
    code, out, err = run_cli(capsys, "train", "--resume", run, "--quiet")
    assert code == 0, err
    assert "resumed" in out and "at step 30 from step-00000030.safetensors" in out
    assert dict(header_reads) == {name: 1 for name in ("best.safetensors", *STEPS)}


def test_a_resume_past_a_damaged_checkpoint_reads_each_header_once(run, header_reads, capsys):
    newest = run / "checkpoints" / STEPS[-1]
    newest.write_bytes(newest.read_bytes()[:-100])
    code, out, err = run_cli(capsys, "train", "--resume", run, "--quiet")
    assert code == 0, err
    assert f"skipping checkpoint: {newest}: truncated or corrupt checkpoint" in out
    assert "at step 20 from step-00000020.safetensors" in out
    # step 30 three times: the damaged file, again when the resumed run checks it is
    # xpmodel's before saving over it, then the one saved in its place
    assert dict(header_reads) == {"best.safetensors": 1, STEPS[0]: 1, STEPS[1]: 1, STEPS[2]: 3}


@pytest.mark.parametrize("which, damaged, read", [
    ("latest", None, [STEPS[-1]]),
    ("best", None, ["best.safetensors"]),
    ("latest", STEPS[-1], [STEPS[-1], STEPS[-2]]),
])
def test_loading_a_run_reads_only_the_headers_it_needs_once(run, header_reads, which, damaged,
                                                            read):
    if damaged is not None:
        path = run / "checkpoints" / damaged
        path.write_bytes(path.read_bytes()[:-100])
    warnings = []
    xpmodel.load(run, checkpoint=which, warn=warnings.append)
    assert dict(header_reads) == {name: 1 for name in read}
    assert len(warnings) == (damaged is not None)


@pytest.mark.parametrize("damaged, read", [(None, [STEPS[-1]]),
                                            (STEPS[-1], [STEPS[-1], STEPS[-2]])])
def test_runs_reads_the_header_of_the_newest_readable_checkpoint_once(run, header_reads, damaged,
                                                                      read):
    """`xpmodel runs` (compare.summarize) takes a run's tokens seen from its
    newest checkpoint that reads cleanly, reading each header it looks at once."""
    from xpmodel.tune.compare import summarize
    if damaged is not None:
        path = run / "checkpoints" / damaged
        path.write_bytes(path.read_bytes()[:-100])
    tokens = read_checkpoint_meta(run / "checkpoints" / read[-1])["tokens_seen"]
    header_reads.clear()
    assert summarize(RunDir(run))["tokens"] == tokens > 0
    assert dict(header_reads) == {name: 1 for name in read}


def _tensors(path):
    """(params, optimizer state) of the checkpoint at `path`, as the
    safetensors library reads them."""
    parts = {"param": {}, "optim": {}}
    for key, value in load_file(path).items():
        kind, name = key.split("/", 1)
        parts[kind][name] = value
    return parts["param"], parts["optim"]


@pytest.mark.parametrize("change", ["renamed over", "truncated", "rewritten in place"])
def test_a_checkpoint_changed_after_its_header_was_read_is_refused(run, change):
    path = run / "checkpoints" / STEPS[-1]
    header = read_checkpoint_header(path)
    data = path.read_bytes()
    if change == "renamed over":
        copy = run / "checkpoints" / "copy"
        shutil.copy(run / "checkpoints" / STEPS[0], copy)
        os.replace(copy, path)
    elif change == "truncated":
        with open(path, "r+b") as f:
            f.truncate(len(data) - 4)
    else:   # the same size, a later write (set explicitly: timestamps can be coarse)
        mtime = os.stat(path).st_mtime_ns
        with open(path, "r+b") as f:
            f.write(data)
        os.utime(path, ns=(mtime, mtime + 1000))
    assert not header.unchanged()
    params, _ = _tensors(run / "checkpoints" / STEPS[1])
    with pytest.raises(CheckpointError, match="replaced or changed since its header was read"):
        header.load({name: value.shape for name, value in params.items()}, None)


def test_pruning_reads_again_a_checkpoint_changed_since_the_resume_read_it(run):
    """A checkpoint the resume read as the run's own, then replaced by one of
    another run (other data.* settings), is not pruned: its header is read again."""
    rundir = RunDir(run)
    config = rundir.load_config()
    read = list(rundir.checkpoints_newest_first())
    oldest = rundir.checkpoint_dir / STEPS[0]
    meta = read_checkpoint_meta(oldest)
    foreign = dict(meta, config=dict(meta["config"], data=dict(meta["config"]["data"],
                                                              source="another corpus")))
    save_checkpoint(oldest, *_tensors(oldest), foreign)
    rundir.prune_checkpoints(keep_last=1, config=config, already_read=read)
    assert sorted(p.name for p in rundir.checkpoint_dir.iterdir()) == \
        ["best.safetensors", STEPS[0], STEPS[-1]]


def test_load_reads_again_a_best_saved_anew_between_its_header_and_its_tensors(run, monkeypatch):
    """A trainer saving a new best while `sample --checkpoint best` reads it
    (no lock): the new file is read, not passed over for a step checkpoint."""
    from xpmodel.train import checkpoint
    best = run / "checkpoints" / "best.safetensors"
    meta = read_checkpoint_meta(best)
    load, saved = checkpoint.CheckpointHeader.load, []

    def saving_meanwhile(header, *args):
        if header.path == best and not saved:
            saved.append(True)
            save_checkpoint(best, *_tensors(best), dict(meta, val_loss=meta["val_loss"] / 2))
        return load(header, *args)
    monkeypatch.setattr(checkpoint.CheckpointHeader, "load", saving_meanwhile)
    warnings = []
    model, _ = xpmodel.load(run, checkpoint="best", warn=warnings.append)
    assert saved and warnings == []
    params, _ = _tensors(best)
    assert all((model.params[name] == value).all() for name, value in params.items())
