"""Trust: xpmodel never touches a user's files, bounds every input, and says
what went wrong in one line.

- a failed or interrupted start, and --overwrite, delete only files xpmodel
  wrote; a folder holding a user's file with a run file's name is never
  written to; one process writes a run at a time (a lock that a kill -9
  frees); an output that is one of the command's inputs is refused;
- crafted configs (alias bombs, deep nesting, huge strings, /dev/zero or a
  FIFO as a file), tokenizer files, run files and globs that loop are each
  refused quickly with a message naming the file and key;
- damaged checkpoints, run files and token files, and bad flag values, are
  one line naming the file or the flag; nothing prints a traceback.
"""
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest
from safetensors.numpy import load_file

from cli_helpers import assert_one_line_error, run_cli, write_corpus
from xpmodel.cli import main as cli
from xpmodel.train.checkpoint import load_checkpoint, save_checkpoint
from xpmodel.config import load_config
from xpmodel.data.sources import resolve_source
from xpmodel.data.tokenfile import HEADER_BYTES, read_token_file
from xpmodel.errors import DataError, UsageError, XpmodelError
from xpmodel.model.gpt import GPTConfig
from xpmodel.model.params import parameter_shapes
from xpmodel.train.rundir import RunDir
from xpmodel.tokenizer.bpe import MAX_VOCAB, BPETokenizer
from xpmodel.tokenizer.hf_export import export_tokenizer_hf
from xpmodel.train import Trainer

TINY = Path(__file__).resolve().parent / "tiny-run.yaml"
TINY_GPT = GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 30-step run (checkpoints at 20 and 30, and best), made in this process."""
    root = tmp_path_factory.mktemp("finished")
    corpus = write_corpus(root / "corpus.txt")
    config = load_config(TINY, [f"data.source={corpus}", f"data.cache_dir={root / 'cache'}"])
    Trainer.start(config, device="cpu", out=root / "run", show=False).run()
    return root / "run"


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run to change."""
    shutil.copytree(finished, tmp_path / "run")
    return RunDir(tmp_path / "run")


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def train_args(out, corpus, *extra):
    return ["train", "--config", TINY, "--device", "cpu", "--out", out, f"data.source={corpus}",
            *extra]


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


# ---- never lose or clobber data ------------------------------------------------------

def test_overwrite_keeps_the_files_xpmodel_did_not_write(run, corpus, capsys):
    (run.path / "notes.txt").write_text("mine")
    (run.checkpoint_dir / "other.pt").write_bytes(b"weights of mine")
    code, _, err = run_cli(capsys, *train_args(run.path, corpus, "train.max_iters=10", "--overwrite"))
    assert code == 0, err
    assert (run.path / "notes.txt").read_text() == "mine"
    assert (run.checkpoint_dir / "other.pt").read_bytes() == b"weights of mine"
    assert run.checkpoint_steps() == [10]


