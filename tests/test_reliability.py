"""Crash safety, signals, bad inputs and numeric faults.

- kill -9 at random moments (some inside checkpoint writes) and resume until
  done: the losses equal an uninterrupted run's bit for bit;
- SIGINT / SIGTERM / SIGHUP save a checkpoint and exit 130 / 143 / 129; a second Ctrl-C
  leaves at once and leaves nothing half-written;
- every foreseen bad input is one `error:` line with exit 2 (usage, config)
  or 1 (runtime), and leaves no stray files;
- NaN/Inf in fp32 stops the run without touching the last good checkpoint;
  fp16 overflow skips the step and lowers the loss scale.
"""
import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy
import pytest
from safetensors.numpy import save_file

from cli_helpers import assert_one_line_error, run_cli, write_corpus
import xpmodel
from xpmodel.backend import cuda_available
from xpmodel.train.checkpoint import load_checkpoint, read_checkpoint_meta
from xpmodel.config import load_config
from xpmodel.errors import XpmodelError
from xpmodel.model.gpt import GPTConfig
from xpmodel.model.params import parameter_shapes
from xpmodel.train.rundir import RunDir
from xpmodel.train import Trainer

TINY = Path(__file__).resolve().parent / "tiny-run.yaml"
TINY_GPT = GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16)


def process_env(cache, **extra):
    return dict(os.environ, XPMODEL_CACHE=str(cache), OPENBLAS_NUM_THREADS="1",
                OMP_NUM_THREADS="1", **extra)


def command(*args):
    return [sys.executable, "-m", "xpmodel.cli.main", *map(str, args)]


def stray_files(root):
    """Temporary files xpmodel writes and renames, left anywhere below root."""
    return [p for p in Path(root).rglob("*")
            if (p.name.startswith(".") and ".tmp" in p.name) or p.name.endswith(".partial")]


