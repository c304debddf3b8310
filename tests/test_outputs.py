"""Where commands write: a user-named output is never one of the command's
inputs or a run's own files, and an existing file is replaced only with
--overwrite (train/outputs.py: check_output / check_output_dir), checked before any slow
work. Also: training outlives a closed stdout, --workers is bounded, an empty
config is refused, and the one-line messages of the new-user audit."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from cli_helpers import assert_one_line_error, copy_run, run_cli, train_tiny_run, write_corpus
from config_reads import count_config_reads, two_level_chain
from xpmodel.cli import main as cli
from xpmodel.errors import XpmodelError
from xpmodel.train.rundir import RunDir
from xpmodel.tokenizer.bpe import BPETokenizer

TINY = Path(__file__).resolve().parent / "tiny-run.yaml"
try:
    import matplotlib
    HAVE_MATPLOTLIB = bool(matplotlib)
except ImportError:
    HAVE_MATPLOTLIB = False


pytestmark = pytest.mark.usefixtures("private_cache")   # each test's own XPMODEL_CACHE


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 30-step tiny run; tests copy it before changing it."""
    return train_tiny_run(tmp_path_factory.mktemp("outputs"))


@pytest.fixture
def run(trained, tmp_path):
    return copy_run(trained, tmp_path)


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt", lines=200)


def snapshot(folder):
    """{relative path: bytes} of every file below `folder`."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def refused(capsys, *args, code=2):
    got, out, err = run_cli(capsys, *args)
    assert got == code, (args, out, err)
    assert_one_line_error(err)
    return out, err


# ---- 0. two commands given the same new output at once ---------------------------------

def _written_meanwhile(monkeypatch, files):
    """Make another process's `files` ({path: bytes}, in one folder) appear
    between the command's check of its outputs and its first write there."""
    import xpmodel.atomic as atomic
    clean = atomic.remove_stale_temporaries   # the first step of every write

    def first_write(folder, is_target):
        for path, data in files.items():
            if Path(folder) == path.parent and not path.exists():
                path.write_bytes(data)
        return clean(folder, is_target)
    monkeypatch.setattr(atomic, "remove_stale_temporaries", first_write)


@pytest.mark.parametrize("command", ["tokenizer", "prepare", "plot", "lr-find"])
def test_a_new_output_another_process_wrote_meanwhile_is_kept(command, capsys, run, corpus,
                                                              tmp_path, monkeypatch):
    if command in ("plot", "lr-find") and not HAVE_MATPLOTLIB:
        pytest.skip("the plot needs matplotlib")
    tokenizer = tmp_path / "tok.json"
    BPETokenizer().save(tokenizer)
    out = tmp_path / "theirs" / {"tokenizer": "t.json", "prepare": "x.bin"}.get(command, "p.png")
    args = {"tokenizer": ["tokenizer", "train", corpus, "--vocab-size", 260, "--out", out],
            "prepare": ["prepare", corpus, "--tokenizer", tokenizer, "--out", out],
            "plot": ["plot", run, "--out", out],
            "lr-find": ["lr-find", "--config", run, "--out", out, "--steps", 10]}[command]
    partner = {"prepare": out.with_name("x.bin.json"), "lr-find": out.with_suffix(".json")}
    theirs = {out: b"theirs", **({partner[command]: b"their numbers"} if command in partner else {})}
    _written_meanwhile(monkeypatch, theirs)
    _, err = refused(capsys, *args, code=1)
    assert "another process wrote this file while this command ran" in err
    assert {path: path.read_bytes() for path in theirs} == theirs
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(p.name for p in theirs)


# ---- 1. outputs: tokenizer train ------------------------------------------------------

def test_tokenizer_train_refuses_an_existing_out_unless_overwrite(capsys, tmp_path, corpus):
    mine = tmp_path / "u1.json"
    mine.write_text("my notes")
    _, err = refused(capsys, "tokenizer", "train", corpus, "--vocab-size", 260, "--out", mine)
    assert f"--out {mine}: already exists" in err and "--overwrite" in err
    assert mine.read_text() == "my notes"
    code, _, err = run_cli(capsys, "tokenizer", "train", corpus, "--vocab-size", 260, "--out",
                           mine, "--overwrite")
    assert code == 0, err
    assert BPETokenizer.load(mine).vocab_size == 260


