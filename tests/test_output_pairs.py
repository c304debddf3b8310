"""Outputs that are a pair of files (xpmodel/file_pairs.py): `prepare --out X`
(X and X.json), `lr-find --out lr.png` (lr.png and lr.json), `plot --out x.png`
(x.png and x-health.png). A command killed between the pair's two renames is
simulated by making the second rename raise (kill -9 runs nothing after it):
the same command run again, without --overwrite, writes the whole pair, and a
file of a pair is never found beside the other file of an older write. A file
of the user's at either name still needs --overwrite."""
import errno
import json
import os
import shutil
from pathlib import Path

import numpy
import pytest

from cli_helpers import assert_one_line_error, copy_run, run_cli, train_tiny_run, write_corpus
from xpmodel.atomic import temporary_path
from xpmodel.data import read_token_file, write_token_file
from xpmodel.data.tokenfile import check_token_checksum, read_sidecar
from xpmodel.file_pairs import COMPLETED_BY, is_interrupted_pair, stamp
from xpmodel.tokenizer.bpe import BPETokenizer

try:
    import matplotlib
    HAVE_MATPLOTLIB = bool(matplotlib)
except ImportError:
    HAVE_MATPLOTLIB = False
needs_matplotlib = pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="needs matplotlib")


pytestmark = pytest.mark.usefixtures("private_cache")   # each test's own XPMODEL_CACHE


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("pairs"))


@pytest.fixture
def run(trained, tmp_path):
    return copy_run(trained, tmp_path)


class Killed(BaseException):
    """Stands for kill -9: the command stops where it is."""


def kill_between(monkeypatch, *pair):
    """Make the second of the renames (or links, for a new output) that put
    the files `pair` in place raise Killed; returns the list the target it
    stopped is appended to."""
    renamed, stopped = [], []

    def stopping(real):
        def place(source, target, **kwargs):
            if Path(target) in pair:
                if renamed:
                    stopped.append(Path(target))
                    raise Killed(target)
                renamed.append(Path(target))
            return real(source, target, **kwargs)
        return place
    monkeypatch.setattr(os, "replace", stopping(os.replace))
    monkeypatch.setattr(os, "link", stopping(os.link))
    return stopped


def succeeds(capsys, *args):
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    return out


# ---- prepare --------------------------------------------------------------------------

@pytest.fixture
def tokenizer(tmp_path):
    path = tmp_path / "tok.json"
    BPETokenizer().save(path)
    return path


def test_prepare_killed_between_its_two_files_is_finished_by_its_rerun(capsys, tmp_path,
                                                                       monkeypatch, tokenizer):
    corpus = write_corpus(tmp_path / "corpus.txt", lines=50)
    out = tmp_path / "c.tok"
    command = ("prepare", corpus, "--tokenizer", tokenizer, "--out", out, "--workers", 1)
    with monkeypatch.context() as patch:
        stopped = kill_between(patch, out, Path(f"{out}.json"))
        assert run_cli(capsys, *command)[0] == 1 and stopped
    assert not out.exists()    # the token file comes last: present means whole
    assert f"tokens to {out}" in succeeds(capsys, *command)
    assert check_token_checksum(out) is True and len(read_token_file(out)) > 0


def test_prepare_overwrite_killed_never_leaves_a_token_file_beside_an_older_sidecar(
        capsys, tmp_path, monkeypatch, tokenizer):
    first = write_corpus(tmp_path / "first.txt", lines=50)
    second = tmp_path / "second.txt"
    second.write_text("something else entirely\n" * 40)
    out = tmp_path / "c.tok"
    succeeds(capsys, "prepare", first, "--tokenizer", tokenizer, "--out", out, "--workers", 1)
    command = ("prepare", second, "--tokenizer", tokenizer, "--out", out, "--workers", 1,
               "--overwrite")
    with monkeypatch.context() as patch:
        stopped = kill_between(patch, out, Path(f"{out}.json"))
        assert run_cli(capsys, *command)[0] == 1 and stopped
    # no token file a plain read_token_file would take beside the other write's sidecar
    assert not out.exists() or check_token_checksum(out) is True
    succeeds(capsys, *command)
    assert check_token_checksum(out) is True
    assert len(read_token_file(out)) == len("something else entirely\n" * 40)   # byte BPE


