"""tools/speedrun.py end to end on a small corpus and an easy target: an
xpmodel recipe and the PyTorch reference both cross it, the crossing is
decided on the whole validation split, and the table and JSON say so; bad
arguments are refused before any run; --set reaches every recipe and the
trainer's sampler and model settings."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import write_corpus

TOOL = Path(__file__).resolve().parent.parent / "tools" / "speedrun.py"


def speedrun_process(tmp_path, *args):
    """tools/speedrun.py with `args`, on one thread with its own cache."""
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          timeout=240, env={"XPMODEL_CACHE": str(tmp_path / "cache"),
                                            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                                            "PATH": "/usr/bin:/bin"})


def run_speedrun(tmp_path, *args):
    """tools/speedrun.py with `args`; it must succeed."""
    done = speedrun_process(tmp_path, *args)
    assert done.returncode == 0, done.stderr
    return done


def speedrun_module():
    sys.path.insert(0, str(TOOL.parent))
    import speedrun
    return speedrun


def test_two_recipes_reach_an_easy_target(tmp_path):
    pytest.importorskip("torch")
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "speedrun.json"
    done = run_speedrun(tmp_path, "--recipes", "speedrun", "torch-gpt2-adamw", "--data", str(corpus),
                        "--target", "2.5", "--eval-every", "20", "--threads", "1", "--json", str(out))
    assert "time to val loss 2.5" in done.stdout and "speedrun" in done.stdout
    report = json.loads(out.read_text())
    assert report["target"] == 2.5 and report["machine"]["cores"] >= 1
    for run in report["runs"]:
        assert run["reached"], run["recipe"]
        crossing = run["curve"][-1]
        assert crossing["val_full"] <= 2.5 < run["curve"][0]["val_estimate"]
        assert run["tokens"] == run["steps"] * 12 * 64 and run["train_s"] > 0
    assert {run["engine"] for run in report["runs"]} == {"xpmodel", "torch"}
    assert report["complete"] and set(report["median"]) == {"speedrun", "torch-gpt2-adamw"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "corpus.txt", "speedrun.json"]


def test_baseline_target_is_the_baselines_loss_at_its_end(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "speedrun.json"
    done = run_speedrun(tmp_path, "--recipes", "speedrun", "gpt2-adamw", "--data", str(corpus),
                        "--target", "baseline", "--eval-every", "20", "--set", "train.max_iters=40",
                        "--json", str(out))
    baseline, other = json.loads(out.read_text())["runs"]
    assert baseline["recipe"] == "gpt2-adamw" and other["recipe"] == "speedrun"   # baseline first
    assert baseline["steps"] == 40 and baseline["reached"]       # its whole schedule, no more
    assert baseline["target"] == baseline["val_full"] == baseline["curve"][-1]["val_full"]
    assert other["target"] == baseline["target"]
    assert "the target of every run" in done.stdout
    # the corpus is named as each recipe starts, in the summary and in the report
    assert f"[1/1] gpt2-adamw: training on {corpus} ..." in done.stdout
    assert f"(cpu size, cpu, {corpus};" in done.stdout
    assert json.loads(out.read_text())["data"] == str(corpus)


def test_tiny_shakespeare_is_looked_for_where_xpmodel_shared_data_says(tmp_path, monkeypatch):
    monkeypatch.setenv("XPMODEL_SHARED_DATA", str(tmp_path))
    sys.modules.pop("speedrun", None)
    try:
        assert speedrun_module().DEFAULT_DATA == tmp_path / "tinyshakespeare.txt"
    finally:
        sys.modules.pop("speedrun", None)


def test_every_recipe_has_a_config_at_every_size_in_one_precision():
    speedrun = speedrun_module()
    for size in speedrun.SIZES:
        precisions = set()
        for name in speedrun.RECIPES:
            config = speedrun.load_recipe(name, size, data=None)
            assert config.train.max_iters > 0
            if size.startswith("bpe"):
                assert config.data.tokenizer == "bpe" and config.data.source == "pystdlib"
            if name.startswith("llama"):
                assert config.model.position == "rope" and config.model.norm == "rmsnorm"
            precisions.add(config.train.precision)
        assert precisions == ({"fp32"} if size.endswith("cpu") else {"fp16"}), size


def test_the_torch_recipe_runs_fp16_with_the_set_model(tmp_path):
    """fp16 under autocast with a GradScaler (as the gpu sizes ask), and --set
    model.* reaches the PyTorch recipe: its model has the overridden size."""
    pytest.importorskip("torch")
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "speedrun.json"
    run_speedrun(tmp_path, "--recipes", "torch-gpt2-adamw", "--data", str(corpus), "--target", "2.5",
                 "--eval-every", "20", "--threads", "1", "--json", str(out),
                 "--set", "train.precision=fp16", "model.n_layer=1")
    run, = json.loads(out.read_text())["runs"]
    assert run["reached"] and run["overrides"] == ["train.precision=fp16", "model.n_layer=1"]
    assert run["parameters"] < 400_000       # shakespeare-char-cpu's 4 layers have 0.8M


@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], "--repeats: '0' must be at least 1"),
    (["--eval-every", "ten"], "--eval-every: 'ten' is not a whole number"),
    (["--threads", "-2"], "--threads: '-2' must be at least 1"),
    (["--target", "nan"], "a target loss is a finite number above 0"),
    (["--target", "0"], "a target loss is a finite number above 0"),
    (["--device", "gpu"], "--device: bad device 'gpu'"),
    (["--data", "{tmp}/missing.txt"], "no such file or folder"),
    (["--json", "{tmp}/no-folder/out.json"], "there is no folder"),
    (["--json", "{tmp}"], "is a folder"),
    (["--json", "{tmp}/notes.txt"], "the file exists; --overwrite replaces an earlier report"),
    (["--json", "{tmp}/notes.txt", "--overwrite"], "not a report of tools/speedrun.py"),
    (["--set", "model.n_layer=many"], "speedrun: override 'model.n_layer=many'"),
    (["--set", "train.eval_interval=5"], "a speedrun has no use for it"),
    (["--recipes", "speedrun", "torch-gpt2-adamw", "--set", "train.optimizer=muon"],
     "the PyTorch engine cannot run train.optimizer=muon"),
])
def test_bad_arguments_are_refused_in_one_line_before_any_run(tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("not a report\n")
    if "PyTorch engine" in message:
        pytest.importorskip("torch")         # without it, the recipe is refused for that first
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    if "--recipes" not in args:
        args = ["--recipes", "speedrun", *args]
    done = speedrun_process(tmp_path, *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "notes.txt").read_text() == "not a report\n" and not done.stdout


def test_set_reaches_the_trainers_sampler_and_model(tmp_path):
    from xpmodel.data import EpochSampler
    from xpmodel.data.corpus import build_tokenizer
    speedrun = speedrun_module()
    config = speedrun.load_recipe("speedrun", "cpu", str(write_corpus(tmp_path / "corpus.txt")), [
        "data.batching=epochs", "data.crop_augment=true", "data.token_dropout=0.1",
        "train.embedding_noise=5", "train.recompute=block"])
    tokenizer = build_tokenizer(config.data, say=lambda text: None)
    sampler, steps = speedrun.trainer_sampler(config, tokenizer, np.arange(5000) % 256)
    assert isinstance(sampler, EpochSampler) and sampler.random_crop and sampler.token_dropout == 0.1
    assert steps == config.train.max_iters
    model = speedrun.XpmodelEngine(config, tokenizer, "cpu").model
    assert model.embedding_noise == (5.0, "uniform") and model.recompute == "block"


def test_the_table_marks_an_estimate_that_is_not_a_whole_split_loss():
    speedrun = speedrun_module()
    run = dict(recipe="gpt2-adamw", reached=False, steps=100, tokens=100, train_s=2.0,
               val_estimate=2.3456, val_full=None)
    text = speedrun.table(speedrun.median_runs([run]))
    assert "~2.3456" in text and "not measured" in text
    assert "~" not in speedrun.table(speedrun.median_runs([dict(run, reached=True, val_full=1.5)]))


def test_json_replaces_only_an_earlier_report(tmp_path):
    speedrun = speedrun_module()
    path = tmp_path / "speedrun.json"
    speedrun.write_report(path, {"target": 2.0, "size": "cpu", "device": "cpu", "machine": {}, "runs": []})
    assert speedrun.json_problem(path, overwrite=True) is None
    assert "--overwrite" in speedrun.json_problem(path, overwrite=False)
    path.write_text('{"target": 2.0}')
    assert "not a report" in speedrun.json_problem(path, overwrite=True)


def test_a_skipped_muon_update_stops_the_recipe_at_its_next_evaluation(tmp_path):
    """A fused GPU Muon step that skips a non-finite update (update_finite false
    on the device) is counted there and raised when the run next waits for the
    device, as the trainer does."""
    from xpmodel.data.corpus import build_tokenizer
    from xpmodel.errors import XpmodelError
    from xpmodel.train.muon import NON_FINITE_UPDATE
    speedrun = speedrun_module()
    config = speedrun.load_recipe("llama-muon", "cpu", str(write_corpus(tmp_path / "corpus.txt")), [])
    engine = speedrun.XpmodelEngine(config, build_tokenizer(config.data, say=lambda text: None), "cpu")
    x = np.arange(2 * 8).reshape(2, 8) % 64
    engine.step(1e-3, [(x, x)])
    engine.synchronize()                            # a finite update: nothing to say
    optimizer_step = engine.optimizer.step

    def skipping_step(*args, **kwargs):             # as the fused step reports a skip
        optimizer_step(*args, **kwargs)
        engine.optimizer.update_finite = np.asarray(False)
    engine.optimizer.step = skipping_step
    engine.step(1e-3, [(x, x)])
    with pytest.raises(XpmodelError, match="Newton-Schulz") as raised:
        engine.synchronize()
    assert str(raised.value) == NON_FINITE_UPDATE


def test_a_recipe_that_fails_says_why_in_one_line(tmp_path):
    """An XpmodelError inside a recipe's own process is its one line on stderr, then
    the tool says which recipe failed."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    done = speedrun_process(tmp_path, "--recipes", "gpt2-adamw", "--data", str(corpus), "--target", "2.5",
                            "--set", "model.n_embd=1048576", "model.n_layer=64")
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    why, failed = done.stderr.strip().splitlines()
    assert why.startswith("gpt2-adamw: a model of ") and "more than this machine's" in why
    assert failed == "gpt2-adamw: the run failed"