def test_tokenizer_train_never_writes_a_runs_files(capsys, run, corpus, tmp_path):
    before = snapshot(run)
    for args in (["--out", run / "tokenizer.json"], ["--out", run / "checkpoints" / "t.json"],
                 ["--out", tmp_path / "t.json", "--export-hf", run],
                 ["--out", tmp_path / "t.json", "--export-hf", run / "checkpoints"]):
        _, err = refused(capsys, "tokenizer", "train", corpus, "--vocab-size", 260, *args,
                         "--overwrite")
        assert "even with --overwrite" in err, err
    assert snapshot(run) == before
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("earlier", [False, True])
def test_tokenizer_train_with_export_hf_on_a_full_disk_changes_neither_output(
        earlier, capsys, tmp_path, corpus, monkeypatch):
    """--out's data is written first and put in place after the export; the
    export writes every file aside before renaming any: a full disk met in
    the export (its vocab.json) leaves both outputs as they were, whether new
    (then absent) or an earlier run's (then whole)."""
    import xpmodel.atomic as atomic
    out, hf = tmp_path / "t.json", tmp_path / "hf"
    command = ["tokenizer", "train", corpus, "--out", out, "--export-hf", hf, "--overwrite"]
    if earlier:
        assert run_cli(capsys, *command, "--vocab-size", 260)[0] == 0
        (hf / "README.md").write_text("mine")
    before, names = snapshot(tmp_path), sorted(tmp_path.rglob("*"))   # folders, temporaries too
    real_write = atomic._TargetFile.write

    def full_at_the_vocab(self, data):
        if self._target.name == "vocab.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self._target))
        return real_write(self, data)
    monkeypatch.setattr(atomic._TargetFile, "write", full_at_the_vocab)
    _, err = refused(capsys, *command, "--vocab-size", 300, code=1)
    assert "vocab.json: No space left on device" in err
    assert snapshot(tmp_path) == before and sorted(tmp_path.rglob("*")) == names


def test_tokenizer_train_export_hf_refuses_a_model_folder_and_a_non_empty_one(capsys, tmp_path,
                                                                               corpus):
    model = tmp_path / "hf" / "my-gpt2"
    model.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "xpmodel_export.json"):
        (model / name).write_text("{}")
    before = snapshot(model)
    _, err = refused(capsys, "tokenizer", "train", corpus, "--vocab-size", 260,
                     "--out", tmp_path / "t.json", "--export-hf", model, "--overwrite")
    assert "holds a model" in err and str(model) in err
    assert snapshot(model) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep")
    _, err = refused(capsys, "tokenizer", "train", corpus, "--vocab-size", 260,
                     "--out", tmp_path / "t.json", "--export-hf", other)
    assert "is not empty" in err
    _, err = refused(capsys, "tokenizer", "train", corpus, "--vocab-size", 260,
                     "--out", tmp_path / "new" / "tokenizer.json", "--export-hf", tmp_path / "new")
    assert "inside --export-hf" in err
    code, _, err = run_cli(capsys, "tokenizer", "train", corpus, "--vocab-size", 260,
                           "--out", tmp_path / "t.json", "--export-hf", other, "--overwrite")
    assert code == 0, err
    assert (other / "todo.txt").read_text() == "keep" and (other / "tokenizer.json").is_file()


def test_tokenizer_train_export_hf_inside_its_corpus_folder_is_refused(capsys, tmp_path, corpus):
    folder = tmp_path / "corpus"
    folder.mkdir()
    shutil.copy(corpus, folder / "a.txt")
    _, err = refused(capsys, "tokenizer", "train", folder, "--vocab-size", 260,
                     "--out", tmp_path / "t.json", "--export-hf", folder / "hf")
    assert f"--export-hf {folder / 'hf'}: SOURCE '{folder}' reaches into it" in err
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt"] and not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("link", [os.symlink, os.link])
def test_tokenizer_train_export_hf_replaces_a_linked_merges_txt(link, capsys, tmp_path, corpus):
    """An export folder whose merges.txt links to the corpus: the export
    replaces the link and the corpus is left as it was."""
    before = corpus.read_bytes()
    export = tmp_path / "hf"
    export.mkdir()
    link(corpus, export / "merges.txt")
    code, _, err = run_cli(capsys, "tokenizer", "train", corpus, "--vocab-size", 260,
                           "--out", tmp_path / "t.json", "--export-hf", export, "--overwrite")
    assert code == 0, err
    assert corpus.read_bytes() == before
    assert not (export / "merges.txt").is_symlink()
    assert (export / "merges.txt").read_text().startswith("#version: 0.2\n")


