"""What `xpmodel doctor` and `xpmodel lr-find` read, checked as every command
checks it (README, "Errors"): a data.source that names nothing is a usage
mistake (exit 2) named by its key before any work, whatever the tokenizer; a
corpus that is there but cannot be used is bad data (exit 1)."""
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli

TINY = Path(__file__).resolve().parent / "tiny-run.yaml"
TUNING_COMMANDS = [["doctor", TINY], ["lr-find", "--config", TINY]]

pytestmark = pytest.mark.usefixtures("private_cache")   # conftest.py


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
@pytest.mark.parametrize("command", TUNING_COMMANDS, ids=["doctor", "lr-find"])
@pytest.mark.parametrize("source, message", [("nope.txt", "nope.txt: no such file or folder"),
                                             ("nope*.txt", "nope*.txt: glob matched no files")],
                         ids=["file", "glob"])
def test_a_data_source_that_names_nothing_exits_2_before_any_check(command, tokenizer, source,
                                                                   message, tmp_path,
                                                                   monkeypatch, capsys):
    """No BPE tokenizer is trained first, no doctor report begins, nothing is
    written (not even a cache)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = run_cli(capsys, *command, f"data.source={source}",
                             f"data.tokenizer={tokenizer}")
    assert code == 2, out + err
    assert_one_line_error(err)
    assert err.startswith(f"error: data.source {message}"), err
    assert out == ""
    assert list(work.iterdir()) == [] and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
@pytest.mark.parametrize("command", TUNING_COMMANDS, ids=["doctor", "lr-find"])
def test_an_empty_corpus_file_is_bad_data_exit_1(command, tokenizer, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    code, out, err = run_cli(capsys, *command, f"data.source={empty}",
                             f"data.tokenizer={tokenizer}")
    assert code == 1, out + err
    assert_one_line_error(err)
    assert f"data.source {empty}: empty corpus: the file is empty" in err   # the key named
    assert out == ""


@pytest.mark.parametrize("text, message", [(b"hello\xff\xfeworld\n", "not UTF-8 text"),
                                           (b"short", "corpus has 5 tokens")],
                         ids=["not-utf8", "too-short"])
def test_doctor_on_a_corpus_it_cannot_use_is_one_line_without_a_report(text, message, tmp_path,
                                                                       capsys):
    """Every check would fail on it the same way: one line, as train says it."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(text)
    code, out, err = run_cli(capsys, "doctor", TINY, f"data.source={bad}", "data.tokenizer=byte")
    assert code == 1, out + err
    assert_one_line_error(err)
    assert message in err, err
    assert out == ""


def test_doctor_on_a_run_names_a_data_source_that_names_nothing(tmp_path, corpus, capsys):
    """The run's own tokenizer is loaded, not trained, yet the corpus is still
    checked first."""
    from xpmodel.config import load_config
    from xpmodel.train import Trainer
    run = tmp_path / "run"
    Trainer.start(load_config(TINY, [f"data.source={corpus}"]), out=run, show=False)
    missing = tmp_path / "moved.txt"
    code, out, err = run_cli(capsys, "doctor", run, f"data.source={missing}")
    assert code == 2, out + err
    assert err.startswith(f"error: data.source {missing}: no such file or folder"), err
    assert out == ""
