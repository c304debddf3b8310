"""`xpmodel sweep --sampler tpe` on tiny trials: a TPE sweep with a pruned
trial, resumed after kill -9 from its SQLite study; two processes sharing one
study; the one-line errors when Optuna is absent or an option needs it."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, kill_sweep_mid_trial, run_cli

TINY = Path(__file__).resolve().parent / "tiny-run.yaml"


pytestmark = pytest.mark.usefixtures("private_cache")   # corpus: conftest.py


def study_of(out):
    import optuna
    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")


def states(out):
    return [t.state.name for t in study_of(out).get_trials(deepcopy=False)]


def states_in(database, study_name):
    import optuna
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{database}")
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def sweep_process(args):
    env = dict(os.environ, XPMODEL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "xpmodel", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_tpe_sweep_prunes_a_trial_and_resumes_after_kill_9(capsys, tmp_path, corpus):
    pytest.importorskip("optuna")
    from xpmodel.train.rundir import RunDir
    from xpmodel.tune.preset import open_sweep
    out = tmp_path / "sweep"
    specs = [f"data.source={corpus}", "train.eval_interval=50", "train.save_interval=50",
             "train.lr=log:1e-7..1e-1"]
    args = ["sweep", "--config", TINY, "--out", out, "--max-iters", 500, "--trials", 4,
            "--sampler", "tpe", *specs]
    # the study made as the command makes it, seeded with four known points
    # (Optuna's enqueue_trial) so that the third, lr 1e-6, is the hopeless one
    sweep = open_sweep(out, str(TINY), specs, sampler="tpe", trials=4, max_iters=500, show=False)
    for lr in (3e-3, 1e-2, 1e-6, 8e-3):
        sweep.study.enqueue_trial({"train.lr": lr})
    sweep.close()

    process = sweep_process(args)
    second = out / "trials" / "trial-001"
    kill_sweep_mid_trial(process, second)
    assert states(out) == ["COMPLETE", "RUNNING", "WAITING", "WAITING"]
    interrupted_at = RunDir(second).checkpoint_steps()[-1]
    assert 0 < interrupted_at < 500
    first_metrics = (out / "trials" / "trial-000" / "metrics.jsonl").read_bytes()

    code, text, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "resuming the sweep" in text and "1 of 4 trials done" in text
    assert f"trial-001 resumed at step {interrupted_at}: lr=0.01 (log: {out / 'logs' / 'trial-001.log'})" \
        in text.splitlines()
    assert states(out) == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    trials = study_of(out).get_trials()
    assert "median pruner" in trials[2].user_attrs["pruned_at"]
    assert sorted(trials[1].intermediate_values) == list(range(50, 501, 50))   # none lost
    assert (out / "trials" / "trial-000" / "metrics.jsonl").read_bytes() == first_metrics
    log = (out / "logs" / "trial-001.log").read_text()
    assert f"--resume {second}" in log and f"at step {interrupted_at}" in log
    steps = [r["step"] for r in RunDir(second).read_metrics() if r["type"] == "train"]
    assert steps == list(range(1, 501))     # continued, not restarted
    results = json.loads((out / "results.json").read_text())
    assert [t["status"] for t in results["trials"]] == ["done", "done", "pruned", "done"]
    best = min((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert results["best"] == f"trial-{best.number:03d}"
    assert results["best_params"] == {"train.lr": best.params["train.lr"]}
    assert f"lr: {best.params['train.lr']}\n" in (out / "best.yaml").read_text()
    assert (out / "curves.png").stat().st_size > 10_000
    # a different command on the same study is refused
    code, _, err = run_cli(capsys, *args[:-1], "train.lr=log:1e-5..1e-1")
    assert code == 2 and "specs" in err


def test_a_tpe_sweep_killed_while_creating_its_folder_starts_there_again(capsys, tmp_path,
                                                                         corpus):
    """Killed while writing its first sweep.json, the sweep leaves that write's
    temporary alone in --out; the rerun takes the folder as a new sweep and
    removes it (it was refused as 'not a sweep', forever)."""
    pytest.importorskip("optuna")
    out = tmp_path / "sweep"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    (out / f".sweep.json.tmp-{child.pid}").write_text('{"format": "xpmodel-sweep", "vers')
    code, stdout, err = run_cli(capsys, "sweep", "--config", TINY, "--out", out, "--max-iters", 3,
                                "--trials", 2, "--sampler", "tpe", f"data.source={corpus}",
                                "train.lr=log:1e-3..1e-2")
    assert code == 0, (stdout, err)
    assert states(out) == ["COMPLETE", "COMPLETE"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_a_tpe_sweep_retries_a_trial_whose_train_process_was_killed(capsys, tmp_path, corpus):
    """trial-000's `xpmodel train` is SIGKILLed (the sweep lives on and marks
    it failed); the rerun tries it again, as a grid sweep does and as the
    sweep said it would: a new trial of the study with the same values (the
    failed one stays FAIL), under its name, resumed from its checkpoint. Reruns
    kept it failed."""
    pytest.importorskip("optuna")
    from xpmodel.train.rundir import RunDir
    out = tmp_path / "sweep"
    args = ["sweep", "--config", TINY, "--out", out, "--max-iters", 1000, "--trials", 2,
            "--sampler", "tpe", "--no-prune", f"data.source={corpus}", "train.eval_interval=10",
            "train.save_interval=10", "train.lr=log:1e-3..1e-2"]
    process = sweep_process(args)
    first = RunDir(out / "trials" / "trial-000")
    deadline = time.time() + 300
    while time.time() < deadline and not (first.is_run() and first.checkpoint_steps()[-1] >= 20):
        time.sleep(0.02)
    os.kill(json.loads(first.lock_path.read_text())["pid"], signal.SIGKILL)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert "1 of 2 trials failed" in output and "run the same command again to retry them" in output
    assert states(out) == ["FAIL", "COMPLETE"]
    saved = first.checkpoint_steps()[-1]

    code, text, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "1 of 2 trials done; retrying 1 failed: trial-000" in text
    assert f"trial-000 resumed at step {saved}: " in text
    trials = study_of(out).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[2].params == trials[0].params
    assert trials[2].system_attrs["failed_trial"] == 0        # Optuna's record of a retry
    steps = [r["step"] for r in first.read_metrics() if r["type"] == "train"]
    assert steps == list(range(1, 1001))      # continued, not restarted
    results = json.loads((out / "results.json").read_text())
    assert [(t["trial"], t["status"]) for t in results["trials"]] == \
        [("trial-000", "done"), ("trial-001", "done")]
    assert results["trials"][0]["val_loss"] == trials[2].value

    code, text, err = run_cli(capsys, *args)         # nothing is left to run
    assert code == 0 and "2 of 2 trials done" in text and "retrying" not in text, (text, err)
    assert states(out) == ["FAIL", "COMPLETE", "COMPLETE"]


def set_trial_states(database, states):
    """Trial number -> Optuna state written straight into the study's SQLite
    database, as a kill or a failure elsewhere would have left them."""
    import sqlite3
    with sqlite3.connect(database) as db:
        for number, state in states.items():
            trial_id, = db.execute("select trial_id from trials where number = ?",
                                   (number,)).fetchone()
            db.execute("update trials set state = ? where trial_id = ?", (state, trial_id))
            db.execute("delete from trial_values where trial_id = ?", (trial_id,))


def test_a_machine_leaves_the_trials_another_ran_to_it(capsys, tmp_path, corpus):
    """Machines sharing a --storage each give their --out, often the same path;
    a machine retries or takes up only the trials its own folder ran. Both were
    taken by any folder at that path: machine B retried machine A's failed trial
    and took over its running one, each from scratch (it has no run folder)."""
    pytest.importorskip("optuna")
    out = tmp_path / "sweep"
    args = ["sweep", "--config", TINY, "--out", out, "--max-iters", 3, "--trials", 2,
            "--sampler", "tpe", "--no-prune", "--storage", f"sqlite:///{tmp_path / 'shared.db'}",
            f"data.source={corpus}", "train.lr=log:1e-3..1e-2"]
    code, text, err = run_cli(capsys, *args)
    assert code == 0, (text, err)
    set_trial_states(tmp_path / "shared.db", {0: "FAIL", 1: "RUNNING"})
    out.rename(tmp_path / "machine-a")

    code, text, err = run_cli(capsys, *args)       # machine B: its own folder at the same path
    assert "retrying" not in text and " started: " not in text and " resumed" not in text, \
        (text, err)
    assert "1 of them ran in another sweep folder sharing the study, where the same command " \
           "retries it" in text and "run the same command again" not in text, text
    assert states_in(tmp_path / "shared.db", out.name) == ["FAIL", "RUNNING"]
    assert not (out / "trials").exists()

    shutil.rmtree(out)
    (tmp_path / "machine-a").rename(out)           # machine A's folder: both are its trials,
    shutil.rmtree(out / "claims")                  # its run folders say so without claim files
    code, text, err = run_cli(capsys, *args)
    assert code == 0, (text, err)
    assert "retrying 1 failed: trial-000" in text
    assert "trial-000 resumed at step 3: " in text and "trial-001 resumed at step 3: " in text
    assert states_in(tmp_path / "shared.db", out.name) == ["FAIL", "COMPLETE", "COMPLETE"]


def test_sweeps_started_together_on_one_folder_retry_a_failed_trial_once(tmp_path, corpus):
    """Three sweeps on one folder all see trial-000 failed as they start. The
    second reaches its retry while the first is creating one (the first holds
    the trial's claim), the third after the first's retry has ended (the claim
    is free again): neither tries it a second time."""
    pytest.importorskip("optuna")
    from xpmodel.tune.preset import open_sweep
    out = tmp_path / "sweep"
    specs = [f"data.source={corpus}", "train.lr=log:1e-3..1e-2"]

    def sweep():
        return open_sweep(out, str(TINY), specs, sampler="tpe", pruner="none", trials=2,
                          max_iters=3, show=False)
    sweep().run()
    set_trial_states(out / "study.db", {0: "FAIL"})
    first, second, third = sweep(), sweep(), sweep()
    for each in (first, second, third):
        each._begin()
    raced = []
    create = first._storage.create_new_trial

    def create_while_the_second_retries(*args, **kwargs):
        raced.append(second._next_trial())
        return create(*args, **kwargs)
    first._storage.create_new_trial = create_while_the_second_retries
    assert first._next_trial()["name"] == "trial-000"
    assert raced == [None]
    first.study.tell(first._optuna_trials["trial-000"], 5.0)
    first.close()
    assert third._next_trial() is None
    second.close()
    third.close()
    trials = study_of(out).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[2].system_attrs["failed_trial"] == 0


def test_two_processes_share_one_study(tmp_path, corpus):
    pytest.importorskip("optuna")
    out = tmp_path / "sweep"
    args = ["sweep", "--config", TINY, "--out", out, "--max-iters", 40, "--trials", 5,
            "--sampler", "tpe", "--pruner", "halving", f"data.source={corpus}",
            "train.eval_interval=20", "train.lr=log:1e-4..3e-2", "model.n_embd=8,16"]
    first = sweep_process(args)
    deadline = time.time() + 30
    while not (out / "study.db").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = sweep_process(args)
    for process in (first, second):
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output
    trials = [t for t in study_of(out).get_trials() if "xpmodel_skipped" not in t.user_attrs]
    assert len(trials) == 5 and {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert len({t.user_attrs["worker"] for t in trials}) == 2      # both worked on it
    assert len({t.params["train.lr"] for t in trials}) == 5        # and drew different points
    assert sorted(p.name for p in (out / "trials").iterdir()) == \
        [f"trial-{t.number:03d}" for t in trials]
    results = json.loads((out / "results.json").read_text())
    assert len(results["trials"]) == 5 and results["best"]


def test_tpe_without_optuna_and_optuna_only_options_are_one_line_errors(capsys, tmp_path,
                                                                       monkeypatch, corpus):
    base = ["sweep", "--config", TINY, "--out", tmp_path / "s", f"data.source={corpus}",
            "train.lr=log:1e-4..1e-2"]
    monkeypatch.setitem(sys.modules, "optuna", None)     # import optuna fails
    code, _, err = run_cli(capsys, *base, "--sampler", "tpe")
    assert code == 2 and "pip install 'xpmodel[tune]'" in err
    assert_one_line_error(err)
    for extra, message in [(["--pruner", "halving"], "needs --sampler tpe"),
                           (["--storage", "sqlite:///x.db"], "needs --sampler tpe"),
                           (["--sampler", "grid"], "train.lr is a range"),
                           (["--no-prune", "--pruner", "median"], "contradict")]:
        code, _, err = run_cli(capsys, *base, *extra)
        assert code == 2 and message in err, err
        assert_one_line_error(err)
    assert not (tmp_path / "s").exists()


def test_tpe_on_a_grid_too_large_to_run_whole_is_one_line_before_writing(capsys, tmp_path, corpus):
    """A TPE sweep of grid SPECs alone runs every combination unless --trials
    says otherwise: 729,000,000 of them is refused, as the grid sampler does."""
    pytest.importorskip("optuna")
    values = ",".join(f"{0.001 * (i + 1):g}" for i in range(30))
    specs = [f"{key}={values}" for key in ("train.lr", "train.weight_decay", "train.beta1",
                                           "train.beta2", "train.grad_clip", "train.eps")]
    code, _, err = run_cli(capsys, "sweep", "--config", TINY, "--out", tmp_path / "s",
                           "--sampler", "tpe", f"data.source={corpus}", *specs)
    assert code == 2 and "a grid of 729,000,000 combinations" in err, err
    assert_one_line_error(err)
    assert not (tmp_path / "s").exists()