# ---- 1. outputs: prepare --------------------------------------------------------------

def test_prepare_refuses_an_existing_token_file_or_sidecar_unless_overwrite(capsys, tmp_path,
                                                                             corpus):
    tokenizer = tmp_path / "tok.json"
    BPETokenizer().save(tokenizer)
    out = tmp_path / "c.tok"
    for existing in (out, Path(f"{out}.json")):
        existing.write_text("mine")
        _, err = refused(capsys, "prepare", corpus, "--tokenizer", tokenizer, "--out", out)
        assert f"--out {existing}: already exists" in err
        assert existing.read_text() == "mine"
        existing.unlink()
    out.write_text("mine")
    code, text, err = run_cli(capsys, "prepare", corpus, "--tokenizer", tokenizer, "--out", out,
                              "--overwrite", "--workers", 1)
    assert code == 0, err
    assert out.read_bytes() != b"mine" and f"tokens to {out}" in text


def test_prepare_caps_workers_to_the_cores(capsys, tmp_path, corpus, monkeypatch):
    from xpmodel.cli import commands
    tokenizer = tmp_path / "tok.json"
    BPETokenizer().save(tokenizer)
    monkeypatch.setattr(commands, "usable_cores", lambda: 1)
    code, _, err = run_cli(capsys, "prepare", corpus, "--tokenizer", tokenizer, "--out",
                           tmp_path / "c.tok", "--workers", 100000)
    assert code == 0, err
    assert err.strip() == "note: --workers 100000 is more than the 1 cores here; using 1"


# ---- 1. outputs: plot, compare, lr-find -----------------------------------------------

@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="needs matplotlib")
def test_plot_refuses_an_existing_out_unless_overwrite(capsys, run, tmp_path):
    target = tmp_path / "mine.png"
    target.write_bytes(b"my picture")
    _, err = refused(capsys, "plot", run, "--out", target)
    assert f"--out {target}: already exists" in err
    assert target.read_bytes() == b"my picture"
    code, _, err = run_cli(capsys, "plot", run, "--out", target, "--overwrite")
    assert code == 0, err
    assert target.read_bytes()[:4] == b"\x89PNG"
    for _ in range(2):   # the default, RUN_DIR/loss.png, is the run's own plot
        assert run_cli(capsys, "plot", run)[0] == 0


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="needs matplotlib")
def test_compare_checks_its_out_before_printing_the_table(capsys, run, tmp_path):
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"my picture")
    out, err = refused(capsys, "compare", run, "--out", mine)
    assert out == "" and "already exists" in err
    out, err = refused(capsys, "compare", run, "--out", tmp_path / "table.txt")
    assert out == "" and "give a path ending in .png" in err
    code, out, err = run_cli(capsys, "compare", run, "--out", mine, "--overwrite")
    assert code == 0, err
    assert mine.read_bytes()[:4] == b"\x89PNG"


def test_a_missing_input_is_named_before_an_output_in_the_way(capsys, run, tmp_path, monkeypatch):
    """compare RUN and import-hf HF_DIR check what they read before --out."""
    monkeypatch.chdir(tmp_path)
    Path("compare.png").write_bytes(b"my picture")
    _, err = refused(capsys, "compare", "runs/nope")
    assert "runs/nope: no such directory" in err
    _, err = refused(capsys, "compare", run, "runs/nope")
    assert "runs/nope: no such directory" in err
    _, err = refused(capsys, "import-hf", "hf/nope", "--out", run)
    assert err == "error: HF_DIR hf/nope: no such directory\n"
    _, err = refused(capsys, "import-hf", "compare.png", "--out", run)
    assert err == "error: HF_DIR compare.png: not a directory\n"
    Path("full").mkdir()
    Path("full", "notes.txt").write_text("mine")
    for out in ("full", "compare.png"):   # export-hf: the run named before OUT_DIR in the way
        _, err = refused(capsys, "export-hf", "runs/nope", out)
        assert err == "error: RUN_DIR runs/nope: no such directory\n", err
    assert Path("compare.png").read_bytes() == b"my picture"