def test_a_failed_start_removes_only_what_it_wrote(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    tiny = write_corpus(tmp_path / "tiny.txt", lines=1)
    code, _, err = run_cli(capsys, *train_args(out, tiny, "--overwrite"))
    assert code == 1
    assert_one_line_error(err)
    assert listing(out) == ["notes.txt"]


def test_an_interrupted_creation_removes_only_what_it_wrote(tmp_path):
    out = RunDir(tmp_path / "out")
    out.path.mkdir()
    (out.path / "notes.txt").write_text("mine")

    def interrupted(path):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        out.create(load_config(TINY, ["data.source=unused.txt"]), BPETokenizer(), overwrite=True,
                   first_checkpoint=interrupted)
    assert listing(out.path) == ["notes.txt"]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_holding_a_users_run_file_names_is_never_written(overwrite, tmp_path, corpus, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("my: own config\n")
    code, _, err = run_cli(capsys, *train_args(out, corpus, *overwrite))
    assert code == 2
    assert_one_line_error(err)
    assert "config.yaml" in err
    assert listing(out) == ["config.yaml"]
    assert (out / "config.yaml").read_text() == "my: own config\n"


_HOLDER = """
import sys, time
from xpmodel.train.rundir import RunDir
with RunDir(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(60)
"""


def test_one_writer_per_run_and_kill_9_frees_the_lock(run, corpus, capsys):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run.path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for args in (["train", "--resume", run.path, "train.max_iters=35"],
                     train_args(run.path, corpus, "--overwrite")):
            code, _, err = run_cli(capsys, *args)
            assert code == 2
            assert_one_line_error(err)
            assert "in use by another xpmodel process" in err and f"pid {holder.pid} " in err
        assert run.checkpoint_steps() == [20, 30]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run.lock_path.exists()   # left behind by the killed holder, but not held
    code, _, err = run_cli(capsys, "train", "--resume", run.path, "train.max_iters=35")
    assert code == 0, err
    assert run.checkpoint_steps()[-1] == 35
    assert not run.lock_path.exists()


def test_a_stale_lock_without_flock_is_judged_by_its_pid(tmp_path):
    from xpmodel.train import runlock
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not runlock._holder_alive({"pid": dead.pid, "host": socket.gethostname()})
    assert runlock._holder_alive({"pid": os.getpid(), "host": socket.gethostname()})
    assert runlock._holder_alive({"pid": dead.pid, "host": "another-host"})


def test_an_output_that_is_an_input_is_refused(run, corpus, tmp_path, capsys):
    tokenizer = tmp_path / "tok.json"
    BPETokenizer().save(tokenizer)
    before = corpus.read_bytes()
    config_as_png = tmp_path / "config.png"
    config_as_png.symlink_to(run.config_path)
    config_text = run.config_path.read_bytes()
    an_input = "is also an input of this command"
    cases = [   # (arguments, why the output is refused)
        (["prepare", corpus, "--tokenizer", tokenizer, "--out", corpus], an_input),
        (["prepare", corpus, "--tokenizer", tokenizer, "--out", tokenizer], an_input),
        (["tokenizer", "train", corpus, "--vocab-size", 300, "--out", corpus], an_input),
        (["plot", run.path, "--out", run.checkpoint_dir / "step-00000030.png"],
         "is one of the files of the run"),
        (["plot", run.path, "--out", config_as_png, "--overwrite"], "is one of the files of the run"),
        (["import-hf", run.path, "--out", run.path, "--overwrite"], "which the import reads"),
        (["export-hf", run.path, run.path / "hf"], "overlaps the run"),
        (["train", "--config", TINY, "--device", "cpu", "--out", run.path, "--overwrite",
          "--init-from", run.path, f"data.source={corpus}"], "the folder --init-from reads"),
        (["train", "--config", TINY, "--device", "cpu", "--out", run.path / "sub",
          "--init-from", run.path, f"data.source={corpus}"], "the folder --init-from reads"),
        (["train", "--config", TINY, "--device", "cpu", "--out", run.path.parent, "--overwrite",
          "--init-from", run.path, f"data.source={corpus}"], "the folder --init-from reads"),
    ]
    for args, why in cases:
        code, _, err = run_cli(capsys, *args)
        assert code == 2, (args, err)
        assert_one_line_error(err)
        assert why in err, (args, err)
    assert run.config_path.read_bytes() == config_text
    assert corpus.read_bytes() == before
    assert BPETokenizer.load(tokenizer) == BPETokenizer()
    assert run.is_run() and run.checkpoint_steps() == [20, 30]
    assert not (run.path / "hf").exists() and not (run.path / "sub").exists()


def test_the_python_api_refuses_a_run_inside_the_folder_it_starts_from(run, corpus):
    config = load_config(TINY, [f"data.source={corpus}", f"train.init_from={run.path}"])
    for out in (run.path / "sub", run.path):
        with pytest.raises(UsageError, match="the folder --init-from reads"):
            Trainer.start(config, device="cpu", out=out, overwrite=True, show=False)
    assert run.is_run() and run.checkpoint_steps() == [20, 30]
    assert not (run.path / "sub").exists()


def test_lr_find_never_writes_over_the_model_it_starts_from(run, corpus, tmp_path, capsys):
    """lr-find --out NAME.png writes NAME.json beside it: never over a file of
    train.init_from's folder (its config.json, tokenizer.json), even with
    --overwrite, nor through a link to one."""
    hf = tmp_path / "hf"
    code, _, err = run_cli(capsys, "export-hf", run.path, hf)
    assert code == 0, err
    before = {path.name: path.read_bytes() for path in hf.iterdir()}
    (tmp_path / "link.json").symlink_to(hf / "vocab.json")
    for out, culprit in ((hf / "config.png", hf / "config.json"),
                         (hf / "tokenizer.png", hf / "tokenizer.json"),
                         (tmp_path / "link.png", hf / "vocab.json")):
        code, text, err = run_cli(capsys, "lr-find", "--config", TINY, f"data.source={corpus}",
                                  f"train.init_from={hf}", "--steps", 10, "--out", out,
                                  "--overwrite")
        assert code == 2, err
        assert_one_line_error(err)
        assert f"is {culprit}, a file of {hf}, an input of this command" in err
        assert "suggested" not in text
    assert {path.name: path.read_bytes() for path in hf.iterdir()} == before


def test_a_run_whose_config_describes_a_huge_model_is_refused_before_allocating(run, tmp_path,
                                                                               capsys, monkeypatch):
    """config.yaml edited to model.n_layer: 1000000000: sample, eval and
    export-hf name it at once, before listing a billion layers' parameters."""
    import xpmodel.train.runs as runs
    real = runs.parameter_shapes

    def bounded(config):
        assert config.n_layer < 100, "parameter_shapes of the config's model before a size check"
        return real(config)

    monkeypatch.setattr(runs, "parameter_shapes", bounded)
    text = run.config_path.read_text()
    assert "  n_layer: 1\n" in text
    run.config_path.write_text(text.replace("  n_layer: 1\n", "  n_layer: 1000000000\n"))
    for args in (["sample", run.path, "--max-new-tokens", 2], ["eval", run.path, "--batches", 1],
                 ["export-hf", run.path, tmp_path / "hf"]):
        code, _, err = run_cli(capsys, *args)
        assert code == 1, err
        assert_one_line_error(err)
        assert f"but {run.config_path} describes a model of" in err
        assert "model.n_layer=1000000000" in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("edit", [("val_fraction: 0.1", "val_fraction: 0.2"),
                                  ("source: ", "source: elsewhere-")])
def test_resume_refuses_a_hand_edited_data_setting(edit, run, capsys):
    text = run.config_path.read_text()
    assert edit[0] in text
    run.config_path.write_text(text.replace(edit[0], edit[1]))
    code, _, err = run_cli(capsys, "train", "--resume", run.path, "train.max_iters=35")
    assert code == 1
    assert_one_line_error(err)
    assert "config.yaml: data." in err and "--init-from" in err
    assert run.checkpoint_steps() == [20, 30]


def test_train_never_writes_a_run_over_the_config_it_reads(run, corpus, tmp_path, capsys):
    """--config RUN/config.yaml --out RUN, directly or as a child's base."""
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {run.config_path}\n")
    before = {path: path.read_bytes() for path in run.path.rglob("*") if path.is_file()}
    for config in (run.config_path, child):
        code, _, err = run_cli(capsys, "train", "--config", config, "--out", run.path,
                               "--overwrite", "train.max_iters=10")
        assert code == 2, err
        assert_one_line_error(err)
        assert f"--out {run.path}: holds {run.config_path} among its run files" in err
    assert {path: path.read_bytes() for path in run.path.rglob("*") if path.is_file()} == before


def test_the_untrained_step_0_checkpoint_is_not_kept(tmp_path, corpus):
    config = load_config(TINY, [f"data.source={corpus}", "train.max_iters=20", "train.keep_last=3"])
    Trainer.start(config, device="cpu", out=tmp_path / "run", show=False).run()
    assert RunDir(tmp_path / "run").checkpoint_steps() == [10, 20]


# ---- bound every input ---------------------------------------------------------------

_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(9))


@pytest.mark.parametrize("text, culprit", [
    ("train:\n  sample_prompt: " + _BOMB.replace("\n", "\n  ").replace("a: &a", "&a", 1), "values"),
    ("train:\n  lr: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    ("train:\n  sample_prompt: " + "x" * (2 << 20) + "\n", "bytes"),
    ("train:\n  sample_prompt: " + "x" * 100_000 + "\n", "train.sample_prompt"),
    ("train:\n  lr: 2024-13-45\n", "invalid YAML value"),
    ("train:\n  lr: &x [1, *x]\n", "alias"),
])
def test_crafted_yaml_is_refused_quickly_naming_the_file(text, culprit, tmp_path, capsys):
    path = tmp_path / "crafted.yaml"
    path.write_text(text)
    started = time.perf_counter()
    code, _, err = run_cli(capsys, "train", "--config", path, "--out", tmp_path / "run")
    assert time.perf_counter() - started < 5
    assert code == 2, err
    assert_one_line_error(err)
    assert str(path) in err and culprit in err
    assert len(err) < 600
    assert not (tmp_path / "run").exists()


def test_an_alias_bomb_in_an_override_is_refused(tmp_path, capsys):
    bomb = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x, x]"] + ["*a"] * 2000) + "]"
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "run", f"train.lr={bomb}")
    assert code == 2
    assert_one_line_error(err)
    assert "train.lr" in err and len(err) < 600