def test_prepare_still_refuses_a_sidecar_it_did_not_leave(capsys, tmp_path, tokenizer):
    """An xpmodel sidecar beside its token file, or one without the stamp, is not a leftover."""
    corpus = write_corpus(tmp_path / "corpus.txt", lines=50)
    out = tmp_path / "c.tok"
    succeeds(capsys, "prepare", corpus, "--tokenizer", tokenizer, "--out", out, "--workers", 1)
    sidecar = Path(f"{out}.json")
    document = json.loads(sidecar.read_text())
    assert document[COMPLETED_BY] == "c.tok"
    os.rename(out, tmp_path / "kept.tok")   # the pair's last file is elsewhere: a leftover now
    assert is_interrupted_pair(sidecar, out)
    del document[COMPLETED_BY]
    sidecar.write_text(json.dumps(document))
    code, _, err = run_cli(capsys, "prepare", corpus, "--tokenizer", tokenizer, "--out", out)
    assert code == 2 and f"--out {sidecar}: already exists" in err
    assert_one_line_error(err)


FINGERPRINT = "ab" * 32


def ids(*values):
    return [numpy.array(values, dtype=numpy.uint32)]


def on_each_fsync(monkeypatch, check):
    """Call check(fd) before every fsync."""
    real = os.fsync

    def fsync(fd):
        check(fd)
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def test_a_second_write_of_the_same_ids_leaves_the_token_file_readable_throughout(tmp_path,
                                                                                monkeypatch):
    """Two trials of `sweep --parallel` on a cold cache tokenize into one cache
    entry; the later write never takes away the file the earlier one is read from."""
    path = write_token_file(tmp_path / "c.tok", ids(*range(300)), 300, FINGERPRINT, {"n": 1})
    checked = []

    def readable(fd):
        assert len(read_token_file(path, verify_checksum=True)) == 300
        checked.append(fd)
    on_each_fsync(monkeypatch, readable)
    write_token_file(path, ids(*range(300)), 300, FINGERPRINT, {"n": 2})
    assert len(checked) >= 3      # the ids, the sidecar, their folder
    assert read_sidecar(path)["meta"] == {"n": 2} and check_token_checksum(path) is True


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     KeyboardInterrupt()], ids=["disk-full", "ctrl-c"])
def test_a_write_that_fails_while_its_ids_are_synced_leaves_the_old_pair(tmp_path, monkeypatch,
                                                                          failure):
    path = write_token_file(tmp_path / "c.tok", ids(1, 2, 3), 300, FINGERPRINT)
    old = (path.read_bytes(), Path(f"{path}.json").read_bytes())

    def fails_on_the_ids(fd):
        temporary = temporary_path(path)
        if temporary.exists() and os.path.samestat(os.fstat(fd), temporary.stat()):
            raise failure
    on_each_fsync(monkeypatch, fails_on_the_ids)
    with pytest.raises(type(failure)):
        write_token_file(path, ids(*range(200)), 300, FINGERPRINT)
    assert (path.read_bytes(), Path(f"{path}.json").read_bytes()) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tok", "c.tok.json"]


# ---- lr-find --------------------------------------------------------------------------