def test_lr_find_never_writes_over_a_run_and_refuses_an_existing_sidecar(capsys, run, tmp_path):
    before = snapshot(run)
    out, err = refused(capsys, "lr-find", "--config", run, "--out", run / "run.png",
                       "--overwrite", "--steps", 10)
    assert out == "" and "run.json" in err and "even with --overwrite" in err
    assert snapshot(run) == before
    (tmp_path / "lr.json").write_text("mine")   # not lr-find's: --overwrite would not help
    out, err = refused(capsys, "lr-find", "--config", run, "--out", tmp_path / "lr.png",
                       "--steps", 10)
    assert out == "" and f"{tmp_path / 'lr.json'} exists and is not an earlier lr-find's" in err
    assert (tmp_path / "lr.json").read_text() == "mine"
    earlier = dict.fromkeys(["lrs", "losses", "smoothed", "min_lr", "steepest_lr", "suggested_lr",
                             "stopped_early", "rule"], 0)
    (tmp_path / "lr.json").write_text(json.dumps(earlier))   # lr-find's: --overwrite replaces it
    out, err = refused(capsys, "lr-find", "--config", run, "--out", tmp_path / "lr.png",
                       "--steps", 10)
    assert out == "" and f"--out {tmp_path / 'lr.json'}: already exists; pass --overwrite" in err


def test_lr_find_overwrite_replaces_only_what_an_earlier_lr_find_wrote(capsys, run, tmp_path):
    """--overwrite had replaced tok.json, a tokenizer, with lr-find's numbers
    when given for --out tok.png."""
    tokenizer = tmp_path / "tok.json"
    BPETokenizer().save(tokenizer)
    before = tokenizer.read_bytes()
    out, err = refused(capsys, "lr-find", "--config", run, "--out", tmp_path / "tok.png",
                       "--overwrite", "--steps", 10)
    assert out == ""
    assert f"--out {tmp_path / 'tok.png'}: {tokenizer} exists and is not an earlier lr-find's " \
           f"numbers; lr-find will not replace it, even with --overwrite" in err
    assert tokenizer.read_bytes() == before and not (tmp_path / "tok.png").exists()
    notes = tmp_path / "notes.png"
    notes.write_text("my notes")
    out, err = refused(capsys, "lr-find", "--config", run, "--out", notes, "--overwrite",
                       "--steps", 10)
    assert out == "" and f"{notes} exists and is not a PNG image" in err
    assert notes.read_text() == "my notes" and not notes.with_suffix(".json").exists()
    lr = tmp_path / "lr.png"
    for overwrite in ([], ["--overwrite"]):   # an earlier lr-find's plot and numbers are replaced
        code, _, err = run_cli(capsys, "lr-find", "--config", run, "--out", lr, "--steps", 10,
                               *overwrite)
        assert code == 0, err
    assert "suggested_lr" in json.loads(lr.with_suffix(".json").read_text())
    assert lr.exists() == HAVE_MATPLOTLIB


def test_lr_find_never_writes_over_its_configs_base(capsys, corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "lr.json"   # JSON is YAML: a config can be named so
    base.write_text(json.dumps({"base": str(TINY), "data": {"source": str(corpus)}}))
    (tmp_path / "child.yaml").write_text("base: lr.json\n")
    before = base.read_bytes()
    out, err = refused(capsys, "lr-find", "--config", "child.yaml", "--out", "lr.png",
                       "--overwrite", "--steps", 10)
    assert out == "" and "--out lr.json: is also an input" in err
    assert base.read_bytes() == before


def test_train_reads_its_configs_base_chain_once(capsys, corpus, tmp_path, monkeypatch):
    """The files train keeps from writing over (its config and its `base:`
    chain) come from the reading that built the config."""
    parent, child = two_level_chain(tmp_path, TINY, corpus,
                                    "train:\n  max_iters: 2\n  eval_interval: 2\n")
    reads = count_config_reads(monkeypatch)
    code, _, err = run_cli(capsys, "train", "--config", child, "--out", tmp_path / "run", "--quiet")
    assert code == 0, err
    assert reads == [child, parent, TINY]


def test_a_folder_among_the_inputs_stands_for_every_file_in_it(tmp_path):
    """check_output refuses a file of an input folder (a model folder a command
    starts from), at any depth and through a link, even with overwrite; a new
    file beside them is allowed."""
    from xpmodel.errors import UsageError
    from xpmodel.train.outputs import check_output
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "vocab.json").write_text("{}")
    (tmp_path / "link.json").symlink_to(model / "sub" / "vocab.json")
    for path, held in ((model / "config.json", model / "config.json"),
                       (model / "sub" / "vocab.json", model / "sub" / "vocab.json"),
                       (tmp_path / "link.json", model / "sub" / "vocab.json")):
        with pytest.raises(UsageError, match=f"is {held}, a file of {model}, an input"):
            check_output(path, "--out", [model], overwrite=True)
    assert check_output(model / "new.json", "--out", [model]) == model / "new.json"
    assert check_output(tmp_path / "new.json", "--out", [model]) == tmp_path / "new.json"


