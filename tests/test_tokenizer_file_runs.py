"""data.tokenizer=PATH: a run trains with a tokenizer file that `xpmodel
tokenizer train` wrote, keeps its own copy of it, and reads tokens that
`xpmodel prepare` (without --out) cached for that file."""
import json
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli
from xpmodel.config import DataConfig, load_config
from xpmodel.errors import UsageError

TINY = Path(__file__).resolve().parent / "tiny-run.yaml"


def _train(capsys, corpus, tokenizer, out, *overrides):
    return run_cli(capsys, "train", "--config", TINY, "--quiet", "--out", out,
                   f"data.source={corpus}", f"data.tokenizer={tokenizer}", *overrides)


def _token_files(cache):
    return sorted((cache / "tokens").glob("*.tok"))


def test_a_run_trains_on_a_tokenizer_file_and_keeps_its_own_copy(tmp_path, corpus, private_cache,
                                                                 capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "tokenizer", "train", corpus, "--vocab-size", "300", "--out", "tok.json")[0] == 0
    assert run_cli(capsys, "prepare", corpus, "--tokenizer", "tok.json")[0] == 0
    [prepared] = _token_files(private_cache)
    written = prepared.stat().st_mtime_ns

    code, out, err = _train(capsys, corpus, "tok.json", tmp_path / "run")
    assert code == 0, err
    assert "BPE tokenizer" not in out + err
    # the run's tokenizer is the file's, and its tokens are those prepare cached
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == (tmp_path / "tok.json").read_bytes()
    assert _token_files(private_cache) == [prepared] and prepared.stat().st_mtime_ns == written

    # the run stands on its own: without the file it evaluates and resumes
    (tmp_path / "tok.json").unlink()
    code, out, err = run_cli(capsys, "eval", tmp_path / "run")
    assert code == 0 and "perplexity" in out, err
    code, out, err = run_cli(capsys, "train", "--resume", tmp_path / "run", "train.max_iters=40")
    assert code == 0 and "resumed" in out, err