@needs_matplotlib
def test_lr_find_killed_between_its_numbers_and_its_plot_is_finished_by_its_rerun(
        capsys, run, tmp_path, monkeypatch):
    png, numbers = tmp_path / "lr" / "lr.png", tmp_path / "lr" / "lr.json"
    command = ("lr-find", "--config", run, "--out", png, "--steps", 10)
    with monkeypatch.context() as patch:
        stopped = kill_between(patch, png, numbers)
        assert run_cli(capsys, *command)[0] == 1 and stopped
    assert not png.exists() and is_interrupted_pair(numbers, png)
    out = succeeds(capsys, *command)
    assert f"wrote {png}, {numbers}" in out
    assert png.read_bytes()[:4] == b"\x89PNG" and json.loads(numbers.read_text())["suggested_lr"]


@needs_matplotlib
def test_lr_find_overwrite_killed_never_leaves_a_plot_beside_other_numbers(capsys, run, tmp_path,
                                                                           monkeypatch):
    png, numbers = tmp_path / "lr.png", tmp_path / "lr.json"
    succeeds(capsys, "lr-find", "--config", run, "--out", png, "--steps", 10)
    old_png, old_numbers = png.read_bytes(), numbers.read_bytes()
    command = ("lr-find", "--config", run, "--out", png, "--steps", 12, "--overwrite")
    with monkeypatch.context() as patch:
        stopped = kill_between(patch, png, numbers)
        assert run_cli(capsys, *command)[0] == 1 and stopped
    if png.exists():   # a plot there is the one its numbers were drawn from
        assert (png.read_bytes(), numbers.read_bytes()) == (old_png, old_numbers)
    succeeds(capsys, *command)
    assert len(json.loads(numbers.read_text())["lrs"]) == 12 and png.read_bytes() != old_png


@needs_matplotlib
def test_lr_find_still_refuses_numbers_whose_plot_is_there(capsys, run, tmp_path):
    """An earlier lr-find's whole pair, or its numbers alone without a stamp,
    need --overwrite; a user's own JSON is never replaced."""
    png, numbers = tmp_path / "lr.png", tmp_path / "lr.json"
    succeeds(capsys, "lr-find", "--config", run, "--out", png, "--steps", 10)
    assert json.loads(numbers.read_text())[COMPLETED_BY] == "lr.png"
    code, out, err = run_cli(capsys, "lr-find", "--config", run, "--out", png, "--steps", 10)
    assert code == 2 and f"--out {png}: already exists" in err
    png.unlink()
    numbers.write_text(json.dumps({**json.loads(numbers.read_text()), COMPLETED_BY: None}))
    code, out, err = run_cli(capsys, "lr-find", "--config", run, "--out", png, "--steps", 10)
    assert code == 2 and f"--out {numbers}: already exists" in err


# ---- plot -----------------------------------------------------------------------------

def add_health_records(run):
    """Health records, as train.health_interval writes them, in the run's metrics."""
    groups = ["embed", "h.0", "head"]
    with open(run / "metrics.jsonl", "a") as metrics:
        for step in (10, 20, 30):
            metrics.write(json.dumps({"type": "health", "step": step, "groups": groups,
                                      "grad_norm": [0.5, 1.0, 2.0],
                                      "update_ratio": [1e-3, 2e-3, 3e-3],
                                      "weight_norm": [1.0, 1.0, 1.0]}) + "\n")


@needs_matplotlib
def test_plot_killed_between_its_two_pictures_is_finished_by_its_rerun(capsys, run, tmp_path,
                                                                       monkeypatch):
    add_health_records(run)
    out, health = tmp_path / "p" / "x.png", tmp_path / "p" / "x-health.png"
    with monkeypatch.context() as patch:
        stopped = kill_between(patch, out, health)
        assert run_cli(capsys, "plot", run, "--out", out)[0] == 1 and stopped
    assert not out.exists() and is_interrupted_pair(health, out)
    assert succeeds(capsys, "plot", run, "--out", out) == f"wrote {out}\nwrote {health}\n"
    assert not is_interrupted_pair(health, out)
    out.unlink()
    mine = tmp_path / "mine.png"   # a picture of the user's, by matplotlib too: no stamp
    succeeds(capsys, "plot", run, "--out", mine)
    os.replace(mine, health)
    code, _, err = run_cli(capsys, "plot", run, "--out", out)
    assert code == 2 and f"--out {health}: already exists" in err