def test_lr_find_validates_before_its_header(capsys):
    for args in (["--steps", 5], ["--start-lr", 1, "--end-lr", 0.1], ["--out", "x.txt"]):
        out, _ = refused(capsys, "lr-find", *args)
        assert out == ""
    with pytest.raises(SystemExit):
        cli.main(["lr-find", "--help"])
    assert "from 10 to 100,000" in " ".join(capsys.readouterr().out.split())


# ---- 1. outputs: a folder that does not exist yet -------------------------------------

@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="needs matplotlib")
def test_an_out_in_missing_folders_creates_them_when_it_is_written(capsys, run, corpus,
                                                                   tmp_path):
    tokenizer = tmp_path / "a" / "b" / "tok.json"
    outputs = {"tokenizer": tokenizer, "prepare": tmp_path / "c" / "c.tok",
               "plot": tmp_path / "d" / "p.png", "compare": tmp_path / "e" / "c.png",
               "lr-find": tmp_path / "f" / "lr.png"}
    for args in (["tokenizer", "train", corpus, "--vocab-size", 260],
                 ["prepare", corpus, "--tokenizer", tokenizer, "--workers", 1],
                 ["plot", run], ["compare", run], ["lr-find", "--config", run, "--steps", 10]):
        code, _, err = run_cli(capsys, *args, "--out", outputs[args[0]])
        assert code == 0, (args, err)
    assert all(path.is_file() for path in outputs.values())
    assert (tmp_path / "f" / "lr.json").is_file()


def test_an_out_below_a_file_is_refused_before_any_work(capsys, run, corpus, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    BPETokenizer().save(tmp_path / "tok.json")
    for args in (["tokenizer", "train", corpus, "--vocab-size", 260, "--out", notes / "t.json"],
                 ["tokenizer", "train", corpus, "--vocab-size", 260, "--out",
                  tmp_path / "t.json", "--export-hf", notes / "hf"],
                 ["prepare", corpus, "--tokenizer", tmp_path / "tok.json", "--out",
                  notes / "c" / "c.tok"],
                 ["plot", run, "--out", notes / "p.png"],
                 ["compare", run, "--out", notes / "c.png"],
                 ["lr-find", "--config", run, "--steps", 10, "--out", notes / "lr.png"]):
        out, err = refused(capsys, *args)
        assert out == "" and f"{notes} is not a folder" in err, (args, err)
    assert notes.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "notes.txt", "run",
                                                          "tok.json"]


def test_an_out_in_a_folder_without_write_permission_is_refused(capsys, corpus, tmp_path,
                                                                monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and
                        access(path, mode))
    out, err = refused(capsys, "tokenizer", "train", corpus, "--vocab-size", 260,
                       "--out", locked / "new" / "t.json")
    assert out == "" and f"no permission to write in {locked}" in err
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="needs matplotlib")
def test_a_command_that_fails_before_writing_leaves_no_new_folder(capsys, run, tmp_path):
    (run / "metrics.jsonl").write_text("")
    code, _, err = run_cli(capsys, "compare", run, "--out", tmp_path / "new" / "c.png")
    assert code == 1 and "none of the runs has logged a training step" in err
    assert not (tmp_path / "new").exists()


# ---- 2. training outlives its stdout ---------------------------------------------------