def train_losses(run_dir):
    records = RunDir(run_dir).read_metrics()
    return ([(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in records if r["type"] == "train"],
            [(r["step"], r["val_loss"]) for r in records if r["type"] == "eval"])


def full_load(path):
    """Read every tensor of a checkpoint of the tiny model."""
    n = TINY_GPT.num_params()
    return load_checkpoint(path, dict(parameter_shapes(TINY_GPT)), {"m": n, "v": n})


def checkpoint_step(path):
    return int(Path(path).stem.split("-")[1])


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def processes():
    """Popen objects to kill at teardown, should a test fail while they run."""
    started = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def tiny_config(corpus, *overrides):
    return load_config(TINY, [f"data.source={corpus}", *overrides])


# ---- kill -9 ------------------------------------------------------------------------

KILL_SETTINGS = ["train.max_iters=240", "train.save_interval=3", "train.eval_interval=6",
                 "train.keep_last=2", "train.log_interval=50"]


def _wait(process, condition, timeout=30.0):
    """Poll until condition() holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if condition():
            return True
        time.sleep(0.001)
    raise AssertionError("the training process made no progress")


def _line_count(path):
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _step_temporaries(folder):
    try:
        return {name for name in os.listdir(folder) if name.startswith(".step-") and ".tmp" in name}
    except FileNotFoundError:
        return set()


def _train_reference(start_args, out, env):
    done = subprocess.run(command(*start_args, "--out", out), env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _launch(run, start_args, env, log, processes):
    """Start the run (or resume it, once it exists) in the background;
    returns the process and the metrics lines written before it."""
    args = ["train", "--resume", run.path] if run.is_run() else [*start_args, "--out", run.path]
    lines_before = _line_count(run.metrics_path)
    with open(log, "a") as err:
        process = subprocess.Popen(command(*args), env=env, stdout=subprocess.DEVNULL, stderr=err)
    processes.append(process)
    return process, lines_before


def _finish_like_the_reference(run, start_args, env, reference, steps):
    """Resume the killed run to its end: every step's loss and every evaluation
    equal the uninterrupted reference's bit for bit (floats compared with ==)."""
    args = ["train", "--resume", run.path] if run.is_run() else [*start_args, "--out", run.path]
    finished = subprocess.run(command(*args), env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    killed_train, killed_eval = train_losses(run.path)
    reference_train, reference_eval = train_losses(reference)
    assert [s for s, *_ in killed_train] == list(range(1, steps + 1))
    assert killed_train == reference_train
    assert killed_eval == reference_eval
    assert not stray_files(run.path)
    return finished


def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, corpus,
                                                                          processes):
    cache = tmp_path / "cache"
    env = process_env(cache)
    reference = tmp_path / "reference"
    start_args = ["train", "--config", TINY, "--device", "cpu", f"data.source={corpus}", *KILL_SETTINGS]
    _train_reference(start_args, reference, env)

    run_dir = tmp_path / "killed"
    run = RunDir(run_dir)
    checkpoints = run_dir / "checkpoints"
    slow_env = process_env(cache, XPMODEL_TEST_SLOW_SAVE="0.02")
    rng = random.Random(20240611)
    kills, kills_mid_save, kills_before_marker, attempts = 0, 0, 0, 0
    log = tmp_path / "stderr.log"
    while kills < 24:
        attempts += 1
        assert attempts < 80, "the run does not progress between kills"
        process, lines_before = _launch(run, start_args, slow_env, log, processes)
        mode = rng.choice(["startup", "steps", "steps", "save", "save"])
        if attempts <= 2:   # first inside the creation of the run directory
            mode = "create"
        if mode == "create":
            alive = _wait(process, lambda: (run_dir / "config.yaml").exists() if attempts == 1
                          else bool(_step_temporaries(checkpoints)))
        elif mode == "startup":
            time.sleep(rng.uniform(0.05, 0.8))
            alive = process.poll() is None
        elif mode == "steps":
            wanted = lines_before + rng.randint(2, 14)
            alive = _wait(process, lambda: _line_count(run.metrics_path) >= wanted)
        else:
            nth, seen = rng.randint(1, 4), set()

            def nth_save_in_progress():
                seen.update(_step_temporaries(checkpoints))
                return len(seen) >= nth
            alive = _wait(process, nth_save_in_progress)
        process.kill()
        process.wait()
        if not alive:
            assert process.returncode in (0, -signal.SIGKILL), log.read_text()
            if process.returncode == 0:
                break   # it finished before the kill
        else:
            kills += 1
            kills_mid_save += bool(_step_temporaries(checkpoints))
            kills_before_marker += not run.is_run()

        # The invariant: a run directory always holds a loadable checkpoint, at
        # most save_interval steps behind what the metrics say was trained.
        if run.is_run():
            latest, _ = run.latest_checkpoint()
            assert latest is not None
            full_load(latest)
            logged = [r["step"] for r in run.read_metrics() if r.get("type") == "train"]
            assert max(logged, default=0) - checkpoint_step(latest) <= 3

    assert kills >= 20, f"only {kills} kills landed"
    assert kills_mid_save >= 3, f"only {kills_mid_save} kills landed inside a checkpoint write"
    assert kills_before_marker >= 2, "no kill landed while the run directory was being created"
    finished = _finish_like_the_reference(run, start_args, env, reference, steps=240)
    assert "done (finished): 240 steps" in finished.stdout
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "best.safetensors", "step-00000237.safetensors", "step-00000240.safetensors"]


def test_kill_9_during_a_muon_run_then_resume_equals_an_uninterrupted_run(tmp_path, corpus,
                                                                           processes):
    """The same, shorter, with train.optimizer=muon: Muon's momentum and AdamW's
    moments of the other parameters come back from each checkpoint exactly."""
    from xpmodel.train.muon import Muon
    env = process_env(tmp_path / "cache")
    start_args = ["train", "--config", TINY, "--device", "cpu", f"data.source={corpus}", *KILL_SETTINGS,
                  "train.max_iters=90", "train.optimizer=muon", "train.grad_accum=2"]
    reference = tmp_path / "reference"
    _train_reference(start_args, reference, env)
    sizes = Muon(xpmodel.GPT(TINY_GPT), lr=1e-3).state_sizes()

    run_dir = tmp_path / "killed"
    run = RunDir(run_dir)
    checkpoints = run_dir / "checkpoints"
    slow_env = process_env(tmp_path / "cache", XPMODEL_TEST_SLOW_SAVE="0.02")
    rng = random.Random(20250101)
    kills, kills_mid_save, attempts = 0, 0, 0
    log = tmp_path / "stderr.log"
    while kills < 8:
        attempts += 1
        assert attempts < 30, "the run does not progress between kills"
        process, lines_before = _launch(run, start_args, slow_env, log, processes)
        if rng.random() < 0.5:
            wanted = lines_before + rng.randint(2, 10)
            alive = _wait(process, lambda: _line_count(run.metrics_path) >= wanted)
        else:
            alive = _wait(process, lambda: bool(_step_temporaries(checkpoints)))
        process.kill()
        process.wait()
        if not alive:
            assert process.returncode in (0, -signal.SIGKILL), log.read_text()
            if process.returncode == 0:
                break
        else:
            kills += 1
            kills_mid_save += bool(_step_temporaries(checkpoints))
        if run.is_run():
            latest, _ = run.latest_checkpoint()
            _, _, optim = load_checkpoint(latest, dict(parameter_shapes(TINY_GPT)), sizes)
            assert set(optim) == {"m", "v", "muon_momentum"}

    assert kills >= 6 and kills_mid_save >= 1, (kills, kills_mid_save)
    _finish_like_the_reference(run, start_args, env, reference, steps=90)


