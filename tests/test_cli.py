"""The `xpmodel` command line end to end, on a model small enough to train in
a second: train, resume, sample, eval, plot, prepare, tokenizer, help, config
errors, plain output without a terminal, and `xpmodel.load`.

Most commands run in-process through `cli.main` (no interpreter start-up);
the ones whose promise is about the real process (exit status, stderr, no
traceback, no escape codes) run as subprocesses.
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from cli_helpers import assert_one_line_error, copy_run, run_cli, write_corpus
import xpmodel
from xpmodel.train.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from xpmodel.config import load_config
from xpmodel.data.corpus import load_tokens
from xpmodel.data import eval_batches, read_token_header
from xpmodel.data.tokenfile import check_token_checksum
from xpmodel.model.params import parameter_shapes
from xpmodel.train.rundir import RunDir
from xpmodel.tokenizer.bpe import BPETokenizer

TINY = Path(__file__).resolve().parent / "tiny-run.yaml"
ESCAPE = "\x1b"


def subprocess_env(cache):
    return dict(os.environ, XPMODEL_CACHE=str(cache), OPENBLAS_NUM_THREADS="1",
                OMP_NUM_THREADS="1", COLUMNS="120")


def xpmodel_process(*args, cache, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "xpmodel.cli.main", *map(str, args)],
                          capture_output=True, encoding="utf-8", errors="replace",
                          env={**subprocess_env(cache), **(env or {})}, timeout=timeout)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 30-step run trained by a real `xpmodel train` process; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(root / "corpus.txt")
    run = root / "run"
    result = xpmodel_process("train", "--config", TINY, "--device", "cpu", "--out", run,
                             f"data.source={corpus}", "train.sample_interval=10",
                             "train.sample_tokens=40", cache=root / "cache")
    assert result.returncode == 0, result.stderr
    return {"run": run, "corpus": corpus, "cache": root / "cache", "stdout": result.stdout,
            "stderr": result.stderr}


# ---- train -------------------------------------------------------------------------

def test_train_writes_a_complete_run(trained):
    run = RunDir(trained["run"])
    for name in ("run.json", "config.yaml", "tokenizer.json", "metrics.jsonl"):
        assert (run.path / name).is_file(), name
    records = run.read_metrics()
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 31))
    for record in train:
        for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s"):
            assert isinstance(record[key], (int, float)) and math.isfinite(record[key]), key
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(math.isfinite(r["val_loss"]) for r in evals)
    assert train[-1]["loss"] < train[0]["loss"]
    # keep_last periodic checkpoints plus the best one, nothing else
    names = sorted(p.name for p in run.checkpoint_dir.iterdir())
    assert names == ["best.safetensors", "step-00000020.safetensors", "step-00000030.safetensors"]
    assert load_config(run.config_path).data.source == str(trained["corpus"])


def test_train_output_is_plain_without_a_terminal(trained):
    out = trained["stdout"]
    assert ESCAPE not in out and ESCAPE not in trained["stderr"]
    assert "step 10: val loss" in out
    assert "--- sample at step 10 ---" in out
    assert "done (finished): 30 steps" in out
    assert "tokenizing" not in out   # the progress bar is for terminals only


def test_resume_continues_from_the_checkpoint_and_can_raise_max_iters(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    code, out, err = run_cli(capsys, "train", "--resume", run, "train.max_iters=40")
    assert code == 0, err
    assert f"resumed {run} at step 30" in out
    assert ("note: train.lr_decay_iters is null (the run's length), so the learning-rate "
            "schedule now spans 40 steps instead of 30") in out
    records = RunDir(run).read_metrics()
    steps = [r["step"] for r in records if r["type"] == "train"]
    assert steps == list(range(1, 41))
    assert load_config(run / "config.yaml").train.max_iters == 40
    assert (run / "checkpoints" / "step-00000040.safetensors").is_file()
    code, out, err = run_cli(capsys, "train", "--resume", run)
    assert code == 0, err
    assert "already reached step 40" in out
    last_loss = [r["loss"] for r in records if r["type"] == "train"][-1]
    assert f"done (already complete): 40 steps, train loss {last_loss:.4f}," in out
    code, out, err = run_cli(capsys, "train", "--resume", run, "train.max_iters=20")
    assert code == 0, err
    assert "already reached step 40 (this config trains 20)" in out
    assert load_config(run / "config.yaml").train.max_iters == 40   # a resume that trains nothing


def test_resume_of_a_shorter_run_says_how_it_fits_the_schedule(trained, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--config", TINY, "--out", run,
                           f"data.source={trained['corpus']}", "train.max_iters=12",
                           "train.warmup_iters=12", "train.save_interval=4", "train.keep_last=5")
    assert code == 0, err
    for step in (8, 12):                                          # as if killed after step 4
        (run / "checkpoints" / f"step-{step:08d}.safetensors").unlink()
    code, out, err = run_cli(capsys, "train", "--resume", run, "train.max_iters=6")
    assert code == 0, err
    assert "note: train.max_iters=6 is shorter than the schedule" in out
    assert load_config(run / "config.yaml").train.warmup_iters == 6


def test_resume_of_a_run_sized_in_epochs_keeps_its_grad_accum(trained, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--config", TINY, "--out", run,
                           f"data.source={trained['corpus']}", "train.max_iters=null",
                           "train.epochs=1", "train.warmup_iters=1")
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "--resume", run, "train.grad_accum=2")
    assert code == 2
    assert_one_line_error(err)
    assert ("train.grad_accum cannot change in a run sized by train.epochs=1 (its length in "
            "steps depends on it); give the length as train.max_iters instead") in err
    steps = RunDir(run).checkpoint_steps()[-1]
    code, out, err = run_cli(capsys, "train", "--resume", run, "train.grad_accum=2",
                             f"train.max_iters={steps + 2}")
    assert code == 0, err
    assert RunDir(run).checkpoint_steps()[-1] == steps + 2


@pytest.mark.parametrize("flag", [["--config", "default"], ["--out", "elsewhere"], ["--overwrite"]])
def test_resume_refuses_the_flags_of_a_new_run(trained, tmp_path, capsys, flag):
    run = copy_run(trained, tmp_path)
    code, _, err = run_cli(capsys, "train", "--resume", run, *flag)
    assert code == 2
    assert_one_line_error(err)
    assert "drop --config, --init-from, --out and --overwrite" in err


@pytest.mark.parametrize("override,message", [
    ("model.n_layer=2", "not model.*"),
    ("data.source=notes.txt", "not data.*; to train this run's weights on new data, start a new "
                              "run with --init-from RUN"),
    ("train.batch_size=8", "train.batch_size cannot change"),
    ("train.init_from=elsewhere", "train.init_from cannot change: a resumed run goes on from its "
                                  "own checkpoints")])
def test_resume_refuses_to_change_the_model_the_data_or_the_batch_size(trained, tmp_path, capsys,
                                                                        override, message):
    run = copy_run(trained, tmp_path)
    code, _, err = run_cli(capsys, "train", "--resume", run, override)
    assert code == 2
    assert_one_line_error(err)
    assert message.replace("RUN", str(run)) in err


# ---- sample ------------------------------------------------------------------------

def test_sample_greedy_is_deterministic_and_seed_reproducible(trained, capsys):
    run = trained["run"]
    greedy = [run_cli(capsys, "sample", run, "--prompt", "The king", "--max-new-tokens", 30,
                      "--temperature", 0) for _ in range(2)]
    assert greedy[0][0] == 0 and greedy[0][1] == greedy[1][1]
    assert greedy[0][1].startswith("The king") and len(greedy[0][1]) > len("The king\n")
    seeded = [run_cli(capsys, "sample", run, "--max-new-tokens", 40, "--seed", seed)[1]
              for seed in (7, 7, 8)]
    assert seeded[0] == seeded[1]
    assert seeded[0] != seeded[2]


def make_likeliest_everywhere(run, token):
    """Change the run's latest weights so that `token` is always the likeliest
    next one: the final LayerNorm outputs a constant direction that only
    `token`'s embedding row matches."""
    path = sorted((run / "checkpoints").glob("step-*"))[-1]
    meta = read_checkpoint_meta(path)
    config = xpmodel.GPTConfig(vocab_size=meta["vocab_size"], block_size=16, n_layer=1,
                               n_head=2, n_embd=16)
    n = config.num_params()
    _, params, optim = load_checkpoint(path, dict(parameter_shapes(config)), {"m": n, "v": n})
    params["ln_f.weight"][:] = 0.0
    params["ln_f.bias"][:] = 0.0
    params["ln_f.bias"][0] = 1.0
    params["wte.weight"][token, 0] = 50.0
    meta = {k: v for k, v in meta.items() if k not in ("format", "format_version")}
    save_checkpoint(path, params, optim, meta)


