"""What pruning may delete, what a checkpoint's header and metadata must hold
to be trusted, and what a resume refuses.

- pruning counts and deletes only good xpmodel checkpoints, never a user's
  file, link or folder, and never the checkpoint just written;
- step names of any number of digits are found and sorted by number;
- a SafetensorsFile reads through one descriptor, so a file renamed over
  its path meanwhile is never mixed in; tensor byte ranges must tile the data;
- damaged or implausible metadata (sampler state, step, NaN) makes a resume
  fall back to the checkpoint before;
- a corpus that changed since the checkpoint is refused in one line;
- best.safetensors is not replaced by a worse model after a fallback.
"""
import json
import os
import shutil
import signal
import struct
from pathlib import Path

import numpy
import pytest
from safetensors.numpy import save_file

from cli_helpers import assert_one_line_error, run_cli, write_corpus
from test_checkpoint import N, SHAPES, tiny_state
from xpmodel.config import load_config
from xpmodel.data.batching import SamplerStateError, check_sampler_state
from xpmodel.errors import CheckpointError
from xpmodel.hf.safetensors_file import SafetensorsFile
from xpmodel.tokenizer.bpe import BPETokenizer
from xpmodel.train import Trainer
from xpmodel.train.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from xpmodel.train.rundir import RunDir
from xpmodel.train.signals import Interrupted

TINY = Path(__file__).resolve().parent / "tiny-run.yaml"

pytestmark = pytest.mark.usefixtures("private_cache")   # conftest.py


def save_step(run, step, seed=0, changes=None):
    params, optim, meta = tiny_state(seed, step=0)
    save_checkpoint(run.step_path(step), params, optim, {**meta, "step": step, **(changes or {})})
    return run.step_path(step)


def empty_run(root):
    run = RunDir(root)
    run.create(load_config(TINY, ["data.source=unused.txt"]), BPETokenizer())
    return run


def names(run):
    return sorted(p.name for p in run.checkpoint_dir.iterdir())


def write_raw(path, header, data=b""):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def rewrite_meta(path, **changes):
    """Rewrite a tiny-run checkpoint with some metadata fields changed (None removes one)."""
    meta, params, optim = load_checkpoint(path, SHAPES, {"m": N, "v": N})
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    save_checkpoint(path, params, optim, meta)


def tiny_config(corpus, root, *overrides):
    return load_config(TINY, [f"data.source={corpus}", f"data.cache_dir={root / 'cache'}",
                              *overrides])


@pytest.fixture
def run_copy(tmp_path):
    """A finished 30-step run of its own corpus (checkpoints at steps 20 and 30,
    evaluations every 10), made in this process."""
    root = tmp_path / "own"
    root.mkdir()
    corpus = write_corpus(root / "corpus.txt")
    Trainer.start(tiny_config(corpus, root), device="cpu", out=root / "run", show=False).run()
    return RunDir(root / "run")


# ---- 1, 2: pruning ----------------------------------------------------------------

def test_a_damaged_newest_checkpoint_does_not_count_toward_keep_last(tmp_path):
    run = empty_run(tmp_path / "run")
    for step in (2, 4, 6):
        save_step(run, step)
    os.truncate(run.step_path(6), 5000)
    written = save_step(run, 5)
    run.prune_checkpoints(1, written=written, resumed_from=run.step_path(4))
    assert names(run) == ["step-00000005.safetensors", "step-00000006.safetensors"]
    assert run.latest_checkpoint()[0] == run.step_path(5)


def test_the_checkpoint_just_written_and_the_one_resumed_from_are_kept(tmp_path):
    run = empty_run(tmp_path / "run")
    save_step(run, 4)
    save_step(run, 9)                     # reads as good, but could not be loaded (say)
    written = save_step(run, 5)
    run.prune_checkpoints(1, written=written, resumed_from=run.step_path(4))
    assert names(run) == ["step-00000005.safetensors", "step-00000009.safetensors"]
    os.truncate(written, 100)             # the new save did not come out readable
    run.prune_checkpoints(1, written=written, resumed_from=run.step_path(4))
    assert "step-00000009.safetensors" in names(run)