# ---- signals ------------------------------------------------------------------------

def _start_long_run(tmp_path, corpus, processes, extra_env=None):
    run_dir = tmp_path / "run"
    env = process_env(tmp_path / "cache", **(extra_env or {}))
    process = subprocess.Popen(
        command("train", "--config", TINY, "--device", "cpu", "--out", run_dir,
                f"data.source={corpus}", "train.max_iters=100000", "train.save_interval=100000",
                "train.eval_interval=100000", "train.log_interval=1000"),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    processes.append(process)
    metrics = run_dir / "metrics.jsonl"
    assert _wait(process, lambda: _line_count(metrics) >= 20, timeout=60), process.communicate()
    return process, RunDir(run_dir)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                          (signal.SIGHUP, 129)])
def test_a_signal_saves_a_checkpoint_and_exits(signum, code, tmp_path, corpus, capsys, processes):
    process, run = _start_long_run(tmp_path, corpus, processes)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    step = max(r["step"] for r in run.read_metrics())
    saved = run.step_path(step)
    assert saved.is_file()
    assert f"stopped by {signal.Signals(signum).name} at step {step}" in err
    assert str(saved) in err and f"--resume {run.path}" in err
    assert "Traceback" not in err
    meta, params, _ = full_load(saved)
    assert meta["step"] == step
    assert not stray_files(run.path)
    if signum == signal.SIGINT:   # and it resumes from there
        code, out, err = run_cli(capsys, "train", "--resume", run.path,
                                 f"train.max_iters={step + 3}")
        assert code == 0, err
        assert f"at step {step}" in out
        steps = [r["step"] for r in run.read_metrics() if r["type"] == "train"]
        assert steps == list(range(1, step + 4))


def test_a_second_ctrl_c_leaves_at_once_without_damage(tmp_path, corpus, processes):
    process, run = _start_long_run(tmp_path, corpus, processes, {"XPMODEL_TEST_SLOW_SAVE": "2"})
    process.send_signal(signal.SIGINT)
    # the first Ctrl-C starts the save, which now pauses before its rename
    assert _wait(process, lambda: bool(_step_temporaries(run.checkpoint_dir)), timeout=30)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert time.monotonic() - sent < 1.5
    assert process.returncode == 130
    assert "stopped at once by a second SIGINT; train --resume continues" in err
    assert not stray_files(run.path)
    latest, skipped = run.latest_checkpoint()
    assert latest == run.step_path(0) and not skipped
    full_load(latest)


# ---- bad inputs ---------------------------------------------------------------------

def _text(content):
    def setup(tmp_path, corpus):
        path = tmp_path / "data.txt"
        path.write_bytes(content)
        return [f"data.source={path}"]
    return setup


def _option(*overrides):
    return lambda tmp_path, corpus: [f"data.source={corpus}", *overrides]


def _yaml(text):
    def setup(tmp_path, corpus):
        path = tmp_path / "config.yaml"
        path.write_text(text)
        return ["--config", path, f"data.source={corpus}"]
    return setup