def test_sample_stops_at_endoftext(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    make_likeliest_everywhere(run, BPETokenizer.load(run / "tokenizer.json").eot_id)
    for extra in (["--temperature", 0], ["--seed", 1]):
        code, out, err = run_cli(capsys, "sample", run, "--prompt", "Good", "--max-new-tokens",
                                 50, *extra)
        assert code == 0, err
        assert out == "Good\n"


def test_a_vocabulary_padded_past_the_tokenizer_never_samples_a_padding_id(tmp_path, capsys,
                                                                          monkeypatch):
    import xpmodel.model.generate as generate_module
    drawn, sample_next = [], generate_module.sample_next
    monkeypatch.setattr(generate_module, "sample_next",
                        lambda *a, **k: drawn.append(sample_next(*a, **k)) or drawn[-1])
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--config", TINY, "--device", "cpu", "--out", run,
                             f"data.source={corpus}", "train.max_iters=10", "model.vocab_size=320",
                             "train.sample_interval=2", "train.sample_temperature=5")
    assert code == 0, err
    assert "--- sample at step 10 ---" in out
    make_likeliest_everywhere(run, 300)    # the byte tokenizer has ids 0..256
    for extra in (["--temperature", 0], ["--temperature", 5, "--seed", 1]):
        code, out, err = run_cli(capsys, "sample", run, "--prompt", "Good", "--max-new-tokens",
                                 20, *extra)
        assert code == 0, err
    assert len(drawn) >= 40 and max(drawn) < 257       # the byte tokenizer's ids are 0..256