def test_another_tokenizer_in_the_same_file_tokenizes_afresh(tmp_path, corpus, private_cache, capsys):
    tokenizer = tmp_path / "tok.json"
    documents = []
    for vocab_size, run in (("300", "a"), ("280", "b")):
        assert run_cli(capsys, "tokenizer", "train", corpus, "--vocab-size", vocab_size, "--out",
                       tokenizer, "--overwrite")[0] == 0
        code, out, err = _train(capsys, corpus, tokenizer, tmp_path / run)
        assert code == 0, err
        assert (tmp_path / run / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
        documents.append(json.loads(tokenizer.read_text()))
    assert len(documents[0]["merges"]) != len(documents[1]["merges"])
    assert len(_token_files(private_cache)) == 2     # the cache key holds the tokenizer's fingerprint


@pytest.mark.parametrize("value", ["tok.json", "./tok", "/data/tokenizers/notes"])
def test_a_path_is_a_tokenizer_file(value):
    assert DataConfig(tokenizer=value).tokenizer == value


@pytest.mark.parametrize("value", ["bep", "tok", "BPE"])
def test_a_word_that_is_no_tokenizer_kind_is_refused_as_one(value):
    with pytest.raises(UsageError) as error:
        load_config("default", [f"data.tokenizer={value}"])
    assert str(error.value).endswith(
        f"data.tokenizer must be one of bpe, byte or a tokenizer file (a path holding a / or ending in "
        f".json, as `xpmodel tokenizer train --out` writes); got '{value}'")


def test_a_missing_or_unusable_tokenizer_file_is_named(tmp_path, corpus, private_cache, capsys):
    # a path that names nothing is a mistake in what was asked (exit 2); a file that cannot
    # be used is bad data (exit 1), as for data.source
    code, out, err = _train(capsys, corpus, tmp_path / "none.json", tmp_path / "run")
    assert code == 2 and f"error: data.tokenizer {tmp_path / 'none.json'}: no such tokenizer file" in err
    assert_one_line_error(err)
    (tmp_path / "notes.json").write_text("{}")
    code, out, err = _train(capsys, corpus, tmp_path / "notes.json", tmp_path / "run")
    assert code == 1 and f"error: data.tokenizer {tmp_path / 'notes.json'}: tokenizer file is not " \
                         f"usable: it is not an xpmodel tokenizer" in err
    assert_one_line_error(err)
    assert not (tmp_path / "run").exists()


def test_masking_needs_a_tokenizer_file_that_reserves_the_mask(tmp_path, corpus, private_cache, capsys):
    tokenizer = tmp_path / "tok.json"
    assert run_cli(capsys, "tokenizer", "train", corpus, "--vocab-size", "300", "--out", tokenizer)[0] == 0
    code, out, err = _train(capsys, corpus, tokenizer, tmp_path / "run", "data.token_dropout=0.1",
                            "data.token_dropout_mode=mask")
    assert code == 2
    assert err.strip() == (f"error: data.tokenizer {tokenizer}: the tokenizer does not reserve "
                           f"<|mask|>, which data.token_dropout_mode=mask needs (xpmodel tokenizer "
                           f"train reserves only <|endoftext|>): use data.token_dropout_mode=random, "
                           f"or data.tokenizer=bpe to learn one that reserves it")


def test_a_missing_tokenizer_file_is_named_before_a_run_folder_is_chosen(tmp_path, corpus,
                                                                        private_cache, capsys,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny-run").mkdir(parents=True)      # the default folder is taken
    code, out, err = run_cli(capsys, "train", "--config", TINY, "--quiet", f"data.source={corpus}",
                             "data.tokenizer=none.json")
    assert code == 2 and err.strip() == "error: data.tokenizer none.json: no such tokenizer file"
    assert "already exists" not in out


def test_the_run_keeps_the_tokenizer_files_absolute_path(tmp_path, corpus, private_cache, capsys,
                                                        monkeypatch):
    """The run's config.yaml trains again from any folder."""
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "tokenizer", "train", corpus, "--vocab-size", "300", "--out", "tok.json")[0] == 0
    assert _train(capsys, corpus, "tok.json", tmp_path / "run")[0] == 0
    assert load_config(tmp_path / "run" / "config.yaml").data.tokenizer == str(tmp_path / "tok.json")


def test_init_from_says_it_uses_the_source_runs_tokenizer_instead_of_a_file(tmp_path, corpus,
                                                                           private_cache, capsys):
    tokenizer = tmp_path / "tok.json"
    assert run_cli(capsys, "tokenizer", "train", corpus, "--vocab-size", "300", "--out", tokenizer)[0] == 0
    assert _train(capsys, corpus, "byte", tmp_path / "source")[0] == 0
    code, out, err = run_cli(capsys, "train", "--config", TINY, "--quiet", "--out", tmp_path / "tuned",
                             "--init-from", tmp_path / "source", f"data.source={corpus}",
                             f"data.tokenizer={tokenizer}")
    assert code == 0, err
    assert "the model shape and tokenizer come from the source (block_size too: its positions " \
        "are learned)" in out
    assert f"ignoring data.tokenizer={tokenizer}" in out
    assert (tmp_path / "tuned" / "tokenizer.json").read_bytes() == \
        (tmp_path / "source" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("out,named", [("tok.json", "tok.json"), ("mytok", "./mytok")])
def test_tokenizer_train_says_how_to_train_with_its_file(tmp_path, corpus, capsys, monkeypatch, out,
                                                         named):
    """The line names the file as data.tokenizer takes it: a bare name gets ./"""
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli(capsys, "tokenizer", "train", corpus, "--vocab-size", "300", "--out", out)
    assert code == 0, err
    assert stdout.strip().endswith(f"train with it: xpmodel train data.source={corpus} "
                                   f"data.tokenizer={named}")
    assert DataConfig(tokenizer=named).tokenizer == named


def test_tokenizer_train_and_a_run_say_when_the_tokenizer_has_another_count(tmp_path, capsys,
                                                                            private_cache):
    small = tmp_path / "small.txt"
    small.write_text("hello world hello there " * 400)
    code, stdout, err = run_cli(capsys, "tokenizer", "train", small, "--vocab-size", "400",
                                "--out", tmp_path / "tok.json")
    assert code == 0, err
    tokens = json.loads((tmp_path / "tok.json").read_text())
    merges = len(tokens["merges"])
    assert stdout.startswith(f"note: the tokenizer has {256 + merges + 1} ids, not 400: after "
                             f"{merges} merges the corpus held no pair of adjacent tokens left")
    code, stdout, err = run_cli(capsys, "train", "--config", TINY, "--out", tmp_path / "run",
                                f"data.source={small}", "data.tokenizer=bpe",
                                "data.vocab_size=400", "train.max_iters=1")
    assert code == 0, err
    assert f"note: the BPE tokenizer has {256 + merges + 1} ids, not 400" in stdout


def test_lr_find_never_writes_over_its_tokenizer_file(tmp_path, corpus, private_cache, capsys):
    """lr-find --out tok.png writes tok.json beside it: not over the data.tokenizer
    file it reads, even with --overwrite."""
    tokenizer = tmp_path / "tok.json"
    assert run_cli(capsys, "tokenizer", "train", corpus, "--vocab-size", "300", "--out", tokenizer)[0] == 0
    before = tokenizer.read_bytes()
    code, out, err = run_cli(capsys, "lr-find", "--config", TINY, f"data.source={corpus}",
                             f"data.tokenizer={tokenizer}", "--steps", "10", "--out",
                             tmp_path / "tok.png", "--overwrite")
    assert code == 2 and "an input of this command" in err and str(tokenizer) in err, err
    assert tokenizer.read_bytes() == before