NEW_RUN_CASES = {
    "missing data": (lambda p, c: [f"data.source={p / 'absent.txt'}"], 2, "absent.txt"),
    "empty data": (_text(b""), 1, "empty"),
    "binary data": (_text(b"text\x00\x01\x02" * 100), 1, "binary"),
    "non-UTF-8 data": (_text("caf\u00e9 ".encode("latin-1") * 100), 1, "UTF-8"),
    "corpus shorter than a block": (_text(b"tiny"), 1, "block_size + 1"),
    "empty validation split": (_option("data.val_fraction=0.0001"), 1, "validation split"),
    "invalid YAML": (_yaml("model: {n_layer: 2\n"), 2, "invalid YAML"),
    "unknown key": (_option("train.learning_rate=0.1"), 2, "train.learning_rate"),
    "unknown key in YAML": (_yaml("train:\n  max_iter: 5\n"), 2, "max_iter"),
    "wrong type": (_option("train.batch_size=four"), 2, "train.batch_size"),
    "zero layers": (_option("model.n_layer=0"), 2, "model.n_layer"),
    "negative batch": (_option("train.batch_size=-4"), 2, "train.batch_size"),
    "zero learning rate": (_option("train.lr=0"), 2, "train.lr"),
    "negative learning rate": (_option("train.lr=-0.1"), 2, "train.lr"),
    "zero eval interval": (_option("train.eval_interval=0"), 2, "train.eval_interval"),
    "zero save interval": (_option("train.save_interval=0"), 2, "train.save_interval"),
    "zero max_iters": (_option("train.max_iters=0"), 2, "train.max_iters"),
    "n_embd not divisible by n_head": (_option("model.n_head=3"), 2, "divisible"),
    "vocab too large for a token file": (_option("data.tokenizer=bpe", "data.vocab_size=5000000000"),
                                         2, "token file"),
    "vocab too large for memory": (_option("model.vocab_size=4000000000"), 2, "model.vocab_size"),
    "vocab smaller than the tokenizer's": (_option("model.vocab_size=256"), 2, "model.vocab_size"),
    "cuda without CuPy": (lambda p, c: [f"data.source={c}", "--device", "cuda"], 2, "pip install"),
}