@pytest.mark.parametrize("make", ["device", "fifo"])
def test_a_config_base_that_is_not_a_file_is_refused(make, tmp_path, capsys):
    if make == "device":
        special = Path("/dev/zero")
    else:
        special = tmp_path / "pipe.yaml"
        os.mkfifo(special)
    path = tmp_path / "config.yaml"
    path.write_text(f"base: {special}\n")
    code, _, err = run_cli(capsys, "train", "--config", path, "--out", tmp_path / "run")
    assert code == 2
    assert_one_line_error(err)
    assert str(special) in err and ("device" in err or "FIFO" in err)


def test_special_files_where_data_tokenizers_and_checkpoints_are_expected(run, tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, _, err = run_cli(capsys, "train", "--config", TINY, "--out", tmp_path / "new",
                           f"data.source={fifo}")
    assert code == 1 and "FIFO" in err and str(fifo) in err
    code, _, err = run_cli(capsys, "prepare", tmp_path / "..", "--tokenizer", fifo)
    assert code == 1 and "FIFO" in err and str(fifo) in err
    run.best_path.unlink()
    for step in run.checkpoint_steps():
        run.step_path(step).unlink()
    os.mkfifo(run.step_path(40))
    code, _, err = run_cli(capsys, "sample", run.path, "--max-new-tokens", 2)
    assert code == 1
    assert_one_line_error(err)
    assert "step-00000040.safetensors" in err and "FIFO" in err


def test_a_glob_through_a_link_that_loops_ends(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "one.txt").write_text("one")
    (tmp_path / "top.txt").write_text("top")
    (tmp_path / "a" / "b" / "up").symlink_to("..")
    (tmp_path / "a" / "root").symlink_to(tmp_path)
    started = time.perf_counter()
    source = resolve_source(str(tmp_path / "**" / "*.txt"))
    assert time.perf_counter() - started < 2
    assert [p.name for p in source.files] == ["one.txt", "top.txt"]


@pytest.mark.parametrize("source, out", [
    ("gg/**", "gg/run"),                  # the glob would read the run's checkpoints back
    ("gg/*/*", "gg/run"),
    ("gg", "gg/run"),                     # a folder holding the run
    ("gg/corpus.txt", "gg"),              # a run folder holding the corpus
    ("gg", "gg"),
])
def test_an_out_the_data_source_reaches_into_is_refused(source, out, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_corpus((tmp_path / "gg").mkdir() or tmp_path / "gg" / "corpus.txt")
    code, _, err = run_cli(capsys, *train_args(out, source, "--overwrite"))
    assert code == 2
    assert_one_line_error(err)
    assert f"--out {out}: data.source '{tmp_path / source}' reaches into it" in err
    assert listing(tmp_path / "gg") == ["corpus.txt"]


def test_a_data_source_beside_the_run_is_not_refused(tmp_path, monkeypatch):
    from xpmodel.data.sources import reads_from
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gg").mkdir()
    for source in ("gg/*.txt", "*.txt", "gg/other/*", "gg/corpus.txt", "shakespeare"):
        assert not reads_from(source, "gg/run"), source
    assert not reads_from("gg/.*/*", "gg/run") and reads_from("gg/.*/*", "gg/.run")


def test_an_empty_data_source_is_an_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--config", TINY, "--out", tmp_path / "run", "data.source=")
    assert code == 2
    assert_one_line_error(err)
    assert "data.source must not be empty" in err


def test_crafted_tokenizer_files_are_refused_from_their_sizes(tmp_path):
    doubling = [[256 + k - 1, 256 + k - 1] if k else [97, 97] for k in range(41)]   # 2^41 bytes
    path = tmp_path / "tok.json"
    path.write_text(json.dumps({"format": "xpmodel-bpe-tokenizer", "version": 1, "pre_tokenizer": "gpt2",
                                "special_tokens": [], "merges": doubling}))
    started = time.perf_counter()
    with pytest.raises(DataError, match="merge 14 builds a token of 32,768 bytes") as failure:
        BPETokenizer.load(path)
    assert str(path) in str(failure.value)
    assert time.perf_counter() - started < 1
    with pytest.raises(UsageError, match="more than the 1,048,576 ids"):
        BPETokenizer([(97, 97)] * MAX_VOCAB)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        BPETokenizer.load(path)


def test_deeply_nested_run_files_are_named(run, capsys):
    run.marker.write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = run_cli(capsys, "sample", run.path, "--max-new-tokens", 2)
    assert code == 1
    assert_one_line_error(err)
    assert "run.json" in err


# ---- one clear line for every error --------------------------------------------------

def test_sample_and_eval_name_the_damaged_checkpoint(run, capsys):
    run.best_path.unlink()
    for step in run.checkpoint_steps():
        data = run.step_path(step).read_bytes()
        run.step_path(step).write_bytes(data[:len(data) // 2])
    for args in (["sample", run.path, "--max-new-tokens", 2], ["eval", run.path, "--batches", 1]):
        code, _, err = run_cli(capsys, *args)
        assert code == 1
        assert_one_line_error(err)
        assert "step-00000030.safetensors: truncated" in err


def _rewrite_meta(path, **changes):
    n = TINY_GPT.num_params()
    meta, params, optim = load_checkpoint(path, dict(parameter_shapes(TINY_GPT)), {"m": n, "v": n})
    meta = {k: v for k, v in meta.items() if k not in ("format", "format_version")}
    save_checkpoint(path, params, optim, dict(meta, **changes))


@pytest.mark.parametrize("change", [{"sampler": "a string"}, {"optimizer_steps": "7"},
                                    {"elapsed": [1]}])
def test_malformed_checkpoint_metadata_names_the_file(change, run, capsys):
    for step in run.checkpoint_steps():
        _rewrite_meta(run.step_path(step), **change)
    code, _, err = run_cli(capsys, "train", "--resume", run.path, "train.max_iters=35")
    assert code == 1
    assert_one_line_error(err)
    assert "step-00000030.safetensors" in err and next(iter(change)) in err


def test_a_damaged_metrics_line_is_skipped_with_a_warning(run, capsys):
    lines = run.metrics_path.read_text().splitlines()
    lines[3] = "[1, 2, 3]"
    lines[5] = '"just a string"'
    run.metrics_path.write_text("\n".join(lines) + "\n")
    records = run.read_metrics()
    assert len(records) == len(lines) - 2
    assert "skipped 2 damaged lines (line 4, 6)" in capsys.readouterr().err
    code, _, err = run_cli(capsys, "train", "--resume", run.path, "train.max_iters=35")
    assert code == 0, err
    assert "metrics.jsonl: skipped 2 damaged lines" in err


def test_a_damaged_token_file_is_named_and_a_damaged_cache_rebuilt(run, finished, capsys):
    token_file = next((finished.parent / "cache" / "tokens").glob("*.tok"))
    shutil.copy(token_file, token_file.with_name("backup"))
    try:
        with open(token_file, "r+b") as f:
            f.seek(HEADER_BYTES + 2 * 100)
            f.write(numpy.array([300], dtype="<u2").tobytes())
        with pytest.raises(DataError) as error:     # the id check, for a file no checksum guards
            read_token_file(token_file, vocab_size=257)
        assert str(token_file) in str(error.value) and "token id 300" in str(error.value)
        code, _, err = run_cli(capsys, "eval", run.path, "--batches", 1)
        assert code == 0, err                       # the cache's checksum finds it: rebuilt, not used
        assert "do not match their checksum; rebuilding" in err
        assert numpy.array_equal(read_token_file(token_file), read_token_file(token_file.with_name("backup")))
    finally:
        shutil.copy(token_file.with_name("backup"), token_file)


def test_flag_values_are_named(run, capsys):
    for args, flag in ((["--seed", "-1"], "--seed"), (["--prompt", "caf\udce9"], "--prompt"),
                       (["--max-new-tokens", "-2"], "--max-new-tokens")):
        code, out, err = run_cli(capsys, "sample", run.path, *args)
        assert code == 2, err
        assert_one_line_error(err)
        assert err.startswith(f"error: {flag}")
        assert out == ""


def test_messages_quote_at_most_a_few_hundred_characters_of_input(tmp_path, capsys):
    for override in ("train.learning_rate=" + "x" * 100_000, "train.lr=" + "x" * 100_000,
                     "x" * 100_000 + "=1"):
        code, _, err = run_cli(capsys, "train", "--out", tmp_path / "run", override)
        assert code == 2
        assert_one_line_error(err)
        assert err.count("x") < 250


def test_a_system_error_on_a_very_long_path_keeps_its_reason(tmp_path, capsys):
    """An OSError's message shows the two ends of a long file name, and the reason
    whole; a name too long names nothing, so it is a mistake in the SOURCE given."""
    pattern = "/".join(["abcdefgh"] * 1500) + "/*.txt"
    code, _, err = run_cli(capsys, "tokenizer", "train", pattern, "--vocab-size", 300,
                           "--out", tmp_path / "tok.json")
    assert code == 2 and err.startswith("error: SOURCE abcdefgh/")
    assert_one_line_error(err)
    assert err.rstrip().endswith(": File name too long"), err
    assert len(err) < 300 and "abcdefgh/*.txt" in err


def test_no_traceback_even_when_the_error_handler_runs_out_of_memory(run, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr("xpmodel.cli.commands.plot_command", out_of_memory)
    monkeypatch.setattr(cli, "_describe", out_of_memory)
    code, _, err = run_cli(capsys, "plot", run.path)
    assert code == 1
    assert_one_line_error(err)
    assert "out of memory" in err


def test_a_mistyped_run_directory_suggests_the_closest_run(run, capsys):
    code, _, err = run_cli(capsys, "sample", run.path.with_name("rnu"))
    assert code == 2
    assert_one_line_error(err)
    assert f"did you mean {run.path}?" in err


# ---- the first hour ------------------------------------------------------------------

def test_a_short_run_is_one_override():
    notes = []
    config = load_config(None, ["train.max_iters=60"], notify=notes.append)
    assert config.train.warmup_iters == round(100 * 60 / 700)
    assert len(notes) == 1 and "train.warmup_iters=9" in notes[0]
    config = load_config(None, ["train.max_iters=60", "train.lr_decay_iters=2000",
                                "train.warmup_iters=5"], notify=notes.append)
    assert (config.train.warmup_iters, config.train.lr_decay_iters) == (5, 2000)
    with pytest.raises(UsageError, match="warmup_iters"):
        load_config(None, ["train.max_iters=60", "train.warmup_iters=100"])


def test_a_run_made_longer_keeps_a_decay_set_past_its_end(tmp_path, capsys):
    """A decay planned past the end (train part of it, then extend) is kept
    when a later layer or a resume makes the run longer, so the extended run
    is the one planned: resumed, it equals the run trained in one go."""
    base = tmp_path / "base.yaml"
    base.write_text("base: default\ntrain:\n  max_iters: 6\n  warmup_iters: 2\n  lr_decay_iters: 21\n")
    notes = []
    config = load_config(base, ["train.max_iters=9"], notify=notes.append)
    assert (config.train.max_iters, config.train.lr_decay_iters, notes) == (9, 21, [])
    corpus = write_corpus(tmp_path / "corpus.txt")
    common = ["--config", TINY, "--device", "cpu", f"data.source={corpus}", "train.warmup_iters=2",
              "train.lr_decay_iters=21", "train.lr=0.01", "train.min_lr=0"]
    assert run_cli(capsys, "train", "--out", tmp_path / "whole", *common, "train.max_iters=9")[0] == 0
    assert run_cli(capsys, "train", "--out", tmp_path / "part", *common, "train.max_iters=6")[0] == 0
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "part", "train.max_iters=9")
    assert code == 0, err
    assert load_config(tmp_path / "part" / "config.yaml").train.lr_decay_iters == 21
    whole, part = (load_file(tmp_path / run / "checkpoints" / "step-00000009.safetensors")
                   for run in ("whole", "part"))
    assert whole.keys() == part.keys()
    for name in whole:
        numpy.testing.assert_array_equal(whole[name], part[name])


@pytest.mark.parametrize("config, mistake", [("default", "train.epochs=1"),
                                             ("default", "model.n_head=7"),
                                             ("shakespeare-char-cpu", "data.vocab_size=300")])
def test_a_config_mistake_is_the_only_line_not_after_a_schedule_note(config, mistake, capsys):
    """A run shortened below its warmup gets a note, but only once the config is valid."""
    code, out, err = run_cli(capsys, "train", "--config", config, "train.max_iters=5", mistake)
    assert code == 2 and out == ""
    assert_one_line_error(err)


def test_a_second_run_says_where_it_goes_before_training(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny-run").mkdir(parents=True)
    code, out, err = run_cli(capsys, "train", "--config", TINY, "--device", "cpu",
                             f"data.source={corpus}", "train.max_iters=10")
    assert code == 0, err
    lines = out.splitlines()
    where = next(i for i, line in enumerate(lines) if "this run goes to runs/tiny-run-2" in line)
    header = next(i for i, line in enumerate(lines) if line.startswith("run runs/tiny-run-2: cpu,"))
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step "))
    assert where < header < first_step
    assert f"{TINY_GPT.num_params():,} parameters" in lines[header]
    assert "64 tokens/step, fp32" in lines[header]
    assert "xpmodel train --resume runs/tiny-run-2" in lines[header]


def test_every_option_of_every_command_has_help():
    missing = []

    def walk(parser, name):
        for action in parser._actions:
            if action.help in (None, "") and not action.choices.__class__.__name__ == "dict":
                missing.append(f"{name} {action.option_strings or action.dest}")
            if action.choices and isinstance(action.choices, dict):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}")

    walk(cli.build_parser(), "xpmodel")
    assert missing == []


def test_train_help_lists_the_shipped_configs(capsys):
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0
    assert "shipped configs: default," in out and "shakespeare-char" in out


def test_files_follow_the_umask(tmp_path, corpus, capsys):
    old = os.umask(0o027)
    try:
        code, _, err = run_cli(capsys, *train_args(tmp_path / "run", corpus, "train.max_iters=10"))
        tokenizer = tmp_path / "tok.json"
        assert run_cli(capsys, "tokenizer", "train", corpus, "--vocab-size", 260, "--out", tokenizer)[0] == 0
    finally:
        os.umask(old)
    assert code == 0, err
    written = [*(tmp_path / "cache" / "tokens").iterdir(), *(tmp_path / "run").rglob("*.*"), tokenizer]
    assert written and all(p.stat().st_mode & 0o777 == 0o640 for p in written if p.is_file()), \
        [(p.name, oct(p.stat().st_mode)) for p in written]


def test_streamed_samples_hold_back_split_utf8_characters(run, capsys, monkeypatch):
    text = "café ☃ 🙂"
    ids = list(text.encode("utf-8"))   # the byte tokenizer: one id per byte

    def generate(model, prompt, max_new_tokens, **kwargs):
        yield from ids[:max_new_tokens]

    monkeypatch.setattr("xpmodel.model.generate.generate", generate)
    written = []
    monkeypatch.setattr(sys, "stdout", type("Out", (), {"write": lambda self, s: written.append(s),
                                                        "flush": lambda self: None})())
    code = cli.main(["sample", str(run.path), "--prompt", ">", "--max-new-tokens", str(len(ids))])
    assert code == 0
    assert "".join(written) == ">" + text + "\n"
    assert not any("\ufffd" in piece for piece in written)
    written.clear()
    cli.main(["sample", str(run.path), "--prompt", ">", "--max-new-tokens", str(len(ids) - 1)])
    assert "".join(written) == ">" + text[:-1] + "\ufffd\n"   # cut inside the last character


def test_the_log_line_starts_with_step_and_eta_and_fits_80_columns(capsys):
    from xpmodel.train.display import TrainDisplay
    with TrainDisplay(7000, quiet=True) as display:
        for step in (10, 20):
            display.step(step, 2.34567, 3e-4, 0.51234, 12345.6, log_line=True)
        display.validation({"step": 20, "val_loss": 2.45678, "val_perplexity": 11.6}, True)
        display.step(30, 2.3, 3e-4, 0.5, 12345.6, log_line=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("step 10/7000 eta -:--:-- loss~ 2.3457")
    assert lines[1].startswith("step 20/7000 eta ")
    assert "val 2.4568" in lines[3]
    assert all(len(line) <= 80 for line in lines), lines


def test_a_diverged_loss_is_shown_with_a_short_perplexity_and_the_summary_is_made(tmp_path,
                                                                                   capsys):
    """exp(800) overflows a float: a val loss above about 709.8 ended the run
    with OverflowError when the summary was made, and an eval line printed a
    perplexity of 305 digits."""
    from xpmodel.train.display import TrainDisplay
    corpus = write_corpus(tmp_path / "corpus.txt")
    trainer = Trainer.start(load_config(TINY, [f"data.source={corpus}"]), device="cpu",
                            out=tmp_path / "run", show=False)
    trainer.last_val = 800.0
    summary = trainer._summary(1.0, "done")
    assert summary["val_perplexity"] == math.exp(700)
    with TrainDisplay(100, quiet=True) as display:
        display.validation({"step": 20, "val_loss": 800.0, "val_perplexity": math.exp(700),
                            "train_loss": 750.0, "train_perplexity": math.exp(700), "gap": 50.0},
                           False)
    line = capsys.readouterr().out.splitlines()[-1]
    assert "perplexity 1.01e+304 val, 1.01e+304 train" in line and len(line) < 120, line


def test_hugging_face_tokenizer_files_are_bounded(tmp_path):
    from xpmodel.tokenizer.hf_import import read_hf_tokenizer
    (tmp_path / "tokenizer.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"tokenizer.json: tokenizer file is not valid JSON \(nested too deeply"):
        read_hf_tokenizer(tmp_path)
    vocab = {f"t{i}": i for i in range(MAX_VOCAB + 1)}
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}}))
    with pytest.raises(DataError, match="a vocab of 1,048,577 tokens, more than the 1,048,576"):
        read_hf_tokenizer(tmp_path)


def test_exported_tokenizer_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        export_tokenizer_hf(BPETokenizer(), tmp_path / "hf")
    finally:
        os.umask(old)
    files = list((tmp_path / "hf").iterdir())
    assert files and all(p.stat().st_mode & 0o777 == 0o644 for p in files)


@pytest.mark.parametrize("recompute,advice", [("none", "train.recompute=mlp or block"),
                                              ("mlp", "train.recompute=block"), ("block", None)])
def test_running_out_of_memory_in_a_step_names_what_to_lower(tmp_path, recompute, advice):
    corpus = write_corpus(tmp_path / "corpus.txt", lines=200)
    config = load_config(TINY, [f"data.source={corpus}", f"train.recompute={recompute}"])
    trainer = Trainer.start(config, device="cpu", out=tmp_path / "run", show=False)

    def out_of_memory(*args, **kwargs):
        raise MemoryError
    trainer.model.forward_backward = out_of_memory
    with pytest.raises(XpmodelError) as error:
        trainer.run()
    message = str(error.value)
    assert message.startswith("out of memory (MemoryError): lower train.batch_size") and "\n" not in message
    if advice:
        assert advice in message
    else:
        assert "train.recompute" not in message
