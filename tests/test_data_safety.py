"""The data pipeline refusing or repairing what would otherwise go wrong
quietly or slowly: damaged token files (checksums), a whole-file read of one
huge line for BPE training, invalid UTF-8 reported at once, leftover
temporary files of killed prepares, an unusable cache folder, symlinked
folders in a corpus."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from xpmodel.data import prepare, read_sidecar, read_token_file
from xpmodel.data.tokenfile import HEADER_BYTES, check_token_checksum
from xpmodel.errors import DataError
from xpmodel.tokenizer.bpe import BPETokenizer


@pytest.fixture
def byte_tokenizer():
    return BPETokenizer()


def corpus_file(tmp_path, text="the quick brown fox jumps over the lazy dog\n" * 2000):
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def zero_ids(path, offset=HEADER_BYTES + 1000, length=20_000):
    """Overwrite ids in place with zeros: in range, same size."""
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(b"\0" * length)


# ---- checksums of the token ids ----------------------------------------------------------

def test_a_token_file_records_the_checksum_of_its_ids(tmp_path, byte_tokenizer):
    path = prepare(corpus_file(tmp_path), byte_tokenizer, cache_dir=tmp_path / "cache")
    assert len(read_sidecar(path)["ids_sha256"]) == 64
    assert check_token_checksum(path) is True
    zero_ids(path)
    assert check_token_checksum(path) is False
    with pytest.raises(DataError, match="do not match the checksum"):
        read_token_file(path, verify_checksum=True)


def test_a_damaged_cache_entry_is_rebuilt_with_a_note(tmp_path, byte_tokenizer, capsys):
    source = corpus_file(tmp_path)
    path = prepare(source, byte_tokenizer, cache_dir=tmp_path / "cache")
    good = np.array(read_token_file(path))
    zero_ids(path)
    assert prepare(source, byte_tokenizer, cache_dir=tmp_path / "cache") == path
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "do not match their checksum; rebuilding" in err
    assert np.array_equal(read_token_file(path), good)
    prepare(source, byte_tokenizer, cache_dir=tmp_path / "cache")     # now current: no note
    assert capsys.readouterr().err == ""


def test_a_cache_entry_without_a_checksum_is_rebuilt(tmp_path, byte_tokenizer):
    source = corpus_file(tmp_path)
    path = prepare(source, byte_tokenizer, cache_dir=tmp_path / "cache")
    sidecar = read_sidecar(path)
    del sidecar["ids_sha256"]
    Path(f"{path}.json").write_text(json.dumps(sidecar))
    before = os.stat(path).st_ino
    prepare(source, byte_tokenizer, cache_dir=tmp_path / "cache")
    assert os.stat(path).st_ino != before and "ids_sha256" in read_sidecar(path)


def test_a_damaged_user_token_file_is_an_error_and_kept(tmp_path, byte_tokenizer):
    source = corpus_file(tmp_path)
    out = tmp_path / "mine.tok"
    prepare(source, byte_tokenizer, out_path=out)
    zero_ids(out)
    damaged = out.read_bytes()
    with pytest.raises(DataError, match="mine.tok: the token ids do not match the checksum"):
        prepare(source, byte_tokenizer, out_path=out)
    assert out.read_bytes() == damaged
    sidecar = read_sidecar(out)                 # without a checksum: accepted as before
    del sidecar["ids_sha256"]
    Path(f"{out}.json").write_text(json.dumps(sidecar))
    assert prepare(source, byte_tokenizer, out_path=out) == out
    assert out.read_bytes() == damaged


def test_train_rebuilds_a_damaged_cached_token_file(tmp_path, monkeypatch, capsys):
    from cli_helpers import run_cli, write_corpus
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus.txt", lines=400)
    tiny = Path(__file__).parent / "tiny-run.yaml"
    args = ["train", "--config", tiny, f"data.source={corpus}", "train.max_iters=1",
            "train.warmup_iters=0", "train.eval_interval=1", "train.save_interval=1"]
    assert run_cli(capsys, *args, "--out", tmp_path / "a")[0] == 0
    [token_file] = (tmp_path / "cache" / "tokens").glob("*.tok")
    zero_ids(token_file)
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "b")
    assert code == 0 and "rebuilding" in err
    assert check_token_checksum(token_file) is True