@needs_matplotlib
def test_plot_of_a_run_without_health_removes_the_health_plot_beside_its_out(capsys, run,
                                                                           tmp_path):
    """x-health.png of an earlier plot --out x.png is removed, not left beside
    a new x.png it does not belong to, as lr-find removes an earlier plot
    beside numbers it writes alone; a file of the user's there is kept."""
    healthy = tmp_path / "healthy"
    shutil.copytree(run, healthy)
    add_health_records(healthy)
    out, health = tmp_path / "p" / "x.png", tmp_path / "p" / "x-health.png"
    succeeds(capsys, "plot", healthy, "--out", out)
    assert succeeds(capsys, "plot", run, "--out", out, "--overwrite") == f"wrote {out}\n"
    assert not health.exists()
    succeeds(capsys, "plot", healthy, "--out", out, "--overwrite")
    out.unlink()      # the health plot alone: a leftover, replaced without --overwrite
    assert succeeds(capsys, "plot", run, "--out", out) == f"wrote {out}\n"
    assert not health.exists()
    out.unlink()
    health.write_text("my notes")     # not a PNG: kept even with --overwrite
    succeeds(capsys, "plot", run, "--out", out)
    succeeds(capsys, "plot", run, "--out", out, "--overwrite")
    assert health.read_text() == "my notes"
    out.unlink()
    succeeds(capsys, "plot", run, "--out", health, "--overwrite")   # a PNG without the stamp
    succeeds(capsys, "plot", run, "--out", out)
    assert health.exists()            # kept without --overwrite
    succeeds(capsys, "plot", run, "--out", out, "--overwrite")
    assert not health.exists()        # replaced where lr-find would replace its plot


# ---- a leftover is replaced only by the command writing its pair ----------------------

@needs_matplotlib
def test_a_leftover_needs_overwrite_for_any_other_output(capsys, run, tmp_path, tokenizer):
    """lr-find's numbers lr.json stamped for lr.png, whose plot is missing: the
    rerun of lr-find --out lr.png replaces them, but no other command's --out,
    nor lr-find's with another plot, replaces them (or a copy) without --overwrite."""
    corpus = write_corpus(tmp_path / "corpus.txt", lines=50)
    png, numbers = tmp_path / "lr.png", tmp_path / "lr.json"
    succeeds(capsys, "lr-find", "--config", run, "--out", png, "--steps", 10)
    png.unlink()
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(numbers, results / "a.json")
    left = numbers.read_bytes()
    for command, refused in (
            (("tokenizer", "train", corpus, "--vocab-size", 260, "--out", numbers), numbers),
            (("prepare", corpus, "--tokenizer", tokenizer, "--out", tmp_path / "lr"), numbers),
            (("lr-find", "--config", run, "--out", results / "a.png", "--steps", 10),
             results / "a.json")):
        code, _, err = run_cli(capsys, *command)
        assert code == 2 and f"--out {refused}: already exists" in err, command
    assert numbers.read_bytes() == left and (results / "a.json").read_bytes() == left
    assert sorted(p.name for p in results.iterdir()) == ["a.json"]
    succeeds(capsys, "lr-find", "--config", run, "--out", png, "--steps", 12)
    assert png.exists() and len(json.loads(numbers.read_text())["lrs"]) == 12


# ---- the stamp itself -----------------------------------------------------------------