@pytest.mark.parametrize("case", list(NEW_RUN_CASES))
def test_bad_input_for_a_new_run(case, tmp_path, corpus, capsys):
    setup, code, culprit = NEW_RUN_CASES[case]
    if case == "cuda without CuPy" and cuda_available():
        pytest.skip("this machine has CuPy and a GPU")
    args = setup(tmp_path, corpus)
    if "--config" not in args:
        args = ["--config", TINY, *args]
    if "--device" not in args:
        args = ["--device", "cpu", *args]
    exit_code, out, err = run_cli(capsys, "train", "--out", tmp_path / "run", *args)
    assert exit_code == code, err
    assert_one_line_error(err)
    assert culprit in err
    assert not (tmp_path / "run").exists()
    assert not stray_files(tmp_path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 30-step run (checkpoints at steps 20 and 30), made in this process."""
    root = tmp_path_factory.mktemp("finished")
    corpus = write_corpus(root / "corpus.txt")
    config = load_config(TINY, [f"data.source={corpus}", f"data.cache_dir={root / 'cache'}"])
    Trainer.start(config, device="cpu", out=root / "run", show=False).run()
    return root / "run"


def _damage_checkpoints(how):
    def setup(run):
        for path in run.checkpoint_dir.glob("*.safetensors"):
            how(path)
    return setup


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _poison_data(path):
    data = bytearray(path.read_bytes())
    data[-4096:] = b"\xff" * 4096   # NaN bit patterns over the last tensors
    path.write_bytes(bytes(data))


def _corrupt_header(path):
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32
    path.write_bytes(bytes(data))


def _newer_format(path):
    meta, params, optim = full_load(path)
    meta["format_version"] = 99
    tensors = {f"param/{k}": v for k, v in params.items()}
    tensors.update({f"optim/{k}": v for k, v in optim.items()})
    save_file(tensors, str(path), metadata={"xpmodel": json.dumps(meta)})


def _edit_config(run):
    text = run.config_path.read_text().replace("n_embd: 16", "n_embd: 32")
    run.config_path.write_text(text)


def _remove_checkpoints(run):
    for path in run.checkpoint_dir.iterdir():
        path.unlink()


RESUME_CASES = {
    "missing checkpoints": (_remove_checkpoints, 1, "no checkpoint"),
    "truncated checkpoints": (_damage_checkpoints(_truncate), 1, "truncated"),
    "corrupted header": (_damage_checkpoints(_corrupt_header), 1, "corrupt"),
    "corrupted tensors": (_damage_checkpoints(_poison_data), 1, "NaN or Inf"),
    "incompatible config": (_edit_config, 1, "config"),
    "newer format version": (_damage_checkpoints(_newer_format), 1, "newer"),
    "corrupted tokenizer": (lambda run: run.tokenizer_path.write_text('{"format": '), 1,
                            "tokenizer"),
    "corrupted run marker": (lambda run: run.marker.write_text("{"), 1, "run.json"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
@pytest.mark.parametrize("command_name", ["train", "sample", "eval"])
def test_bad_run_directory(case, command_name, finished_run, tmp_path, capsys):
    damage, code, culprit = RESUME_CASES[case]
    run = RunDir(tmp_path / "run")
    shutil.copytree(finished_run, run.path)
    damage(run)
    if command_name == "train":
        args = ["train", "--resume", run.path, "train.max_iters=35"]
    elif command_name == "sample":
        args = ["sample", run.path, "--max-new-tokens", 5]
    else:
        args = ["eval", run.path, "--batches", 1]
    if case == "incompatible config" and command_name != "train":
        culprit = "the config does not match the checkpoint"
    exit_code, out, err = run_cli(capsys, *args)
    assert exit_code == code, err
    assert_one_line_error(err)
    assert culprit in err
    assert not stray_files(run.path)


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(finished_run, tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    shutil.copytree(finished_run, run.path)
    _truncate(run.step_path(30))
    code, out, err = run_cli(capsys, "train", "--resume", run.path)
    assert code == 0, err
    assert "skipping checkpoint" in out and "resumed" in out and "at step 20" in out
    model, _ = xpmodel.load(run.path)
    assert model.config == TINY_GPT


def test_a_removed_best_checkpoint_is_named_without_blaming_the_run(finished_run, tmp_path,
                                                                     capsys):
    """The run recorded validation losses; its best.safetensors was removed."""
    run = RunDir(tmp_path / "run")
    shutil.copytree(finished_run, run.path)
    run.best_path.unlink()
    code, _, err = run_cli(capsys, "eval", run.path, "--checkpoint", "best", "--batches", "1")
    assert code == 0, err
    assert f"{run.best_path}: no such file (a run writes it at its first evaluation)" in err
    assert "recorded no validation loss" not in err


@pytest.fixture(scope="module")
def wider_checkpoint(finished_run, tmp_path_factory):
    return _checkpoint_trained_with("model.n_embd=32", finished_run, tmp_path_factory)


def _checkpoint_trained_with(override, finished_run, tmp_path_factory):
    """The step-40 checkpoint of the tiny model trained with `override` on finished_run's corpus."""
    root = tmp_path_factory.mktemp("other")
    corpus = finished_run.parent / "corpus.txt"
    config = load_config(TINY, [f"data.source={corpus}", f"data.cache_dir={root / 'cache'}",
                                override, "train.max_iters=40", "train.save_interval=40"])
    Trainer.start(config, device="cpu", out=root / "run", show=False).run()
    return RunDir(root / "run").step_path(40)


def _resume_with_a_copied_checkpoint(finished_run, checkpoint, tmp_path, capsys):
    """A copy of finished_run (checkpoints at steps 20 and 30) with `checkpoint`
    copied in as its step 40, resumed to step 35: (its RunDir, the resume's stdout)."""
    run = RunDir(tmp_path / "run")
    shutil.copytree(finished_run, run.path)
    shutil.copy(checkpoint, run.step_path(40))
    code, out, err = run_cli(capsys, "train", "--resume", run.path, "train.max_iters=35")
    assert code == 0, err
    return run, out


def test_resume_skips_a_checkpoint_copied_from_another_model(finished_run, wider_checkpoint,
                                                              tmp_path, capsys):
    run, out = _resume_with_a_copied_checkpoint(finished_run, wider_checkpoint, tmp_path, capsys)
    assert f"skipping checkpoint: {run.step_path(40)}: trained with model.n_embd=32" in out
    assert "using step-00000030.safetensors" in out and "at step 30" in out
    assert run.checkpoint_steps() == [30, 35, 40]
    assert xpmodel.load(run.path)[0].config == TINY_GPT      # sample and eval skip it too
    assert "; using step-00000035.safetensors" in capsys.readouterr().err
    for path in (run.step_path(30), run.step_path(35)):   # none of the run's own left
        path.unlink()
    code, _, err = run_cli(capsys, "train", "--resume", run.path, "train.max_iters=45")
    assert code == 1
    assert_one_line_error(err)
    assert "config.yaml: model.n_embd is 16, but step-00000040.safetensors was trained with 32" in err
    assert "move away checkpoints copied from another run" in err


def _set_rope_theta(run, value):
    text = run.config_path.read_text()
    assert "rope_theta: 10000.0\n" in text
    run.config_path.write_text(text.replace("rope_theta: 10000.0\n", f"rope_theta: {value}\n"))


def test_a_changed_rope_theta_resumes_a_learned_position_run_it_does_not_change(finished_run,
                                                                               tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    shutil.copytree(finished_run, run.path)
    _set_rope_theta(run, 500000.0)            # read only by rotary positions
    code, out, err = run_cli(capsys, "train", "--resume", run.path, "train.max_iters=35")
    assert code == 0, err
    assert "skipping checkpoint" not in out and "at step 30" in out
    assert run.checkpoint_steps() == [30, 35]      # step 30 still counted as the run's own
    assert xpmodel.load(run.path)[0].config == TINY_GPT


def test_a_changed_rope_theta_of_a_rope_run_is_refused_on_resume(tmp_path, corpus, capsys):
    config = tiny_config(corpus, "model.position=rope", "train.max_iters=10")
    Trainer.start(config, device="cpu", out=tmp_path / "run", show=False).run()
    run = RunDir(tmp_path / "run")
    _set_rope_theta(run, 500000.0)
    code, _, err = run_cli(capsys, "train", "--resume", run.path, "train.max_iters=15")
    assert code == 1
    assert_one_line_error(err)
    assert ("config.yaml: model.rope_theta is 500000.0, but step-00000010.safetensors was "
            "trained with 10000.0") in err


def test_resume_with_another_optimizer_is_one_line_naming_the_saved_one(finished_run, tmp_path,
                                                                        capsys):
    run = RunDir(tmp_path / "run")
    shutil.copytree(finished_run, run.path)
    _truncate(run.step_path(30))   # a damaged newest checkpoint does not hide the reason
    config = run.config_path.read_bytes()
    code, out, err = run_cli(capsys, "train", "--resume", run.path, "train.optimizer=muon")
    assert code == 2 and out == ""
    assert err.strip() == (f"error: --resume {run.path}: its checkpoints were saved with "
                           f"train.optimizer=adamw; resume with that optimizer (or start a new "
                           f"run with --init-from {run.path})")
    assert run.config_path.read_bytes() == config


@pytest.fixture(scope="module")
def muon_checkpoint(finished_run, tmp_path_factory):
    return _checkpoint_trained_with("train.optimizer=muon", finished_run, tmp_path_factory)


def test_resume_skips_a_checkpoint_copied_from_a_run_of_another_optimizer(finished_run,
                                                                         muon_checkpoint,
                                                                         tmp_path, capsys):
    run, out = _resume_with_a_copied_checkpoint(finished_run, muon_checkpoint, tmp_path, capsys)
    assert (f"skipping checkpoint: {run.step_path(40)}: saved with train.optimizer=muon, "
            f"resumed with adamw") in out
    assert "at step 30" in out


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    for path in (tmp_path, tmp_path / "absent"):
        code, _, err = run_cli(capsys, "train", "--resume", path)
        assert code == 2
        assert_one_line_error(err)
        assert str(path) in err


def test_an_output_folder_with_another_run_needs_overwrite(finished_run, tmp_path, corpus, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    args = ["train", "--config", TINY, "--device", "cpu", "--out", run, f"data.source={corpus}",
            "train.max_iters=10"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert_one_line_error(err)
    assert "--overwrite" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    code, _, err = run_cli(capsys, *args, "--overwrite")
    assert code == 0, err
    assert max(r["step"] for r in RunDir(run).read_metrics()) == 10


def test_an_output_folder_with_other_files_is_refused(tmp_path, corpus, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("important")
    code, _, err = run_cli(capsys, "train", "--config", TINY, "--device", "cpu", "--out",
                           tmp_path / "out", f"data.source={corpus}")
    assert code == 2
    assert_one_line_error(err)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["thesis.tex"]


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, corpus, capsys,
                                                                 monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith(".step-") and int(name[len(".step-"):][:8]) >= 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run = RunDir(tmp_path / "run")
    code, _, err = run_cli(capsys, "train", "--config", TINY, "--device", "cpu", "--out", run.path,
                           f"data.source={corpus}")
    assert code == 1
    assert_one_line_error(err)
    assert "No space left on device" in err and "step-00000020" in err
    assert not stray_files(tmp_path)
    latest, _ = run.latest_checkpoint()
    assert latest == run.step_path(10)
    meta, params, _ = full_load(latest)
    assert meta["step"] == 10
    monkeypatch.setattr(os, "fsync", real_fsync)
    code, out, err = run_cli(capsys, "train", "--resume", run.path)
    assert code == 0, err
    assert [r["step"] for r in run.read_metrics() if r["type"] == "train"] == list(range(1, 31))


# ---- numeric faults ----------------------------------------------------------------

def _inject(trainer, at_steps, what):
    """Make the forward/backward of the given (1-based) steps produce `what`."""
    model = trainer.model
    forward_backward = model.forward_backward

    def faulty(x, y, scale=1.0):
        loss = forward_backward(x, y, scale=scale)
        if trainer.step + 1 in at_steps:
            if what == "nan loss":
                return loss * float("nan")
            model.flat_grads[7] = float("inf") if what == "inf grad" else float("nan")
        return loss

    model.forward_backward = faulty


@pytest.mark.parametrize("fault", ["nan loss", "inf grad", "nan grad"])
def test_fp32_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(fault, tmp_path,
                                                                                corpus):
    config = tiny_config(corpus, "train.save_interval=5", "train.eval_interval=5")
    trainer = Trainer.start(config, device="cpu", out=tmp_path / "run", show=False)
    _inject(trainer, {13}, fault)
    with pytest.raises(XpmodelError) as failure:
        trainer.run()
    message = str(failure.value)
    assert message.startswith("step 13: ") and "diverged" in message
    assert "step 10" in message   # where the last good checkpoint is
    assert trainer.step == 12
    assert numpy.isfinite(trainer.model.flat_params).all()   # the bad step was not applied
    run = trainer.run_dir
    assert run.checkpoint_steps() == [5, 10]
    for path in (run.step_path(10), run.best_path):
        meta, params, optim = full_load(path)
        assert all(numpy.isfinite(v).all() for v in params.values())
        assert meta["step"] in (5, 10)
    assert read_checkpoint_meta(run.step_path(10))["step"] == 10


def test_weights_that_went_non_finite_are_never_saved(tmp_path, corpus):
    trainer = Trainer.start(tiny_config(corpus), device="cpu", out=tmp_path / "run", show=False)
    before = trainer.run_dir.step_path(0).read_bytes()
    trainer.model.flat_params[3] = float("nan")
    with pytest.raises(XpmodelError, match="NaN or Inf"):
        trainer.save(trainer.run_dir.step_path(0))
    assert trainer.run_dir.step_path(0).read_bytes() == before
    assert not stray_files(tmp_path)


def test_huge_but_finite_weights_are_saved_without_a_warning(tmp_path, corpus):
    """Their square sum overflows float32; the weights themselves are finite."""
    trainer = Trainer.start(tiny_config(corpus), device="cpu", out=tmp_path / "run", show=False)
    trainer.model.flat_params[3] = 1e30
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.save(trainer.run_dir.step_path(0))
    assert read_checkpoint_meta(trainer.run_dir.step_path(0))["step"] == 0


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(tmp_path, corpus):
    config = tiny_config(corpus, "train.precision=fp16", "train.max_iters=20",
                         "train.save_interval=20", "train.eval_interval=20")
    trainer = Trainer.start(config, device="cpu", out=tmp_path / "run", show=False)
    trainer.scaler.growth_interval = 6
    start_scale = trainer.scaler.scale
    _inject(trainer, {4, 5}, "inf grad")
    trainer.run()
    records = [r for r in trainer.run_dir.read_metrics() if r["type"] == "train"]
    skipped = [r["step"] for r in records if r["skipped"]]
    assert skipped == [4, 5]
    scales = {r["step"]: r["loss_scale"] for r in records}
    assert scales[3] == start_scale
    assert scales[4] == start_scale / 2 and scales[5] == start_scale / 4
    assert scales[11] == start_scale / 2     # six good steps in a row double it again
    assert scales[17] == start_scale
    assert trainer.optimizer.step_count == 18
    assert all(r["grad_norm"] is None for r in records if r["skipped"])
    assert all(math.isfinite(r["loss"]) for r in records)
    state = read_checkpoint_meta(trainer.run_dir.step_path(20))["loss_scaler"]
    assert state == trainer.scaler.state_dict() and state["skipped_total"] == 2

    # the scaler's state comes back on resume
    resumed = Trainer.resume(trainer.run_dir.path, device="cpu", show=False)
    assert resumed.scaler.state_dict() == state


def test_fp16_a_long_streak_of_overflows_stops_the_run(tmp_path, corpus):
    config = tiny_config(corpus, "train.precision=fp16", "train.max_iters=40",
                         "train.save_interval=5", "train.eval_interval=5")
    trainer = Trainer.start(config, device="cpu", out=tmp_path / "run", show=False)
    trainer.scaler.max_skipped_in_a_row = 8
    _inject(trainer, set(range(12, 41)), "inf grad")
    with pytest.raises(XpmodelError, match="step 19: 8 steps in a row overflowed"):
        trainer.run()
    assert trainer.step == 18
    latest, _ = trainer.run_dir.latest_checkpoint()
    meta, params, _ = full_load(latest)
    assert meta["step"] == 15 and meta["loss_scaler"]["skipped_in_a_row"] == 4
    assert all(numpy.isfinite(v).all() for v in params.values())


def test_fp16_resumed_run_repeats_an_uninterrupted_one(tmp_path, corpus):
    config = tiny_config(corpus, "train.precision=fp16", "train.max_iters=16",
                         "train.save_interval=4", "train.eval_interval=8")
    whole = Trainer.start(config, device="cpu", out=tmp_path / "whole", show=False)
    _inject(whole, {6}, "inf grad")
    whole.run()
    first = Trainer.start(config, device="cpu", out=tmp_path / "parts", show=False)
    _inject(first, {6}, "inf grad")
    first.total_steps = 9        # stops after step 9; the last checkpoint is step 8
    first.run()
    second = Trainer.resume(tmp_path / "parts", device="cpu", show=False)
    assert second.step == 9
    second.run()
    assert train_losses(tmp_path / "parts")[0] == train_losses(tmp_path / "whole")[0]


def test_steps_queued_between_log_lines_are_all_recorded(tmp_path, corpus):
    config = tiny_config(corpus, "train.max_iters=12", "train.log_interval=5",
                         "train.eval_interval=12", "train.save_interval=12")
    trainer = Trainer.start(config, device="cpu", out=tmp_path / "run", show=False)
    trainer.defer_reads = True   # as on a GPU: results read at log, eval and save steps
    reads = []
    read_back = trainer._read_back
    trainer._read_back = lambda pending: reads.append([s for s, _, _ in pending]) or read_back(pending)
    trainer.run()
    assert reads == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12]]
    records = [r for r in trainer.run_dir.read_metrics() if r["type"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)


def test_a_diverged_step_found_at_a_later_read_is_reported_by_its_number(tmp_path, corpus):
    config = tiny_config(corpus, "train.log_interval=5", "train.save_interval=5",
                         "train.eval_interval=5")
    trainer = Trainer.start(config, device="cpu", out=tmp_path / "run", show=False)
    trainer.defer_reads = True
    _inject(trainer, {13}, "nan grad")
    with pytest.raises(XpmodelError) as failure:
        trainer.run()
    assert str(failure.value).startswith("step 13: ") and "diverged" in str(failure.value)
    assert trainer.step == 14                                 # read back at step 15
    assert numpy.isfinite(trainer.model.flat_params).all()   # step 13 was not applied
    assert trainer.run_dir.checkpoint_steps() == [5, 10]


def test_resuming_a_finished_run_prunes_what_its_killed_process_left(finished_run, tmp_path,
                                                                    capsys):
    # killed between writing its last checkpoint and pruning, it left one more
    # than keep_last: as the 2 left here are for keep_last=1
    run = RunDir(tmp_path / "run")
    shutil.copytree(finished_run, run.path)
    code, out, err = run_cli(capsys, "train", "--resume", run.path, "train.keep_last=1")
    assert code == 0, err
    assert "already reached step 30" in out
    assert run.checkpoint_steps() == [30]


def test_a_resume_with_another_cpu_shard_count_says_it_is_not_bit_for_bit(finished_run, tmp_path,
                                                                         capsys, monkeypatch):
    run = RunDir(tmp_path / "run")
    shutil.copytree(finished_run, run.path)
    saved = read_checkpoint_meta(run.step_path(30))["shards"]
    monkeypatch.setenv("XPMODEL_NUM_THREADS", str(saved))
    code, out, err = run_cli(capsys, "train", "--resume", run.path, "train.max_iters=35")
    assert code == 0, err
    assert "not bit for bit" not in out
    other = 1 if saved != 1 else 2          # the tiny run's batch of 4 has room for either
    monkeypatch.setenv("XPMODEL_NUM_THREADS", str(other))
    code, out, err = run_cli(capsys, "train", "--resume", run.path, "train.max_iters=40")
    assert code == 0, err
    assert (f"note: this run split each batch into {saved} CPU shards (one per thread) and now "
            f"splits it into {other}; it resumes, but not bit for bit: set "
            f"XPMODEL_NUM_THREADS={saved} for that") in out
    assert read_checkpoint_meta(run.step_path(40))["shards"] == other