def test_training_goes_on_when_stdout_is_closed(tmp_path, corpus):
    run = tmp_path / "piped"
    env = dict(os.environ, XPMODEL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "xpmodel.cli.main", "train", "--config", TINY, "--out", run,
         f"data.source={corpus}", "train.max_iters=60", "train.log_interval=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert process.stdout.readline().startswith(b"run ")   # like `| head -1`
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=120) == 0, err
    assert err == b""
    steps = [r["step"] for r in RunDir(run).read_metrics() if r["type"] == "train"]
    assert steps[-1] == 60 and 60 in RunDir(run).checkpoint_steps()


def test_sample_into_a_closed_pipe_stops_quietly(trained, tmp_path):
    env = dict(os.environ, XPMODEL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "xpmodel.cli.main", "sample", trained["run"], "--num-samples",
         "50", "--max-new-tokens", "100"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    process.stdout.readline()
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=120) == 0 and err == b""


def test_sample_started_with_stdout_closed_stops_quietly(trained, tmp_path):
    env = dict(os.environ, XPMODEL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    result = subprocess.run(   # `xpmodel sample ... >&-`: Python starts with sys.stdout None
        [sys.executable, "-m", "xpmodel", "sample", str(trained["run"]), "--max-new-tokens", "5"],
        stderr=subprocess.PIPE, env=env, timeout=120, preexec_fn=lambda: os.close(1))
    assert result.returncode == 0 and result.stderr == b"", result.stderr


# ---- 6. an empty config ----------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n---\n"])
def test_an_empty_config_file_is_refused(capsys, tmp_path, text):
    config = tmp_path / "empty.yaml"
    config.write_text(text)
    for args in (["train", "--config", config, "--out", tmp_path / "run"],
                 ["lr-find", "--config", config], ["doctor", config]):
        _, err = refused(capsys, *args)
        assert f"{config}: the config file is empty" in err
    assert not (tmp_path / "run").exists()


# ---- 4. messages ----------------------------------------------------------------------

def test_a_device_as_config_is_named_once(capsys, tmp_path):
    _, err = refused(capsys, "train", "--config", "/dev/zero", "--out", tmp_path / "run")
    assert "is a character device, not a config file" in err and "file file" not in err


def test_a_file_given_as_a_run_says_so(capsys, tmp_path):
    text = tmp_path / "ts.txt"
    text.write_text("hello")
    for args in (["sample", text], ["eval", text], ["plot", text], ["runs", text],
                 ["compare", text]):
        _, err = refused(capsys, *args)
        assert "is a file, not a run directory" in err and "no such directory" not in err


def test_doctor_on_a_plain_folder_says_not_a_run(capsys, tmp_path):
    folder = tmp_path / "userdir"
    folder.mkdir()
    _, err = refused(capsys, "doctor", folder)
    assert "not an xpmodel run" in err and "unknown config" not in err


def test_import_hf_into_an_existing_run_does_not_suggest_resume(capsys, run, tmp_path):
    hf = tmp_path / "hf"
    assert run_cli(capsys, "export-hf", run, hf)[0] == 0
    _, err = refused(capsys, "import-hf", hf, "--out", run)
    assert "--resume" not in err and "--overwrite" in err


@pytest.mark.parametrize("args, flag", [
    (["sample", "HF"], "RUN_DIR"), (["eval", "HF"], "RUN_DIR"), (["plot", "HF"], "RUN_DIR"),
    (["export-hf", "HF", "elsewhere"], "RUN_DIR"), (["train", "--resume", "HF"], "--resume"),
    (["doctor", "HF"], "CONFIG_OR_RUN"), (["lr-find", "--config", "HF"], "--config"),
    (["compare", "HF"], "RUN")])
def test_a_hugging_face_folder_given_as_a_run_is_told_to_import_hf(capsys, run, tmp_path,
                                                                   monkeypatch, args, flag):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "export-hf", run, "hf/my-gpt2")[0] == 0
    _, err = refused(capsys, *[a.replace("HF", "hf/my-gpt2") for a in args])
    assert err == (f"error: {flag} hf/my-gpt2: not an xpmodel run (no run.json) but a Hugging Face "
                   f"model folder (config.json); make it a run with: xpmodel import-hf hf/my-gpt2 "
                   f"--out RUN_DIR\n")