def test_a_leftover_is_a_file_stamped_with_the_name_of_its_missing_partner(tmp_path):
    first, last = tmp_path / "a.json", tmp_path / "a.png"
    for document, leftover in (({"n": 1}, False), (stamp(last), True),
                               ({COMPLETED_BY: "../a.png"}, False), ({COMPLETED_BY: ""}, False),
                               ({COMPLETED_BY: "b.png"}, False), ({COMPLETED_BY: 3}, False)):
        first.write_text(json.dumps(document))
        assert is_interrupted_pair(first, last) == leftover, document
    first.write_text(json.dumps(stamp(last)))
    assert not is_interrupted_pair(first, tmp_path / "b.png")       # another pair's
    assert not is_interrupted_pair(first, tmp_path / "sub" / "a.png")   # another folder's
    last.write_bytes(b"")
    assert not is_interrupted_pair(first, last)
    for junk in (b"", b"{", b"\x89PNG\r\n\x1a\n\xff\xff", b"\0" * 100):
        first.write_bytes(junk)
        assert not is_interrupted_pair(first, tmp_path / "gone.png")
    os.symlink(first, tmp_path / "link.json")
    first.write_text(json.dumps(stamp(tmp_path / "gone.png")))
    assert is_interrupted_pair(first, tmp_path / "gone.png")
    assert not is_interrupted_pair(tmp_path / "link.json", tmp_path / "gone.png")
    assert not is_interrupted_pair(tmp_path / "nothing.json", tmp_path / "gone.png")


@needs_matplotlib
@pytest.mark.parametrize("partner", ["x.png", "graphique-été.png", "图.png"])
def test_a_pictures_stamp_is_read_back_whatever_the_name(tmp_path, partner):
    """A latin-1 name goes in a tEXt chunk, any other in an iTXt one."""
    from xpmodel.tune.plot import png_bytes, pyplot
    plt = pyplot()
    fig, _ = plt.subplots(figsize=(2, 2))
    picture = tmp_path / "x-health.png"
    picture.write_bytes(png_bytes(plt, fig, metadata=stamp(tmp_path / partner)))
    assert is_interrupted_pair(picture, tmp_path / partner)
    (tmp_path / partner).write_bytes(b"")
    assert not is_interrupted_pair(picture, tmp_path / partner)


@pytest.mark.parametrize("command", ["prepare", "lr-find", "plot"])
def test_overwrite_that_fails_writing_the_first_file_keeps_the_old_pair(command, capsys, run,
                                                                        tmp_path, monkeypatch,
                                                                        tokenizer):
    """Both files are written before the old pair is touched: a full disk met
    while writing the first file (the sidecar, the numbers, the health plot)
    leaves the old pair whole."""
    if command != "prepare" and not HAVE_MATPLOTLIB:
        pytest.skip("the plot needs matplotlib")
    import xpmodel.atomic as atomic
    corpus = write_corpus(tmp_path / "corpus.txt", lines=50)
    out = tmp_path / "o" / {"prepare": "c.tok"}.get(command, "x.png")
    first = {"prepare": Path(f"{out}.json"), "lr-find": out.with_suffix(".json"),
             "plot": out.with_name("x-health.png")}[command]
    args = {"prepare": ["prepare", corpus, "--tokenizer", tokenizer, "--out", out, "--workers", 1],
            "lr-find": ["lr-find", "--config", run, "--out", out, "--steps", 10],
            "plot": ["plot", run, "--out", out]}[command]
    if command == "plot":
        add_health_records(run)
    succeeds(capsys, *args)
    old = {path: path.read_bytes() for path in (out, first)}
    corpus.write_text("other text, other ids\n" * 40)   # prepare's rerun has new ids to write
    real_write = atomic._TargetFile.write

    def full_on_the_first_file(self, data):
        if self._target == first:
            raise OSError(errno.ENOSPC, "No space left on device", str(first))
        return real_write(self, data)
    monkeypatch.setattr(atomic._TargetFile, "write", full_on_the_first_file)
    code, _, err = run_cli(capsys, *args, "--overwrite")
    assert code == 1 and f"{first}: No space left on device" in err, err
    assert {path: path.read_bytes() for path in (out, first)} == old
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(p.name for p in (out, first))
