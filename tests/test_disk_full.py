"""A full disk while training or exporting: the error is one line naming the
file that could not be written, nothing already there is lost, and running
the command again (once there is room) works.

The disk fills at a chosen write: the file's write, flush or close raises
ENOSPC as it would on a full file system."""
import builtins
import errno
import os
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli
from xpmodel.errors import XpmodelError
from xpmodel.folder_write import write_folder_atomically
from xpmodel.hf.convert import export_hf
from xpmodel.model.gpt import GPT, GPTConfig
from xpmodel.tokenizer.bpe import BPETokenizer
from xpmodel.train import metrics_file
from xpmodel.train.checkpoint import read_checkpoint_meta
from xpmodel.train.rundir import RunDir

TINY = Path(__file__).resolve().parent / "tiny-run.yaml"
NO_SPACE = os.strerror(errno.ENOSPC)

pytestmark = pytest.mark.usefixtures("private_cache")   # conftest.py


def _no_space():
    return OSError(errno.ENOSPC, NO_SPACE)


class _FillsUp:
    """A file opened for appending on a disk that fills after `lines` more
    lines: the next line is written halfway, then every flush and the close
    fail, as a buffered file's do while it holds the rest."""

    def __init__(self, real, lines):
        self.real, self.lines, self.full = real, lines, False

    def write(self, text):
        if self.lines == 0:
            self.real.write(text[:len(text) // 2])
            self.real.flush()
            self.full = True
            return len(text)
        self.lines -= 1
        return self.real.write(text)

    def flush(self):
        if self.full:
            raise _no_space()
        self.real.flush()

    def close(self):
        self.real.close()
        if self.full:
            raise _no_space()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _metrics_fill_up_after(monkeypatch, path, lines):
    """While `monkeypatch` holds, opening `path` to append gives a file that
    fills up after `lines` lines."""
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if mode == "a" and os.path.abspath(os.fsdecode(file)) == os.path.abspath(path):
            return _FillsUp(handle, lines)
        return handle

    monkeypatch.setattr(builtins, "open", fake_open)


def test_a_full_disk_while_logging_names_metrics_jsonl_and_resume_continues(tmp_path, corpus,
                                                                             capsys, monkeypatch):
    run = RunDir(tmp_path / "run")
    with monkeypatch.context() as full:
        _metrics_fill_up_after(full, run.metrics_path, 15)
        code, _, err = run_cli(capsys, "train", "--config", TINY, "--device", "cpu", "--out",
                               run.path, f"data.source={corpus}", "train.log_interval=1")
    assert code == 1
    assert_one_line_error(err)
    assert f"{run.metrics_path}: {NO_SPACE}; the run's checkpoints are intact and " \
           f"train --resume continues" in err
    assert not run.metrics_path.read_text().endswith("\n")         # the line cut short
    latest, _ = run.latest_checkpoint()
    assert latest == run.step_path(10) and read_checkpoint_meta(latest)["step"] == 10

    code, _, err = run_cli(capsys, "train", "--resume", run.path)
    assert code == 0, err
    warnings = []
    records = run.read_metrics(warn=warnings.append)
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, 31))
    assert warnings == []                                           # the cut line went quietly