def test_init_from_a_missing_folder_says_so(capsys, tmp_path):
    missing = tmp_path / "X"
    _, err = refused(capsys, "train", "--config", TINY, "--init-from", missing, "--out", missing)
    assert f"--init-from {missing}: no such directory" in err


# ---- 5. doctor --skip names ----------------------------------------------------------

def test_doctor_skip_takes_hyphenated_names(capsys, corpus):
    code, out, err = run_cli(capsys, "doctor", TINY, f"data.source={corpus}", "--skip",
                             "finite-diff", "--skip", "overfit", "--skip", "initial loss")
    assert code == 0, out + err
    assert "PASS  gradients" in out
    assert "finite-diff" not in out and "initial-loss" not in out and "overfit" not in out
    assert "4 passed" in out
    with pytest.raises(SystemExit):
        cli.main(["doctor", "--help"])
    assert "initial-loss" in capsys.readouterr().out


def test_diagnose_refuses_an_unknown_check(corpus):
    from xpmodel.errors import UsageError
    from xpmodel.tune.doctor import diagnose
    with pytest.raises(UsageError, match="finite-diff"):
        diagnose(object(), skip={"finite difs"})


def test_eval_refuses_a_batch_count_below_one_before_loading(capsys, tmp_path):
    _, err = refused(capsys, "eval", tmp_path / "no-such-run", "--batches", "0")
    assert "--batches must be at least 1, got 0" in err


# ---- what a run keeps and shows ---------------------------------------------------------

def test_a_relative_data_source_is_kept_absolute(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "rel.txt", lines=300)
    code, _, err = run_cli(capsys, "train", "--config", TINY, "--out", "run", "--quiet",
                           "data.source=rel.txt", "train.max_iters=2")
    assert code == 0, err
    assert RunDir(tmp_path / "run").load_config().data.source == str(tmp_path / "rel.txt")


def test_the_display_escapes_what_an_ascii_output_cannot_show():
    import io
    from xpmodel.train.display import TrainDisplay
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    display = TrainDisplay(10, stream=stream)
    display.sample(5, "caf\u00e9 \ufffd")
    stream.flush()
    assert "caf\\xe9 \\ufffd" in stream.buffer.getvalue().decode("ascii")


@pytest.mark.parametrize("width", [100, 40, 20])
def test_a_narrow_terminal_cuts_the_figures_not_the_step_count(width):
    import io
    import re
    from rich.console import Console
    from xpmodel.train.display import TrainDisplay
    buffer = io.StringIO()
    display = TrainDisplay(2000, stream=buffer)
    display.console = Console(file=buffer, width=width, force_terminal=True)
    display.live = True
    with display:
        display.step(150, 5.0648, 7.5e-4, 1.75, 43300)
    shown = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buffer.getvalue()).replace("\r", "\n")
    assert any(line.strip().startswith("150/2000 ") for line in shown.split("\n"))


@pytest.mark.parametrize("error", [errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EIO])
def test_a_new_output_on_a_file_system_without_hard_links(error, tmp_path, monkeypatch):
    """Where a hard link cannot be made, a new output is checked just before
    its rename: put in place while absent, refused once another made it."""
    from xpmodel.atomic import atomic_write_bytes, note_output
    from xpmodel.errors import XpmodelError

    def no_links(source, target):
        raise OSError(error, os.strerror(error))
    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "new.bin"
    note_output(out)
    atomic_write_bytes(out, b"mine")
    assert out.read_bytes() == b"mine"
    other = tmp_path / "other.bin"
    note_output(other)
    other.write_bytes(b"theirs")
    with pytest.raises(XpmodelError, match="another process wrote this file"):
        atomic_write_bytes(other, b"mine")
    assert other.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.bin", "other.bin"]
    atomic_write_bytes(out, b"again")   # written once, the output is this process's own
    assert out.read_bytes() == b"again"