def test_a_checkpoint_replaced_after_pruning_judged_it_is_left(tmp_path, monkeypatch):
    """Pruning reads every header first and deletes afterwards: a step-2 file
    replaced by the user's own in between is kept, the other old one is not."""
    import xpmodel.train.rundir as rundir
    run = empty_run(tmp_path / "run")
    for step in (2, 3, 4):
        save_step(run, step)
    read = rundir.read_checkpoint_header

    def read_then_replace_step_2(path):
        header = read(path)
        if path == run.step_path(2):
            (tmp_path / "mine").write_text("the user's own file\n")
            os.replace(tmp_path / "mine", path)
        return header

    monkeypatch.setattr(rundir, "read_checkpoint_header", read_then_replace_step_2)
    run.prune_checkpoints(1, written=run.step_path(4))
    assert names(run) == ["step-00000002.safetensors", "step-00000004.safetensors"]
    assert run.step_path(2).read_text() == "the user's own file\n"


def _trained_tiny_run(tmp_path, capsys, *overrides):
    """A run of the tiny config trained by the CLI, saving every 2 steps, with `overrides`."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = RunDir(tmp_path / "run")
    code, _, err = run_cli(capsys, "train", "--config", TINY, "--out", run.path,
                           f"data.source={corpus}", "train.save_interval=2",
                           "train.eval_interval=100", *overrides)
    assert code == 0, err
    return run


def test_resume_after_a_damaged_newest_checkpoint_keeps_a_usable_one(tmp_path, capsys):
    run = _trained_tiny_run(tmp_path, capsys, "train.max_iters=6", "train.keep_last=3")
    assert run.checkpoint_steps() == [2, 4, 6]
    os.truncate(run.step_path(6), 5000)
    code, out, err = run_cli(capsys, "train", "--resume", run.path, "train.max_iters=5",
                             "train.keep_last=1")
    assert code == 0, err
    assert "at step 4" in out
    assert run.checkpoint_steps() == [5, 6]
    assert run.latest_checkpoint()[0] == run.step_path(5)
    code, out, err = run_cli(capsys, "train", "--resume", run.path, "train.max_iters=5")
    assert code == 0, err
    assert "at step 5" in out


def test_pruning_leaves_files_links_and_folders_it_did_not_write(tmp_path, capsys):
    run = _trained_tiny_run(tmp_path, capsys, "train.max_iters=2", "train.keep_last=1")
    user_file = run.checkpoint_dir / "step-00000001.safetensors"
    user_file.write_text("user-made")
    target = tmp_path / "elsewhere.safetensors"
    shutil.copy(run.step_path(2), target)
    user_link = run.checkpoint_dir / "step-00000000.safetensors"
    user_link.symlink_to(target)
    user_folder = run.checkpoint_dir / "step-00000003.safetensors"
    user_folder.mkdir()
    code, out, err = run_cli(capsys, "train", "--resume", run.path, "train.max_iters=6",
                             "train.keep_last=1")
    assert code == 0, err
    assert user_file.read_text() == "user-made"
    assert user_link.is_symlink() and target.exists()
    assert user_folder.is_dir()
    assert run.step_path(6).is_file() and not run.step_path(4).exists()


def test_a_save_and_overwrite_keep_files_links_and_folders_with_checkpoint_names(tmp_path, capsys):
    run = _trained_tiny_run(tmp_path, capsys, "train.max_iters=2", "train.keep_last=1")
    target = tmp_path / "elsewhere.safetensors"
    target.write_text("the link's own")
    foreign = {3: lambda path: path.write_text("user-made"),
               4: lambda path: save_file({"x": numpy.zeros(2)}, str(path)),   # another program's
               5: lambda path: path.symlink_to(target),
               6: lambda path: path.mkdir()}
    for step, make in foreign.items():
        make(run.step_path(step))
    kept = {step: (run.step_path(step).is_dir() or run.step_path(step).read_bytes())
            for step in foreign}
    for step in foreign:
        code, out, err = run_cli(capsys, "train", "--resume", run.path, f"train.max_iters={step}",
                                 "train.save_interval=100")
        assert code == 1
        assert_one_line_error(err)
        assert f"could not write checkpoint {run.step_path(step)}: the entry of that name" in err
        assert "it is kept" in err and f"xpmodel train --resume {run.path}" in err
        assert (run.step_path(step).is_dir() or run.step_path(step).read_bytes()) == kept[step]
        assert run.latest_checkpoint()[0] == run.step_path(2)   # the previous one, intact
    config = shutil.copy(run.config_path, tmp_path / "config.yaml")
    code, out, err = run_cli(capsys, "train", "--config", config, "--out", run.path, "--overwrite",
                             "train.max_iters=2")
    assert code == 0, err
    assert all((run.step_path(step).is_dir() or run.step_path(step).read_bytes()) == kept[step]
               for step in foreign)
    assert target.read_text() == "the link's own"


# ---- 3: step names of nine digits and more ----------------------------------------

def test_steps_from_ten_to_the_eighth_are_found_and_sorted_by_number(tmp_path):
    run = empty_run(tmp_path / "run")
    save_step(run, 99_999_999)
    big = save_step(run, 10**8)
    assert big.name == "step-100000000.safetensors"
    (run.checkpoint_dir / "step-000000007.safetensors").write_bytes(big.read_bytes())   # not canonical
    assert run.checkpoint_steps() == [99_999_999, 10**8]
    assert run.latest_checkpoint()[0] == big
    run.prune_checkpoints(1, written=big)
    assert names(run) == ["step-000000007.safetensors", "step-100000000.safetensors"]


# ---- 4, 5: reading safetensors files -----------------------------------------------

def test_a_file_replaced_after_opening_is_still_read_from_the_original(tmp_path):
    path, other = tmp_path / "c.safetensors", tmp_path / "other.safetensors"
    params, optim, meta = tiny_state(seed=0, step=0)
    save_checkpoint(path, params, optim, meta)
    params2, optim2, _ = tiny_state(seed=1, step=0)
    save_checkpoint(other, params2, optim2, meta)
    with SafetensorsFile(path, CheckpointError, "checkpoint") as file:
        os.replace(other, path)
        numpy.testing.assert_array_equal(file.read("param/wte.weight"), params["wte.weight"])
        numpy.testing.assert_array_equal(file.read("optim/v"), optim["v"])
    with pytest.raises(ValueError, match="closed"):
        file.read("optim/v")


def _entry(start, count):
    return {"dtype": "F32", "shape": [count], "data_offsets": [start * 4, (start + count) * 4]}


TILINGS = {
    "overlapping": ({"a": _entry(0, 2), "b": _entry(1, 2)}, 12, "'b'.*overlap"),
    "gapped": ({"a": _entry(0, 2), "b": _entry(3, 1)}, 16, "'b'.*gap"),
    "not from zero": ({"a": _entry(1, 2)}, 12, "'a'.*gap"),
    "bytes left over": ({"a": _entry(0, 2)}, 12, "cover 8 bytes of the 12-byte"),
}


@pytest.mark.parametrize("case", list(TILINGS))
def test_tensor_byte_ranges_must_tile_the_data(case, tmp_path):
    header, size, message = TILINGS[case]
    path = tmp_path / "t.safetensors"
    write_raw(path, header, b"\0" * size)
    with pytest.raises(CheckpointError, match=message) as raised:
        SafetensorsFile(path, CheckpointError, "checkpoint")
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_tensors_listed_out_of_order_but_tiling_the_data_are_read(tmp_path):
    path = tmp_path / "t.safetensors"
    data = numpy.arange(3, dtype="<f4").tobytes()
    write_raw(path, {"b": _entry(2, 1), "a": _entry(0, 2), "empty": _entry(2, 0)}, data)
    with SafetensorsFile(path, CheckpointError, "checkpoint") as file:
        assert file.read("b").tolist() == [2.0] and file.read("a").tolist() == [0.0, 1.0]


# ---- 6, 7: implausible metadata ----------------------------------------------------

@pytest.mark.parametrize("changes, culprit", [
    ({"step": 4}, "step must be 3"),
    ({"step": 10**30}, "step must be an integer from 0"),
    ({"elapsed": float("nan")}, "elapsed must be a finite number"),
    ({"best_val": float("-inf")}, "best_val must be a finite number"),
    ({"best_val": -1.0}, "best_val cannot be negative"),
    ({"sampler": {"sampler": "epoch", "batch_size": 4, "block_size": 16, "tokens": 1000,
                  "token_dropout": 0.0, "seed": 1, "epoch": 0, "position": -1}},
     "sampler.position"),
    ({"loss_scaler": {"scale": 0.5, "good_steps": 0, "skipped_in_a_row": 0, "skipped_total": 0}},
     "loss_scaler.scale"),
    ({"tokens_seen": 10**400}, "tokens_seen must be an integer from 0 to 2\\*\\*63-1"),
    ({"optimizer_steps": 2**63}, "optimizer_steps must be an integer from 0"),
    ({"elapsed": 10**400}, "elapsed must be a finite number"),
    ({"loss_scaler": {"scale": 10**400, "good_steps": 0, "skipped_in_a_row": 0,
                      "skipped_total": 0}}, "loss_scaler.scale"),
    ({"loss_scaler": {"scale": 2.0, "good_steps": 10**400, "skipped_in_a_row": 0,
                      "skipped_total": 0}}, "loss_scaler.good_steps"),
])
def test_implausible_metadata_is_named(changes, culprit, tmp_path):
    run = empty_run(tmp_path / "run")
    path = save_step(run, 3, changes=changes)
    with pytest.raises(CheckpointError, match=culprit) as raised:
        read_checkpoint_meta(path)
    assert str(path) in str(raised.value)


def test_a_negative_second_moment_is_damage(tmp_path):
    params, optim, meta = tiny_state(step=0)
    optim["v"][5] = -1.0
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, params, optim, meta)
    with pytest.raises(CheckpointError, match="v holds negative"):
        load_checkpoint(path, SHAPES, {"m": N, "v": N})


@pytest.mark.parametrize("changes, key", [
    ({"position": -1}, "position"), ({"epoch": -5}, "epoch"), ({"seed": -1}, "seed"),
    ({"position": 10**6}, "position"), ({"sampler": "other"}, "sampler"),
    ({"tokens": "many"}, "tokens"), ({"token_dropout": 1.5}, "token_dropout"),
    ({"random_crop": "yes"}, "random_crop"),
])
def test_sampler_states_no_sampler_could_write_are_refused(changes, key):
    state = {"sampler": "epoch", "batch_size": 4, "block_size": 16, "tokens": 1000,
             "token_dropout": 0.0, "token_dropout_mode": "random", "random_crop": False,
             "seed": 1, "epoch": 2, "position": 3}
    check_sampler_state(state)
    with pytest.raises(SamplerStateError) as raised:
        check_sampler_state(dict(state, **changes))
    assert raised.value.key == key


def test_a_damaged_sampler_state_falls_back_to_the_checkpoint_before(run_copy, capsys):
    meta = read_checkpoint_meta(run_copy.step_path(30))
    rewrite_meta(run_copy.step_path(30), sampler=dict(meta["sampler"], position=-1, epoch=-5, seed=-1))
    code, out, err = run_cli(capsys, "train", "--resume", run_copy.path, "train.max_iters=30")
    assert code == 0, err
    assert "skipping checkpoint" in out and "sampler." in out and "at step 20" in out


def test_a_step_that_disagrees_with_the_file_name_falls_back(run_copy, capsys):
    rewrite_meta(run_copy.step_path(30), step=31)
    code, out, err = run_cli(capsys, "train", "--resume", run_copy.path, "train.max_iters=30")
    assert code == 0, err
    assert "step must be 30" in out and "at step 20" in out


def test_a_count_too_large_for_any_run_falls_back_and_runs_still_lists_it(run_copy, capsys):
    rewrite_meta(run_copy.step_path(30), tokens_seen=10**400)
    code, out, err = run_cli(capsys, "runs", run_copy.path)
    assert code == 0, err
    assert run_copy.path.name in out
    code, out, err = run_cli(capsys, "train", "--resume", run_copy.path, "train.max_iters=30")
    assert code == 0, err
    assert "tokens_seen must be an integer" in out and "at step 20" in out


# ---- 8: the data a run trained on ---------------------------------------------------

def test_a_corpus_that_changed_since_the_checkpoint_is_refused(run_copy, capsys):
    corpus = run_copy.path.parent / "corpus.txt"
    assert read_checkpoint_meta(run_copy.step_path(30))["data_fingerprint"]
    text = corpus.read_text()
    corpus.write_text(text.replace("king", "kinf", 1))   # same length, other tokens
    code, _, err = run_cli(capsys, "train", "--resume", run_copy.path, "train.max_iters=35")
    assert code == 1
    assert_one_line_error(err)
    assert "training data changed" in err and "--init-from" in err
    assert run_copy.checkpoint_steps() == [20, 30]


def test_an_unchanged_corpus_touched_since_still_resumes(run_copy, capsys):
    corpus = run_copy.path.parent / "corpus.txt"
    os.utime(corpus, (1, 1))
    code, out, err = run_cli(capsys, "train", "--resume", run_copy.path, "train.max_iters=32")
    assert code == 0, err
    assert "at step 30" in out


def test_a_checkpoint_from_before_the_data_fingerprint_resumes_or_names_the_change(run_copy, capsys):
    for step in (20, 30):
        rewrite_meta(run_copy.step_path(step), data_fingerprint=None)
    assert "data_fingerprint" not in read_checkpoint_meta(run_copy.step_path(30))
    backup = run_copy.path.parent.parent / "backup"
    shutil.copytree(run_copy.path, backup)
    code, out, err = run_cli(capsys, "train", "--resume", run_copy.path, "train.max_iters=32")
    assert code == 0, err
    assert "at step 30" in out
    shutil.rmtree(run_copy.path)
    shutil.copytree(backup, run_copy.path)
    corpus = run_copy.path.parent / "corpus.txt"
    corpus.write_text(corpus.read_text() + "More words at the end of the corpus.\n" * 20)
    code, _, err = run_cli(capsys, "train", "--resume", run_copy.path, "train.max_iters=35")
    assert code == 1
    assert_one_line_error(err)
    assert "training data changed" in err


# ---- 9: the save on a signal ---------------------------------------------------------

def test_a_signal_saves_over_a_stale_file_of_the_same_step(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    trainer = Trainer.start(tiny_config(corpus, tmp_path), device="cpu", out=tmp_path / "run",
                            show=False)
    stale = trainer.run_dir.step_path(3)   # an xpmodel checkpoint cut short in its tensors
    stale.write_bytes(trainer.run_dir.step_path(0).read_bytes()[:-100])
    real_step = trainer._train_step

    def step_then_signal():
        if trainer.step == 2:
            trainer._stop_signal = signal.SIGINT
        return real_step()

    trainer._train_step = step_then_signal
    with pytest.raises(Interrupted) as interrupt:
        trainer.run()
    assert interrupt.value.step == 3 and interrupt.value.checkpoint == stale
    assert read_checkpoint_meta(stale)["step"] == 3



def test_a_run_saved_by_two_ranks_says_how_to_resume_it(run_copy, capsys):
    for step in (20, 30):
        rewrite_meta(run_copy.step_path(step), world_size=2)
    code, _, err = run_cli(capsys, "train", "--resume", run_copy.path, "train.max_iters=40")
    assert code == 1
    assert_one_line_error(err)
    assert "saved by 2 ranks, resumed with 1; resume with mpirun -n 2" in err

# ---- 10: sample and eval name what they skip ----------------------------------------

@pytest.mark.parametrize("command", [["sample", "--max-new-tokens", "3"], ["eval", "--batches", "1"]])
def test_sample_and_eval_name_a_skipped_checkpoint(command, run_copy, capsys):
    os.truncate(run_copy.step_path(30), 5000)
    code, _, err = run_cli(capsys, command[0], run_copy.path, *command[1:])
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: skipping checkpoint")
    assert "step-00000030.safetensors" in lines[0] and "using step-00000020" in lines[0]


def test_checkpoint_best_without_a_best_file_says_what_it_uses(run_copy, capsys):
    if os.path.lexists(run_copy.best_path):
        os.unlink(run_copy.best_path)
    code, _, err = run_cli(capsys, "eval", run_copy.path, "--checkpoint", "best", "--batches", "1")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "best.safetensors: no such file" in lines[0]
    assert lines[0].endswith(f"using {run_copy.step_path(30).name}")


def test_a_fallback_to_the_step_0_checkpoint_says_its_weights_are_untrained(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = Trainer.start(tiny_config(corpus, tmp_path), device="cpu", out=tmp_path / "run",
                        show=False).run_dir                       # created, never trained
    code, _, err = run_cli(capsys, "eval", run.path, "--checkpoint", "best", "--batches", "1")
    assert code == 0, err
    assert err.strip().endswith("using step-00000000.safetensors (the untrained weights)")


# ---- 11: best.safetensors after a fallback -------------------------------------------

def test_a_fallback_resume_does_not_replace_best_with_a_worse_model(run_copy, capsys):
    best_before = run_copy.best_path.read_bytes()
    best_val = read_checkpoint_meta(run_copy.best_path)["best_val"]
    assert read_checkpoint_meta(run_copy.best_path)["step"] == 30
    fallback_best = read_checkpoint_meta(run_copy.step_path(20))["best_val"]
    os.truncate(run_copy.step_path(30), 5000)
    code, out, err = run_cli(capsys, "train", "--resume", run_copy.path, "train.max_iters=30",
                             "train.lr=3e-4", "train.min_lr=3e-5")
    assert code == 0, err
    assert "at step 20" in out
    val = [r["val_loss"] for r in run_copy.read_metrics() if r["type"] == "eval" and r["step"] == 30]
    assert best_val < val[-1] < fallback_best    # better than step 20, worse than the file
    assert run_copy.best_path.read_bytes() == best_before