def test_sample_never_prints_control_characters(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    make_likeliest_everywhere(run, 0x1b)   # the escape byte
    code, out, err = run_cli(capsys, "sample", run, "--prompt", "Good", "--max-new-tokens", 5,
                             "--temperature", 0)
    assert code == 0, err
    assert out == "Good" + "\\x1b" * 5 + "\n"
    code, out, err = run_cli(capsys, "sample", run, "--prompt", "\x1b[31mred", "--max-new-tokens",
                             1, "--temperature", 0)
    assert code == 0 and out == "\\x1b[31mred\\x1b\n", err     # the prompt too


def test_sample_to_a_stdout_that_is_not_utf8_escapes_what_it_cannot_show(trained):
    done = xpmodel_process("sample", trained["run"], "--prompt", "caf\u00e9", "--max-new-tokens", 3,
                           "--seed", 1, cache=trained["cache"], env={"PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("caf\\xe9")


def test_eval_batches_are_spread_from_the_first_to_the_last(trained, monkeypatch):
    import xpmodel
    from xpmodel.train import evaluate
    model, tokenizer = xpmodel.load(trained["run"])
    T = model.config.block_size
    tokens = numpy.arange(5 * 2 * T + 1) % 200                      # five batches of two windows
    firsts = []

    def recording(model, batches):
        for x, _ in batches:
            firsts.append(int(x[0, 0]))
            yield 1.0
    monkeypatch.setattr(evaluate, "batch_losses", recording)
    evaluate.evaluate_tokens(model, tokenizer, tokens, 2, max_batches=3)
    assert firsts == [int(tokens[0]), int(tokens[2 * 2 * T]), int(tokens[4 * 2 * T])]


def test_training_samples_are_shown_without_control_characters(capsys):
    from xpmodel.train.display import TrainDisplay
    with TrainDisplay(10, quiet=True) as display:
        display.sample(3, "red \x1b[31malert\x07 done\tok\n")
    out = capsys.readouterr().out
    assert ESCAPE not in out and "\x07" not in out
    assert "red \\x1b[31malert\\x07 done" in out   # (the tab is expanded to spaces)


def test_sample_rejects_bad_options(trained, capsys):
    for args in (["--temperature", "-1"], ["--top-k", "0"], ["--top-p", "1.5"],
                 ["--num-samples", "0"]):
        code, out, err = run_cli(capsys, "sample", trained["run"], *args)
        assert code == 2, args
        assert_one_line_error(err)
        assert out == ""


# ---- eval --------------------------------------------------------------------------

_EVAL_LINE = re.compile(r"loss (\S+)\s+perplexity (\S+)\s+bits/byte (\S+)\s+\((\S+) tokens\)")


def test_eval_warns_when_the_runs_corpus_changed_since_it_trained(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--config", TINY, "--out", run, f"data.source={corpus}",
                           "train.max_iters=2")
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", run)
    assert code == 0 and "validation split: loss" in out and err == "", err
    write_corpus(corpus, lines=300)
    code, out, err = run_cli(capsys, "eval", run)
    assert code == 0 and "validation split: loss" in out
    assert err == (f"warning: {run}: data.source has changed since the run trained on it; this is "
                   f"the validation split of the corpus as it is now\n")


def test_eval_on_the_validation_split_and_on_a_file(trained, tmp_path, capsys):
    code, out, err = run_cli(capsys, "eval", trained["run"])
    assert code == 0, err
    assert out.startswith("validation split:")
    loss, perplexity, bits, _ = _EVAL_LINE.search(out).groups()
    assert float(perplexity) == pytest.approx(math.exp(float(loss)), rel=1e-3)
    # the byte tokenizer spends one token per byte
    assert float(bits) == pytest.approx(float(loss) / math.log(2), rel=1e-3)

    other = write_corpus(tmp_path / "other.txt", lines=200, seed=3)
    code, out, err = run_cli(capsys, "eval", trained["run"], "--data", other, "--batches", 2)
    assert code == 0, err
    assert out.startswith(f"{other}:")
    loss, perplexity, bits, tokens = _EVAL_LINE.search(out).groups()
    assert 0 < float(loss) < 10 and int(tokens.replace(",", "")) > 0


@pytest.mark.parametrize("mistake, message", [
    (["--device", "cuda:x"], "error: bad device 'cuda:x'"),
    (["data.source=nope.txt"], "error: data.source nope.txt: no such file or folder")])
def test_train_names_a_bad_device_or_data_source_before_choosing_a_run_folder(
        mistake, message, tmp_path, monkeypatch, capsys):
    """Without --out a run goes to runs/CONFIG, or runs/CONFIG-2 when that is
    taken, and says so; a run that cannot start says nothing of a folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny-run").mkdir(parents=True)
    write_corpus(tmp_path / "corpus.txt", lines=100)
    code, out, err = run_cli(capsys, "train", "--config", TINY, "--quiet", "data.source=corpus.txt",
                             *mistake)
    assert code == 2 and err.startswith(message), err
    assert out == ""
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["tiny-run"]


def test_a_data_source_or_file_that_names_nothing_exits_2_as_other_input_mistakes(trained,
                                                                                  tmp_path, capsys):
    """What the command was asked to read is not there: a usage mistake (2),
    named by its flag, before anything is written. A file that is there but
    cannot be used is bad data, a runtime failure (1)."""
    run, missing = trained["run"], tmp_path / "nope.txt"
    for args, message in (
            (["eval", run, "--data", missing], f"--data {missing}: no such file or folder"),
            (["eval", run, "--data", tmp_path / "nope*.txt"], "nope*.txt: glob matched no files"),
            (["train", "--config", TINY, "--out", tmp_path / "new", f"data.source={missing}"],
             f"data.source {missing}: no such file or folder"),
            (["tokenizer", "train", missing, "--vocab-size", 300, "--out", tmp_path / "tok.json"],
             f"SOURCE {missing}: no such file or folder"),
            (["prepare", missing, "--tokenizer", run / "tokenizer.json"],
             f"SOURCE {missing}: no such file or folder"),
            (["prepare", trained["corpus"], "--tokenizer", tmp_path / "tok.json"],
             f"--tokenizer {tmp_path / 'tok.json'}: no such tokenizer file")):
        code, _, err = run_cli(capsys, *args)
        assert code == 2, (args, err)
        assert_one_line_error(err)
        assert message in err
    assert list(tmp_path.iterdir()) == []   # nothing written, not even a cache
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01 not text")
    (tmp_path / "empty.txt").write_bytes(b"")
    for data, message in (("binary.txt", "binary file, not text"), ("empty.txt", "empty corpus")):
        code, _, err = run_cli(capsys, "eval", run, "--data", tmp_path / data)
        assert code == 1 and message in err, err


# ---- plot --------------------------------------------------------------------------

def test_plot_writes_a_png(trained, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    target = tmp_path / "curves.png"
    code, out, err = run_cli(capsys, "plot", trained["run"], "--out", target)
    assert code == 0, err
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(target) in out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_plot_without_matplotlib_says_how_to_install_it(trained, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # makes `import matplotlib` fail
    code, out, err = run_cli(capsys, "plot", trained["run"], "--out", "unused.png")
    assert code == 2
    assert_one_line_error(err)
    assert "matplotlib" in err and "pip install" in err


# ---- help --------------------------------------------------------------------------

def test_top_level_help(tmp_path):
    result = xpmodel_process("--help", cache=tmp_path)
    assert result.returncode == 0
    for command in ("train", "sample", "eval", "plot", "prepare", "tokenizer"):
        assert command in result.stdout
    assert ESCAPE not in result.stdout


@pytest.mark.parametrize("command, words", [
    (["train"], "Train a model"), (["sample"], "generated text"), (["eval"], "Evaluate"),
    (["plot"], "Plot"), (["prepare"], "Tokenize"), (["tokenizer"], "tokenizer"),
    (["tokenizer", "train"], "BPE"), (["export-hf"], "GPT2LMHeadModel"),
    (["import-hf"], "Hugging Face"),
])
def test_each_command_describes_itself(command, words, capsys):
    code, out, _ = run_cli(capsys, *command, "--help")
    assert code == 0
    assert words in out and "usage: xpmodel" in out


def _commands(parser, prefix="xpmodel"):
    """(name, parser) of every command that runs, "tokenizer train" included."""
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if sub.get_default("handler") is not None:
                    yield f"{prefix} {name}", sub
                yield from _commands(sub, f"{prefix} {name}")


def test_readmes_command_table_names_every_flag_and_override_of_each_command():
    from xpmodel.cli.main import build_parser
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `xpmodel ")]
    for name, parser in _commands(build_parser()):
        row = next((row for row in rows if row.startswith(f"| `{name} ")), None)
        assert row is not None, name
        for action in parser._actions:
            flags = [f for f in action.option_strings if f.startswith("--")]
            if flags and flags[0] not in ("--help", "--debug"):
                assert flags[0] in row, (name, flags[0])
            if action.metavar == "KEY=VALUE":
                assert "KEY=VALUE" in row, name


@pytest.mark.parametrize("command", [["train"], ["sample", "RUN"], ["eval", "RUN"],
                                     ["doctor", "default"], ["lr-find"]])
def test_every_command_that_runs_a_model_takes_the_gpu_when_there_is_one(command, capsys):
    """--device defaults to auto (CUDA when CuPy sees a GPU, else the CPU) for
    each, so `xpmodel sample` on a GPU machine does not run on the CPU unasked."""
    from xpmodel.cli.main import build_parser
    assert build_parser().parse_args(command).device == "auto"
    code, out, _ = run_cli(capsys, command[0], "--help")
    assert code == 0 and "(default: auto)" in " ".join(out.split())


def test_no_command_prints_usage_on_stderr(capsys):
    code, out, err = run_cli(capsys)
    assert code == 2 and "usage: xpmodel" in err and out == ""


# ---- prepare and tokenizer ---------------------------------------------------------

def test_tokenizer_train_then_prepare(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt", lines=300)
    tokenizer_path = tmp_path / "tok.json"
    code, out, err = run_cli(capsys, "tokenizer", "train", corpus, "--vocab-size", 300,
                             "--out", tokenizer_path)
    assert code == 0, err
    tokenizer = BPETokenizer.load(tokenizer_path)
    assert tokenizer.vocab_size == 300 and "300-id tokenizer" in out
    tokens = tmp_path / "corpus.tok"
    code, out, err = run_cli(capsys, "prepare", corpus, "--tokenizer", tokenizer_path,
                             "--out", tokens, "--workers", 1)
    assert code == 0, err
    header = read_token_header(tokens)
    assert header.count == len(tokenizer.encode(corpus.read_text()))
    assert f"wrote {header.count:,} tokens to {tokens}" in out
    assert "tokenizing" not in out + err   # the progress bar is for terminals only
    code, out, err = run_cli(capsys, "prepare", corpus, "--tokenizer", tokenizer_path,
                             "--out", tokens, "--workers", 1)
    assert code == 2 and "already exists; pass --overwrite" in err
    code, out, err = run_cli(capsys, "prepare", corpus, "--tokenizer", tmp_path)
    assert code == 2 and f"--tokenizer {tmp_path}: is a directory, not a tokenizer file" in err
    written = tokens.stat().st_mtime_ns
    code, out, err = run_cli(capsys, "prepare", corpus, "--tokenizer", tokenizer_path)
    assert code == 0 and out.startswith("wrote "), err
    code, out, err = run_cli(capsys, "prepare", corpus, "--tokenizer", tokenizer_path)
    assert code == 0 and f"already holds these {header.count:,} tokens" in out, err
    damaged = bytearray(tokens.read_bytes())
    damaged[-3] ^= 0xFF
    tokens.write_bytes(damaged)
    code, out, err = run_cli(capsys, "prepare", corpus, "--tokenizer", tokenizer_path,
                             "--out", tokens, "--workers", 1, "--overwrite")
    assert code == 0 and f"wrote {header.count:,} tokens to {tokens}" in out, err
    assert tokens.stat().st_mtime_ns != written and check_token_checksum(tokens) is True


# ---- config errors -----------------------------------------------------------------

def _bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  n_layer: [1,\n")
    return ["--config", path]


@pytest.mark.parametrize("make_args, culprit", [
    (lambda p: ["model.n_layre=2"], "n_layre"),
    (lambda p: ["train.lr=fast"], "train.lr"),
    (lambda p: ["model.n_layer=true"], "model.n_layer"),
    (_bad_yaml, "invalid YAML"),
    (lambda p: ["model.n_embd=30", "model.n_head=4"], "divisible"),
    (lambda p: ["--config", p / "missing.yaml"], "missing.yaml"),
])
def test_config_errors_exit_2_with_one_line(make_args, culprit, tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", "--config", TINY, "--out", tmp_path / "run",
                             *make_args(tmp_path))
    assert code == 2
    assert_one_line_error(err)
    assert culprit in err
    assert not (tmp_path / "run").exists()


def test_config_error_in_a_real_process_and_debug_traceback(tmp_path):
    result = xpmodel_process("train", "--config", TINY, "model.n_layre=2", cache=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result.stderr)
    result = xpmodel_process("train", "--debug", "--config", TINY, "model.n_layre=2",
                             cache=tmp_path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UsageError" in result.stderr
    result = xpmodel_process("--debug", "train", "--config", TINY, "model.n_layre=2",
                             cache=tmp_path)
    assert "Traceback" in result.stderr


# ---- Python API --------------------------------------------------------------------

def test_load_returns_the_trained_model_and_tokenizer(trained, monkeypatch):
    monkeypatch.setenv("XPMODEL_CACHE", str(trained["cache"]))
    model, tokenizer = xpmodel.load(trained["run"], device="cpu")
    text = "Good night, sweet prince."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = numpy.array([tokenizer.encode(text)[:16]])
    assert numpy.isfinite(model.forward(ids)).all()
    # the loss training logged at its last evaluation, recomputed from the saved weights
    run = RunDir(trained["run"])
    config = run.load_config()
    _, val = load_tokens(config.data, tokenizer, config.model.block_size, show_progress=False)
    losses = [float(model.loss(x, y)) for x, y in
              eval_batches(val, config.train.batch_size, config.model.block_size,
                           config.train.eval_batches)]
    logged = [r for r in run.read_metrics() if r["type"] == "eval"][-1]
    assert logged["step"] == 30
    assert float(numpy.mean(losses)) == pytest.approx(logged["val_loss"], rel=1e-6)
    best, _ = xpmodel.load(trained["run"], checkpoint="best")
    assert best.config == model.config


def test_metrics_lines_are_strict_json(trained):
    for line in (trained["run"] / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))


# ---- argument order, epochs, resume limits ----------------------------------------

def test_overrides_may_follow_options_and_epochs_work_with_random_windows(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt", lines=300)
    code, out, err = run_cli(capsys, "train", "--config", TINY, "model.n_layer=1", "--device", "cpu",
                             "--quiet", "--out", tmp_path / "run", f"data.source={corpus}",
                             "train.max_iters=null", "train.epochs=1", "train.warmup_iters=0")
    assert code == 0, err
    steps = [r["step"] for r in RunDir(tmp_path / "run").read_metrics() if r["type"] == "train"]
    tokens = read_token_header(next((tmp_path / "cache" / "tokens").glob("*.tok"))).count
    assert len(steps) == int(tokens * 0.9 - 1) // (4 * 16)   # one pass of B*T-token batches


def test_unknown_flags_are_still_refused(capsys):
    code, out, err = run_cli(capsys, "train", "--bogus")
    assert code == 2 and out == ""
    assert_one_line_error(err)
    assert err.startswith("error: xpmodel train: unrecognized arguments: --bogus")


@pytest.mark.parametrize("args, command, culprit", [
    (["sample", "run1", "--max-new-tokens", "abc"], "xpmodel sample",
     "argument --max-new-tokens: invalid int value: 'abc'"),
    (["sample", "run", "--checkpoint", "worst"], "xpmodel sample",
     "argument --checkpoint: invalid choice: 'worst'"),
    (["doctor", "cfg", "--skip", "bogus"], "xpmodel doctor", "argument --skip: invalid choice"),
    (["bogus"], "xpmodel", "argument COMMAND: invalid choice: 'bogus'"),
    (["tokenizer", "bogus"], "xpmodel tokenizer", "argument COMMAND: invalid choice: 'bogus'"),
    (["tokenizer", "train", "corpus.txt"], "xpmodel tokenizer train",
     "the following arguments are required: --vocab-size, --out"),
    (["lr-find", "--steps", "100", "lr=1", "--bogus"], "xpmodel lr-find",
     "unrecognized arguments: --bogus"),
    (["--bogus", "runs"], "xpmodel", "unrecognized arguments: --bogus"),
])
def test_argument_mistakes_are_one_line_naming_the_command_and_the_argument(args, command, culprit,
                                                                          capsys):
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ""
    assert_one_line_error(err)
    assert err.startswith(f"error: {command}: {culprit}")
    assert err.rstrip().endswith(f"({command} --help lists the options)")


@pytest.mark.parametrize("value", ["a" * 5000, 'b"' * 3000, "c'" * 3000])
@pytest.mark.parametrize("flag", ["--top-k", "--seed", "--temperature"])
def test_a_long_flag_value_is_quoted_in_about_200_characters(flag, value, capsys):
    code, out, err = run_cli(capsys, "sample", "run", flag, value)
    assert code == 2 and out == ""
    assert_one_line_error(err)
    assert err.startswith(f"error: xpmodel sample: argument {flag}: invalid ")
    assert value[:150] in err and value not in err
    assert len(err) < 320, len(err)


@pytest.mark.parametrize("args, command, argument", [
    (["train", "--resume", ""], "train", "--resume"),
    (["train", "--init-from", "", "train.max_iters=1"], "train", "--init-from"),
    (["train", "--out", "", "train.max_iters=1"], "train", "--out"),
    (["train", "--config", ""], "train", "--config"),
    (["import-hf", "", "--out", "X"], "import-hf", "HF_DIR"),
    (["export-hf", "run1", ""], "export-hf", "OUT_DIR"),
    (["runs", ""], "runs", "DIR"),
    (["compare", "run1", ""], "compare", "RUN"),
    (["tokenizer", "train", "corpus.txt", "--vocab-size", "300", "--out", "t.json",
      "--export-hf", ""], "tokenizer train", "--export-hf"),
    (["lr-find", "--out", ""], "lr-find", "--out"),
    (["sweep", "--out", "s", "--config", "", "train.lr=1,2"], "sweep", "--config"),
])
def test_an_empty_path_is_refused_naming_its_argument(args, command, argument, tmp_path,
                                                       monkeypatch, capsys):
    """`--resume ''` used to start a new run of the default config in
    runs/default, `--init-from ''` to train from fresh weights, `runs ''` to
    list the current folder."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ""
    assert_one_line_error(err)
    assert err.startswith(f"error: xpmodel {command}: argument {argument}: an empty path"), err
    assert list(tmp_path.iterdir()) == []


def test_every_path_argument_of_every_command_refuses_an_empty_path():
    import argparse
    from xpmodel.cli.main import build_parser
    paths = {"config", "out", "resume", "init_from", "run_dir", "out_dir", "hf_dir", "source",
             "target", "dir", "run_dirs", "data", "tokenizer", "export_hf"}
    seen = set()
    for name, parser in _commands(build_parser()):
        for action in parser._actions:
            if action.dest in paths:
                seen.add(action.dest)
                with pytest.raises(argparse.ArgumentTypeError, match="an empty path"):
                    action.type("")
                assert action.type("x") == "x"
    assert seen == paths


@pytest.mark.parametrize("args, dest, expected", [
    (["train", "--quiet", "model.n_layer=2", "--out", "o", "train.max_iters=3"], "overrides",
     ["model.n_layer=2", "train.max_iters=3"]),
    (["sweep", "--out", "s", "data.source=c", "--device", "cpu", "train.lr=1,2"], "specs",
     ["data.source=c", "train.lr=1,2"]),
    (["lr-find", "train.lr=1", "--steps", "20", "model.n_layer=1"], "overrides",
     ["train.lr=1", "model.n_layer=1"]),
])
def test_key_value_arguments_may_come_between_and_after_options(args, dest, expected):
    from xpmodel.cli.main import build_parser
    assert getattr(build_parser().parse_args(args), dest) == expected


def test_an_empty_storage_url_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "sweep", "--out", "s", "--sampler", "tpe", "--storage", "",
                           "train.lr=log:1e-4..1e-2")
    assert code == 2 and err.startswith("error: xpmodel sweep: argument --storage: an empty URL")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, needed", [("doctor", "CONFIG_OR_RUN"), ("sweep", "--out")])
def test_a_missing_argument_names_only_what_is_required(command, needed, capsys):
    code, _, err = run_cli(capsys, command)
    assert code == 2 and f"the following arguments are required: {needed} (" in err
    assert "KEY=VALUE" not in err and "SPEC" not in err


def test_tokenizer_without_a_subcommand_shows_its_own_help(capsys):
    code, out, err = run_cli(capsys, "tokenizer")
    assert code == 2 and err.startswith("usage: xpmodel tokenizer") and out == ""


def test_bits_per_byte_gives_special_tokens_no_bytes(trained):
    from xpmodel.train.evaluate import evaluate_tokens
    model, tokenizer = xpmodel.load(trained["run"])
    text_ids = tokenizer.encode("Good night sweet prince.\n" * 3)
    with_eot = numpy.array(text_ids + [tokenizer.eot_id] + text_ids)
    plain = numpy.array(text_ids + text_ids)
    both = evaluate_tokens(model, tokenizer, with_eot, batch_size=4)
    nats = both["loss"] * both["tokens"]
    assert both["bits_per_byte"] == pytest.approx(nats / math.log(2) / (2 * len("Good night sweet prince.\n" * 3) - 1))
    assert evaluate_tokens(model, tokenizer, plain, batch_size=4)["tokens"] == both["tokens"] - 1


def test_train_on_cuda_runs_end_to_end_on_the_kernel_emulator(tmp_path, capsys):
    """`xpmodel train --device cuda` in mixed fp16, with evals, samples and
    checkpoints, the CUDA kernels running on the CPU emulator (no GPU here);
    the run then samples on the CPU."""
    import cuda_emulator
    if cuda_emulator.compiler() is None:
        pytest.skip("the CUDA emulator needs g++")
    corpus = write_corpus(tmp_path / "corpus.txt")
    with cuda_emulator.emulated_cuda():
        code, out, err = run_cli(capsys, "train", "--config", TINY, "--device", "cuda",
                                 "--out", tmp_path / "run", f"data.source={corpus}",
                                 "train.precision=fp16", "train.max_iters=20",
                                 "train.sample_interval=10", "train.sample_tokens=20")
    assert code == 0, err
    assert "step 20: val loss" in out and "--- sample at step 20 ---" in out
    train = [r for r in RunDir(tmp_path / "run").read_metrics() if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert train[-1]["loss"] < train[0]["loss"]
    code, out, err = run_cli(capsys, "sample", tmp_path / "run", "--device", "cpu",
                             "--prompt", "The king", "--max-new-tokens", "10", "--temperature", "0")
    assert code == 0 and out.startswith("The king") and len(out) > len("The king"), err


@pytest.mark.parametrize("position, block_size, taken", [
    ("rope", 16, 16), ("rope", 64, 64), ("rope", None, 32), ("learned", 16, 32)])
def test_init_from_keeps_a_chosen_block_size_only_with_rope(position, block_size, taken):
    """Rotary positions own no parameters, so a run may choose its context
    (shorter or longer than the source's); a learned table fixes it."""
    from xpmodel.train.runs import adopt_pretrained, ignored_settings
    source = xpmodel.GPTConfig(vocab_size=257, block_size=32, n_layer=2, n_head=4, n_embd=32,
                               position=position)
    overrides = ["model.n_layer=3"] + ([] if block_size is None else
                                       [f"model.block_size={block_size}"])
    config = load_config("default", overrides)
    adopted = adopt_pretrained(config, source, BPETokenizer())
    assert adopted.model.block_size == taken
    # only what the config chose is reported, not defaults such as model.n_head=8
    expected = ["model.n_layer=3"] + ([f"model.block_size={block_size}"]
                                      if block_size is not None and taken != block_size else [])
    assert ignored_settings(config.model, adopted.model) == expected


def test_an_epoch_run_whose_training_split_holds_no_batch_names_the_corpus_and_keys(tmp_path,
                                                                                      corpus, capsys):
    code, _, err = run_cli(capsys, "train", "--config", TINY, "--device", "cpu",
                           "--out", tmp_path / "run", f"data.source={corpus}",
                           "data.batching=epochs", "data.val_fraction=0.995")
    assert code == 1
    assert_one_line_error(err)
    assert f"{corpus}: the training split's " in err and " for data.batching=epochs; lower " \
        "train.batch_size or data.val_fraction, or use data.batching=random" in err, err
    assert not (tmp_path / "run").exists()