def test_a_write_that_fails_part_way_names_the_file_and_leaves_nothing(tmp_path):
    """A file-size limit (as a full disk) met part way through small writes:
    the error names the target (a second error, from closing the file,
    replaced it when the file was buffered), and neither the temporary nor the
    folders made for it are left."""
    script = """
import resource, signal, sys
from pathlib import Path
from xpmodel.atomic import atomic_writer
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
try:
    with atomic_writer(Path(sys.argv[1])) as f:
        for _ in range(100):
            f.write(b"x" * 1000)
except OSError as exc:
    print(repr(exc.filename), exc.strerror)
"""
    target = tmp_path / "made" / "deeper" / "out.bin"
    result = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True,
                            text=True, timeout=60)
    assert result.stdout == f"{str(target)!r} File too large\n", result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_pairs_new_last_file_another_process_wrote_is_never_removed(tmp_path, monkeypatch):
    """Their pair (sidecar, then token file), landing after this write checked
    its last file and before it would remove the old one: a new output has no
    old file to remove, so theirs stays, and the write stops at its sidecar."""
    import xpmodel.atomic as atomic
    import xpmodel.file_pairs as file_pairs
    from xpmodel.data import write_token_file
    from xpmodel.errors import XpmodelError
    out = tmp_path / "x.tok"
    atomic.note_output(out)
    atomic.note_output(tmp_path / "x.tok.json")
    check = file_pairs.refuse_if_written_meanwhile

    def theirs_lands_after_the_check(path):
        check(path)
        if Path(path) == out and not out.exists():
            (tmp_path / "x.tok.json").write_bytes(b"their sidecar")
            out.write_bytes(b"theirs")
    monkeypatch.setattr(file_pairs, "refuse_if_written_meanwhile", theirs_lands_after_the_check)
    with pytest.raises(XpmodelError, match="another process wrote this file"):
        write_token_file(out, [numpy.arange(5, dtype=numpy.uint32)], 300, "ab" * 32)
    assert out.read_bytes() == b"theirs" and (tmp_path / "x.tok.json").read_bytes() == \
        b"their sidecar" and sorted(p.name for p in tmp_path.iterdir()) == ["x.tok", "x.tok.json"]


def test_a_killed_writers_temporary_under_this_process_id_is_never_written_through(tmp_path):
    """A process killed between placing a new output by a hard link and removing
    the link's other name left `.NAME.tmp-PID`, a second name of NAME; a write
    of NAME by a later process with that id replaces NAME, never rewrites it."""
    from xpmodel.atomic import atomic_write_bytes, temporary_path
    out = tmp_path / "x.bin"
    out.write_bytes(b"whole" * 200)
    os.link(out, temporary_path(out))

    class Stop(Exception):
        pass
    with pytest.raises(Stop):
        from xpmodel.atomic import atomic_writer
        with atomic_writer(out) as f:
            f.write(b"BBBB")
            raise Stop
    assert out.read_bytes() == b"whole" * 200
    atomic_write_bytes(out, b"new")
    assert out.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_outputs_noted_by_one_command_are_forgotten_when_it_ends(capsys, corpus, tmp_path,
                                                                monkeypatch):
    """tokenizer train stopped before writing leaves no mark on its --out: the
    Python API's save there later replaces a file as it always did. And a
    mark names the file, whichever working directory or link reaches it."""
    from xpmodel.atomic import atomic_write_bytes, is_new_output, note_output
    import xpmodel.tokenizer.bpe as bpe
    out = tmp_path / "tok.json"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(bpe.BPETokenizer, "train", stopped)
        code, _, _ = run_cli(capsys, "tokenizer", "train", corpus, "--vocab-size", 260,
                             "--out", out)
    assert code == 130 or code == 1 or code == 2, code
    out.write_text("another file")
    BPETokenizer().save(out)
    assert BPETokenizer.load(out) == BPETokenizer()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path / "link")
    note_output("new.bin")
    monkeypatch.chdir(tmp_path)
    assert is_new_output(tmp_path / "real" / "new.bin")
    (tmp_path / "real" / "new.bin").write_bytes(b"theirs")
    with pytest.raises(XpmodelError, match="another process wrote this file"):
        atomic_write_bytes(Path("real/new.bin"), b"mine")


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux's /proc/self/mem")
def test_a_file_that_fails_to_read_is_named(capsys, corpus):
    """/proc/self/mem opens as a regular file and fails at its read (EIO), as a
    failing disk does: the error names the file, not only 'Input/output error'."""
    code, _, err = run_cli(capsys, "prepare", corpus, "--tokenizer", "/proc/self/mem")
    assert code == 1
    assert_one_line_error(err)
    assert "/proc/self/mem: cannot read tokenizer file (" in err, err
