"""train.log_to on tiny runs: TensorBoard event files whose scalars read back
equal to metrics.jsonl's, across a resume that cut steps off; a W&B offline
run folder that a resume continues; a mirror that fails only warns."""
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli
import xpmodel.train.mirrors as mirrors_module
from xpmodel.config import load_config
from xpmodel.train.rundir import RunDir
from xpmodel.train import Trainer

TINY = Path(__file__).resolve().parent / "tiny-run.yaml"


pytestmark = pytest.mark.usefixtures("private_cache")   # corpus: conftest.py


def train(run, corpus, *overrides):
    config = load_config(TINY, [f"data.source={corpus}", "train.health_interval=10",
                                "train.sample_interval=10", "train.sample_tokens=8", *overrides])
    return Trainer.start(config, device="cpu", out=run, show=False).run()


def xpmodel_process(*args):
    """`python -m xpmodel ARGS` in a process of its own; fails the test unless it succeeds."""
    result = subprocess.run([sys.executable, "-m", "xpmodel", *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def resume_from_step_20(run):
    """As after a kill at step 25: the last checkpoint is step 20."""
    for path in RunDir(run).checkpoint_dir.iterdir():
        if "20" not in path.name:
            path.unlink()
    Trainer.resume(run, show=False).run()


def test_tensorboard_scalars_equal_metrics_jsonl_across_a_resume(tmp_path, corpus):
    pytest.importorskip("tensorboardX")
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = tmp_path / "run"
    train(run, corpus, "train.log_to=tensorboard")
    resume_from_step_20(run)     # steps 21-30 again: the first process's must be purged

    expected = {}
    for record in RunDir(run).read_metrics():
        for tag, value in mirrors_module._scalars(record).items():
            expected.setdefault(tag, []).append((record["step"], value))
    events = accumulator.EventAccumulator(str(run / "tensorboard"),
                                          size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    assert {"train/loss", "eval/val_loss", "eval/gap", "health/update_ratio/h.0"} <= set(expected)
    # the core tags read straight from metrics.jsonl, apart from the mapping above
    records = RunDir(run).read_metrics()
    assert expected["train/loss"] == [(r["step"], r["loss"]) for r in records if r["type"] == "train"]
    assert expected["health/update_ratio/h.0"] == [
        (r["step"], r["update_ratio"][r["groups"].index("h.0")]) for r in records if r["type"] == "health"]
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag
    texts = set(events.Tags()["tensors"])
    assert {"config/text_summary", "samples/text_summary"} <= texts
    samples = events.Tensors("samples/text_summary")
    # (this reader purges only scalars, histograms and images on a restart, not text)
    assert sorted({e.step for e in samples}) == [10, 20, 30]


def test_wandb_offline_run_folder_continued_by_a_resume(tmp_path, corpus, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)          # offline by default
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    run = tmp_path / "run"
    # each in its own process, as a resume after a kill is: W&B's service
    # finishes a run asynchronously, so a second run of the same id in the same
    # process can race with the first one's end
    overrides = [f"data.source={corpus}", "train.health_interval=10", "train.sample_interval=10",
                 "train.sample_tokens=8", "train.log_to=[wandb]"]
    xpmodel_process("train", "--config", TINY, "--out", run, "--quiet", *overrides)
    run_id = (run / "wandb" / "run-id").read_text().strip()
    for path in RunDir(run).checkpoint_dir.iterdir():     # as after a kill at step 25
        if "20" not in path.name:
            path.unlink()
    xpmodel_process("train", "--resume", run, "--quiet")
    folders = sorted((run / "wandb").glob("offline-run-*"))
    # offline-run-TIME-ID, with -1 after it when both began in the same second
    assert len(folders) == 2 and all(f"-{run_id}" in f.name for f in folders)
    for folder in folders:
        assert (folder / f"run-{run_id}.wandb").stat().st_size > 1000
    assert not [r for r in RunDir(run).read_metrics() if r["type"] == "warning"]


@pytest.mark.parametrize("mine", ["wandb/run-id", "tensorboard/events.out.tfevents.1"])
def test_a_folder_holding_a_users_mirror_files_is_never_written(mine, capsys, tmp_path, corpus):
    out = tmp_path / "out"
    (out / mine).parent.mkdir(parents=True)
    (out / mine).write_text("my own\n")
    code, _, err = run_cli(capsys, "train", "--config", TINY, "--out", out, "--overwrite",
                           f"data.source={corpus}", "train.log_to=[wandb,tensorboard]")
    assert code == 2
    assert_one_line_error(err)
    assert f"holds {mine.split('/events')[0]}, which no xpmodel run here wrote" in err
    assert "will not replace it, even with --overwrite: move it away" in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == sorted([mine, mine.split("/")[0]])
    assert (out / mine).read_text() == "my own\n"


class _FakeWandb:
    """The part of the wandb module WandbSink calls, recording the run ids."""
    ids = []

    class Settings:
        def __init__(self, **settings):
            pass

    @classmethod
    def init(cls, id, **settings):
        cls.ids.append(id)


def test_the_wandb_run_id_is_replaced_atomically_and_read_bounded(tmp_path, monkeypatch):
    from xpmodel.errors import XpmodelError
    monkeypatch.setitem(sys.modules, "wandb", _FakeWandb)
    config = load_config(TINY)
    run = RunDir(tmp_path / "run")
    run.wandb_id_path.parent.mkdir(parents=True)
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes\n")
    run.wandb_id_path.symlink_to(mine)
    mirrors_module.WandbSink(run, config, 0)     # a new run: a new id, beside the link
    assert mine.read_text() == "my notes\n" and not run.wandb_id_path.is_symlink()
    assert run.wandb_id_path.read_text() == _FakeWandb.ids[-1] + "\n"
    mirrors_module.WandbSink(run, config, 20)    # a resumed run: the same id
    assert _FakeWandb.ids[-1] == _FakeWandb.ids[-2]
    with open(run.wandb_id_path, "wb") as f:
        f.truncate(1 << 30)
    with pytest.raises(XpmodelError, match="W&B run id is 1,073,741,824 bytes"):
        mirrors_module.WandbSink(run, config, 20)
    run.wandb_id_path.write_text("../../elsewhere\n")
    with pytest.raises(XpmodelError, match="is not a W&B run id xpmodel wrote"):
        mirrors_module.WandbSink(run, config, 20)


class _BreaksOnThirdRecord:
    calls = 0

    def __init__(self, run_dir, config, step):
        pass

    def record(self, record):
        type(self).calls += 1
        if type(self).calls == 3:
            raise OSError("No space left on device")

    def sample(self, step, text):
        pass

    def close(self):
        pass


def test_a_failing_mirror_warns_once_and_training_goes_on(tmp_path, corpus, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "tensorboardX", None)          # not installed
    monkeypatch.setitem(mirrors_module.SINKS, "wandb", _BreaksOnThirdRecord)
    run = tmp_path / "run"
    summary = train(run, corpus, "train.log_to=tensorboard,wandb")
    assert summary["stop_reason"] == "finished" and summary["steps"] == 30
    records = RunDir(run).read_metrics()
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, 31))
    warnings = [r for r in records if r["type"] == "warning"]
    assert [w["kind"] for w in warnings] == ["log_to", "log_to"]
    assert "train.log_to tensorboard: " in warnings[0]["message"]
    assert "pip install 'xpmodel[tensorboard]'" in warnings[0]["message"]
    assert "train.log_to wandb: OSError: No space left on device" in warnings[1]["message"]
    assert _BreaksOnThirdRecord.calls == 3                            # off after it failed


class _Records(_BreaksOnThirdRecord):
    got = []

    def record(self, record):
        type(self).got.append(record)


class _FailsToStart(_BreaksOnThirdRecord):
    def __init__(self, run_dir, config, step):
        raise RuntimeError("cannot start")


def test_a_mirror_that_fails_is_named_in_a_warning_the_other_mirrors_get(tmp_path, corpus,
                                                                        monkeypatch):
    monkeypatch.setitem(mirrors_module.SINKS, "wandb", _FailsToStart)        # named first
    monkeypatch.setitem(mirrors_module.SINKS, "tensorboard", _Records)
    _Records.got = []
    run = tmp_path / "run"
    train(run, corpus, "train.log_to=wandb,tensorboard")
    warnings = [r for r in RunDir(run).read_metrics() if r["type"] == "warning"]
    assert [w["kind"] for w in warnings] == ["log_to"]
    assert "train.log_to wandb: RuntimeError: cannot start" in warnings[0]["message"]
    assert [r for r in _Records.got if r["type"] == "warning"] == warnings
    assert len([r for r in _Records.got if r["type"] == "train"]) == 30


def test_log_to_names_are_checked(capsys, corpus):
    code, _, err = run_cli(capsys, "train", "--config", TINY, f"data.source={corpus}",
                           "train.log_to=tensorboard,wandbb")
    assert code == 2 and "train.log_to must be one of tensorboard, wandb; got 'wandbb'" in err
    assert_one_line_error(err)
    assert load_config(TINY, ["train.log_to=[wandb, tensorboard]"]).train.log_to == \
        ["wandb", "tensorboard"]


def test_a_tensorboard_writer_that_fails_on_a_full_disk_warns_and_training_goes_on(tmp_path,
                                                                                   corpus):
    """tensorboardX writes from a thread of its own; a write failing there ended
    that thread with a traceback through the display, and once its queue of 10
    events was full, training blocked for good. Now one warning, and the run
    finishes."""
    pytest.importorskip("tensorboardX")
    script = """
import errno, sys
from tensorboardX import event_file_writer
write, written = event_file_writer.EventsWriter.write_event, []
def full_after_a_few(self, event):
    written.append(event)
    if len(written) > 5:
        raise OSError(errno.ENOSPC, "No space left on device")
    return write(self, event)
event_file_writer.EventsWriter.write_event = full_after_a_few
from xpmodel.cli.main import main
sys.exit(main(sys.argv[1:]))
"""
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", script, "train", "--config", TINY, "--device", "cpu", "--quiet",
         "--out", run, f"data.source={corpus}", "train.log_to=tensorboard",
         "train.log_interval=1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "train.log_to tensorboard: OSError: [Errno 28] No space left on device" in result.stdout
    records = RunDir(run).read_metrics()
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, 31))
    assert [r["kind"] for r in records if r["type"] == "warning"] == ["log_to"]