def test_a_metrics_file_that_fails_to_close_is_named(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    _metrics_fill_up_after(monkeypatch, path, 1)
    with pytest.raises(OSError) as failed:
        with metrics_file.appending(path) as handle:
            metrics_file.append_record(path, {"step": 1}, handle)
            handle.write("{")          # written halfway: the close cannot flush the rest
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(path)


def test_a_run_whose_first_checkpoint_cannot_be_written_is_not_created(tmp_path, corpus, capsys,
                                                                        monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".step-00000000"):
            raise _no_space()
        return real_fsync(fd)

    run = RunDir(tmp_path / "run")
    args = ["train", "--config", TINY, "--device", "cpu", "--out", run.path,
            f"data.source={corpus}", "train.max_iters=10"]
    with monkeypatch.context() as full:
        full.setattr(os, "fsync", fsync)
        code, _, err = run_cli(capsys, *args)
    assert code == 1
    assert_one_line_error(err)
    assert f"could not write {run.step_path(0)}: {NO_SPACE}; the run was not created" \
        in err
    assert not run.path.exists()
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert run.latest_checkpoint()[0] == run.step_path(10)


def test_an_export_whose_weights_do_not_fit_names_the_file(tmp_path, monkeypatch):
    tokenizer = BPETokenizer.train("the king shall speak of love and war to my lord " * 20, 270)
    model = GPT(GPTConfig(vocab_size=320, block_size=16, n_layer=1, n_head=2, n_embd=16))
    real_open = builtins.open

    class Full:
        def __init__(self, real):
            self.real = real

        def write(self, data):
            raise _no_space()

        def __getattr__(self, name):
            return getattr(self.real, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.real.close()

    def fake_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode and "model.safetensors" in os.readlink(f"/proc/self/fd/{handle.fileno()}"):
            return Full(handle)
        return handle

    out = tmp_path / "hf"
    with monkeypatch.context() as full, pytest.raises(XpmodelError) as failed:
        full.setattr(builtins, "open", fake_open)
        export_hf(model, tokenizer, out)
    assert str(failed.value) == (f"cannot write {out / 'model.safetensors'}: {NO_SPACE}; "
                                 f"nothing was written to {out}")
    assert list(tmp_path.iterdir()) == []
    export_hf(model, tokenizer, out)
    assert (out / "model.safetensors").is_file()


def test_a_folder_write_error_without_a_file_name_names_the_folder(tmp_path):
    def write(folder):
        raise _no_space()

    out = tmp_path / "out"
    with pytest.raises(XpmodelError) as failed:
        write_folder_atomically(out, write, frozenset())
    assert str(failed.value) == f"cannot write into {out}: {NO_SPACE}; nothing was written to {out}"
    assert list(tmp_path.iterdir()) == []


def test_a_replacing_run_that_cannot_be_written_keeps_the_run_there(tmp_path, corpus, capsys,
                                                                    monkeypatch):
    run = RunDir(tmp_path / "run")
    args = ["train", "--config", TINY, "--device", "cpu", "--out", run.path,
            f"data.source={corpus}", "train.max_iters=10"]
    assert run_cli(capsys, *args)[0] == 0
    before = {path: path.read_bytes() for path in sorted(run.path.rglob("*")) if path.is_file()}
    real_fsync = os.fsync

    def fsync(fd):   # the disk fills at the new run's step-0 checkpoint, after its config
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".step-00000000"):
            raise _no_space()
        return real_fsync(fd)

    with monkeypatch.context() as full:
        full.setattr(os, "fsync", fsync)
        code, _, err = run_cli(capsys, *args, "--overwrite", "train.lr=0.002")
    assert code == 1
    assert_one_line_error(err)
    assert f"could not write {run.step_path(0)}: {NO_SPACE}; the run that was there is kept" in err
    after = {path: path.read_bytes() for path in sorted(run.path.rglob("*")) if path.is_file()}
    assert after == before                                   # not a file changed, none left over
    code, _, err = run_cli(capsys, *args, "--overwrite", "train.lr=0.002")
    assert code == 0, err
    assert "lr: 0.002" in run.config_path.read_text()


def test_a_failure_after_the_old_run_was_removed_says_so(tmp_path, corpus, capsys, monkeypatch):
    run = RunDir(tmp_path / "run")
    args = ["train", "--config", TINY, "--device", "cpu", "--out", run.path,
            f"data.source={corpus}", "train.max_iters=10"]
    assert run_cli(capsys, *args)[0] == 0
    real_replace = os.replace

    def replace(source, target):   # the rename of the new tokenizer.json fails (a failing disk)
        if str(target).endswith("tokenizer.json"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(source, target)

    with monkeypatch.context() as failing:
        failing.setattr(os, "replace", replace)
        code, _, err = run_cli(capsys, *args, "--overwrite")
    assert code == 1
    assert_one_line_error(err)
    assert "the run that was there was removed, and the new one was not created" in err, err
    assert not run.is_run()
    assert run_cli(capsys, *args)[0] == 0      # the folder is taken over without --overwrite


def test_a_signal_while_the_old_run_is_replaced_leaves_the_new_run_whole(tmp_path, corpus,
                                                                         capsys, monkeypatch):
    import signal
    run = RunDir(tmp_path / "run")
    args = ["train", "--config", TINY, "--device", "cpu", "--out", run.path,
            f"data.source={corpus}", "train.max_iters=10"]
    assert run_cli(capsys, *args)[0] == 0
    real_remove = RunDir._remove_run_files

    def remove_then_interrupt(self):
        real_remove(self)
        signal.raise_signal(signal.SIGINT)    # held until run.json is written

    monkeypatch.setattr(RunDir, "_remove_run_files", remove_then_interrupt)
    code, _, err = run_cli(capsys, *args, "--overwrite", "train.lr=0.002")
    assert code == 130, err
    assert run.is_run() and run.checkpoint_steps() == [0]
    assert "lr: 0.002" in run.config_path.read_text()
