"""Tests for BPETokenizer: training, exact round trips, special tokens,
files, parallel encoding, and id-for-id parity with Hugging Face exports.

The round-trip strings come from a seeded generator (random code points from
scripts, marks, emoji and whitespace) plus hand-picked edge cases. Hugging
Face tests skip when `tokenizers` / `transformers` are not installed.
"""
import json
import random
import re
import shutil

import numpy
import pytest

from conftest import SHARED_DATA
from xpmodel.errors import DataError, UsageError
from xpmodel.tokenizer import learning, vocab
from xpmodel.tokenizer.bpe import ENDOFTEXT, BPETokenizer
from xpmodel.tokenizer.hf_export import export_tokenizer_hf
from xpmodel.tokenizer.merging import merge_long, merge_short

CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "Grüße aus Köln — naïve café, 東京 と 大阪, emoji 🎉🎉 and 👍🏽!\r\n\tIt's 2024; we'll see 3.14.\n"
    "    indented    with   runs of spaces\n"
)

HAND_PICKED = [
    "", " ", "  ", "\n", "\r\n", "\r\n\r\n", "\t\t x", " " * 1000, "a" * 1000, "\n" * 300,
    "hello world", " leading and trailing ", "It's they'll we've I'm you'd",
    "e\u0301 combining acute, Z\u0351\u0358\u0334a\u0362l\u0344g\u0335o",
    "👨‍👩‍👧‍👦 family, 🇩🇪 flag, 👍🏽 skin tone", "\u200b zero width \u200d joiner \ufeff BOM",
    "\u00a0nbsp \u2028line sep\u2029 para \u3000ideographic space",
    "日本語のテキスト、中文文本。한국어 텍스트", "Ελληνικά кириллица עברית العربية",
    "12345678901234567890 ١٢٣ ½ ²", "\x00\x01\x7f control \x1b[0m", "\U0010ffff \ue000 private use",
    "<|endoftext|>", "a<|endoftext|>b", "<|endoftext", "|>", ENDOFTEXT * 3,
]

# Code point pools for random strings: (low, high) inclusive, no surrogates.
POOLS = [
    (0x20, 0x7E), (0x09, 0x0D), (0xA0, 0xFF), (0x100, 0x24F), (0x300, 0x36F),
    (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F), (0x2000, 0x206F),
    (0x3000, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0xFE00, 0xFE0F),
    (0x1F300, 0x1F6FF), (0x1F900, 0x1F9FF), (0xE0000, 0xE007F), (0x10000, 0x10FFFF),
]


def random_strings(count, seed, max_length=40):
    rng = random.Random(seed)
    strings = []
    for _ in range(count):
        pools = rng.sample(POOLS, rng.randint(1, 4))  # a few scripts per string
        chars = []
        for _ in range(rng.randint(0, max_length)):
            if rng.random() < 0.2:
                chars.append(rng.choice([" ", "  ", "\n", "\r\n", "\t", "'s", "'ll"]))
            else:
                low, high = rng.choice(pools)
                chars.append(chr(rng.randint(low, high)))
        strings.append("".join(chars))
    return strings


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.train(CORPUS * 3 + "".join(random_strings(100, seed=1)), 600)


# ----- training --------------------------------------------------------------


def test_training_learns_the_textbook_merges():
    # "aaabdaaabac": aa (4) first; then ab and (aa, a) tie at 2 and the lower
    # pair (97, 98) wins; then (aa, ab) occurs twice.
    tok = BPETokenizer.train("aaabdaaabac", 259, special_tokens=())
    assert tok.merges == ((97, 97), (97, 98), (256, 257))
    assert [tok.token_bytes(i) for i in (256, 257, 258)] == [b"aa", b"ab", b"aaab"]
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]


def test_vocab_size_counts_bytes_merges_and_specials():
    tok = BPETokenizer.train(CORPUS, 300)
    assert len(tok.merges) == 300 - 256 - 1
    assert tok.vocab_size == 300
    assert tok.eot_id == 299 and tok.special_tokens == {ENDOFTEXT: 299}
    several = BPETokenizer.train(CORPUS, 300, special_tokens=("<|a|>", "<|b|>"))
    assert several.special_tokens == {"<|a|>": 298, "<|b|>": 299} and several.eot_id is None


def test_vocab_size_note_says_why_a_tokenizer_has_another_count(monkeypatch):
    from xpmodel.tokenizer import learning
    from xpmodel.tokenizer.learning import vocab_size_note
    assert vocab_size_note(BPETokenizer.train(CORPUS, 300), 300) is None
    assert vocab_size_note(BPETokenizer.train(CORPUS, 256), 256) == (
        "257 ids, not 256: the 256 byte ids and 1 special token are always there")
    short = BPETokenizer.train("ab ab", 1000)
    assert vocab_size_note(short, 1000) == (
        f"{short.vocab_size} ids, not 1,000: after {len(short.merges)} merges the corpus held "
        f"no pair of adjacent tokens left to merge")
    monkeypatch.setattr(learning, "MAX_TOTAL_TOKEN_BYTES", 256 + 40)
    capped = BPETokenizer.train(CORPUS, 1000)
    assert vocab_size_note(capped, 1000).endswith(": the tokens reached the 296 bytes a "
                                                  "tokenizer may hold")


def test_vocab_size_256_is_a_byte_tokenizer():
    tok = BPETokenizer.train(CORPUS, 256)
    assert tok.merges == () and tok.vocab_size == 257 and tok.eot_id == 256
    text = "Köln 🎉"
    assert tok.encode(text) == list(text.encode("utf-8"))
    plain = BPETokenizer.train(CORPUS, 256, special_tokens=())
    assert plain.vocab_size == 256 and plain.eot_id is None


def test_training_stops_when_nothing_is_left_to_merge():
    tok = BPETokenizer.train("ab ab", 1000, special_tokens=())
    assert [tok.token_bytes(i) for i in range(256, tok.vocab_size)] == [b"ab", b" ab"]


def _reloaded(tok, tmp_path):
    tok.save(tmp_path / "tok.json")
    return BPETokenizer.load(tmp_path / "tok.json")


def test_training_never_learns_a_token_longer_than_a_tokenizer_may_hold(tmp_path):
    # "a" * 2**20 doubles its longest token with every merge; 2**15 bytes is past the limit
    tok = BPETokenizer.train("a" * (1 << 20), 400)
    lengths = [len(tok.token_bytes(i)) for i in range(256, 256 + len(tok.merges))]
    assert max(lengths) == vocab.MAX_TOKEN_BYTES
    assert _reloaded(tok, tmp_path) == tok
    assert tok.decode(tok.encode("a" * 40000)) == "a" * 40000


def test_training_stops_before_the_tokens_pass_the_bytes_a_tokenizer_may_hold(
        monkeypatch, tmp_path):
    for module in (learning, vocab):   # what training learns, and what a tokenizer holds
        monkeypatch.setattr(module, "MAX_TOTAL_TOKEN_BYTES", 256 + 100)
    tok = BPETokenizer.train("a" * 1000, 400, special_tokens=())
    assert [len(tok.token_bytes(i)) for i in range(256, tok.vocab_size)] == [2, 4, 8, 16, 32]
    assert _reloaded(tok, tmp_path) == tok


def test_training_accepts_an_iterable_and_is_reproducible():
    texts = CORPUS.split("\n\n")
    first = BPETokenizer.train(iter(texts), 400)
    assert first == BPETokenizer.train(list(texts), 400)
    assert first.fingerprint() == BPETokenizer.train(texts, 400).fingerprint()


@pytest.mark.parametrize("vocab_size", [0, 255, -1, 300.0, "300", True])
def test_bad_vocab_size_is_a_usage_error(vocab_size):
    with pytest.raises(UsageError, match="vocab_size"):
        BPETokenizer.train(CORPUS, vocab_size)


def test_vocab_size_may_be_a_numpy_integer():
    assert BPETokenizer.train(CORPUS, numpy.int64(300)) == BPETokenizer.train(CORPUS, 300)


@pytest.mark.parametrize("texts,culprit", [(b"abc", "got b'abc'"), (None, "got None"),
                                           (["ok", b"abc"], "text 1 is b'abc'")])
def test_texts_that_are_not_str_are_a_type_error(texts, culprit):
    with pytest.raises(TypeError, match=re.escape("texts must be a str or an iterable of str") +
                       ".*" + re.escape(culprit)):
        BPETokenizer.train(texts, 300)


@pytest.mark.parametrize("specials", [("",), ("<|a|>", "<|a|>"), "<a>", (None,)])
def test_bad_special_tokens_are_a_usage_error(specials):
    with pytest.raises(UsageError, match="special_tokens"):
        BPETokenizer.train(CORPUS, 300, special_tokens=specials)


def test_every_token_has_distinct_bytes(tokenizer):
    all_bytes = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    assert len(set(all_bytes)) == len(all_bytes)


# ----- encoding and decoding -------------------------------------------------


@pytest.mark.parametrize("text", HAND_PICKED)
def test_hand_picked_strings_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode_ordinary(text)) == text
    assert tokenizer.decode(tokenizer.encode(text, allowed_special="all")) == text


def test_random_strings_round_trip(tokenizer):
    for text in random_strings(1500, seed=2):
        ids = tokenizer.encode_ordinary(text)
        assert tokenizer.decode(ids) == text
        assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_merges_compress_the_training_text(tokenizer):
    assert len(tokenizer.encode_ordinary(CORPUS)) < 0.5 * len(CORPUS.encode("utf-8"))


def test_long_pieces_merge_as_short_pieces_do(tokenizer):
    # Long pieces take the heap path; it must give the round-based result.
    rng = random.Random(3)
    merge_ids = {pair: 256 + k for k, pair in enumerate(tokenizer.merges)}
    for text in [" " * 500, "a" * 333, "speak" * 70, *random_strings(50, seed=4, max_length=300)]:
        for piece in [text, text.replace(" ", "")]:
            ids = list(piece.encode("utf-8"))
            assert merge_long(ids, merge_ids) == merge_short(ids, merge_ids)
    for _ in range(200):
        ids = [rng.choice(b"aeiou ") for _ in range(rng.randint(0, 200))]
        assert merge_long(ids, merge_ids) == merge_short(ids, merge_ids)


def test_special_tokens_need_to_be_allowed(tokenizer):
    text = f"one{ENDOFTEXT}two"
    with pytest.raises(ValueError, match=re.escape(ENDOFTEXT)):
        tokenizer.encode(text)
    expected = tokenizer.encode_ordinary("one") + [tokenizer.eot_id] + tokenizer.encode_ordinary("two")
    assert tokenizer.encode(text, allowed_special="all") == expected
    assert tokenizer.encode(text, allowed_special={ENDOFTEXT}) == expected
    ordinary = tokenizer.encode_ordinary(text)
    assert tokenizer.eot_id not in ordinary and tokenizer.decode(ordinary) == text
    with pytest.raises(UsageError, match="<|nope|>"):
        tokenizer.encode("x", allowed_special={"<|nope|>"})


@pytest.mark.parametrize("allowed", [ENDOFTEXT, None, 5])
def test_allowed_special_is_all_or_a_set(tokenizer, allowed):
    with pytest.raises(TypeError, match=re.escape(
            f"allowed_special must be \"all\" or a set of special token strings such as "
            f"{{{ENDOFTEXT!r}}}, got {allowed!r}")):
        tokenizer.encode(f"one{ENDOFTEXT}", allowed_special=allowed)


@pytest.mark.parametrize("text", [None, b"abc", 5])
def test_encoding_what_is_not_a_str_is_a_type_error(tokenizer, text):
    for encode in (tokenizer.encode, tokenizer.encode_ordinary):
        with pytest.raises(TypeError, match=re.escape(f"text must be a str, got {text!r}")):
            encode(text)


@pytest.mark.parametrize("ids", [None, 5, b"ab", "ab"])
def test_decoding_what_is_not_a_sequence_of_ids_is_a_type_error(tokenizer, ids):
    with pytest.raises(TypeError, match=re.escape(f"ids must be a sequence of token ids, "
                                                  f"got {ids!r}")):
        tokenizer.decode(ids)


def test_longer_special_tokens_win_and_unallowed_ones_still_raise():
    tok = BPETokenizer.train(CORPUS, 300, special_tokens=("<|a|>", "<|a|><|b|>", "<|c|>"))
    ids = tok.encode("x<|a|><|b|>y<|a|>", allowed_special={"<|a|>", "<|a|><|b|>"})
    assert ids == [ord("x"), tok.special_tokens["<|a|><|b|>"], ord("y"), tok.special_tokens["<|a|>"]]
    with pytest.raises(ValueError, match=re.escape("<|c|>")):
        tok.encode("<|a|><|c|>", allowed_special={"<|a|>"})


def test_partial_utf8_decodes_to_replacement_character(tokenizer):
    euro = "€".encode("utf-8")  # e2 82 ac: ids 0..255 are the bytes themselves
    assert tokenizer.decode([euro[0]]) == "\ufffd"
    assert tokenizer.decode_bytes([euro[0]]) == b"\xe2"
    assert tokenizer.decode([*euro, 0x80]) == "€\ufffd"
    # A merged token can end mid-character too: cutting the ids of "é" after
    # its first token leaves a partial sequence whenever "é" takes two ids.
    ids = tokenizer.encode_ordinary("ééé")
    assert tokenizer.decode(ids) == "ééé"
    assert all(tokenizer.decode(ids[:k]).rstrip("\ufffd") in ("", "é", "éé", "ééé")
               for k in range(len(ids) + 1))


def test_decode_accepts_numpy_arrays(tokenizer):
    ids = tokenizer.encode_ordinary(CORPUS)
    assert tokenizer.decode(numpy.array(ids, dtype=numpy.uint32)) == CORPUS
    assert tokenizer.decode([]) == "" and tokenizer.decode_bytes(()) == b""


@pytest.mark.parametrize("bad", [600, 10**9, -1, 1.5, None])
def test_unknown_id_names_the_id(tokenizer, bad):
    with pytest.raises(UsageError, match=re.escape(f"token id {bad!r}")):
        tokenizer.decode([65, 66, bad, 67])


# ----- encode_chunks ---------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_encode_chunks_yields_uint32_arrays_in_order(tokenizer, workers):
    chunks = [CORPUS[i:i + 37] for i in range(0, len(CORPUS), 37)] + ["", f"a{ENDOFTEXT}b"]
    arrays = list(tokenizer.encode_chunks(iter(chunks), workers=workers))
    assert len(arrays) == len(chunks)
    for chunk, array in zip(chunks, arrays):
        assert array.dtype == numpy.uint32 and array.ndim == 1
        assert array.tolist() == tokenizer.encode_ordinary(chunk)


def test_encoding_workers_leave_ctrl_c_to_the_command(tokenizer, monkeypatch):
    """Ctrl-C reaches every process of the group; the command stops its workers
    itself, so a worker ignores it instead of printing a traceback."""
    import signal
    from xpmodel.tokenizer import parallel
    installed = {}
    monkeypatch.setattr(signal, "signal", lambda number, handler: installed.update({number: handler}))
    parallel._install_worker_tokenizer(BPETokenizer, tokenizer.to_json())
    assert installed == {signal.SIGINT: signal.SIG_IGN}
    assert parallel._encode_in_worker("hello", False).tolist() == tokenizer.encode_ordinary("hello")


# ----- files -----------------------------------------------------------------


def test_save_and_load_give_an_equal_tokenizer(tmp_path, tokenizer):
    path = tmp_path / "tok.json"
    tokenizer.save(path)
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["format"] == "xpmodel-bpe-tokenizer" and document["version"] == 1
    assert document["special_tokens"] == [ENDOFTEXT]
    assert len(document["merges"]) == len(tokenizer.merges)
    loaded = BPETokenizer.load(path)
    assert loaded == tokenizer and loaded.fingerprint() == tokenizer.fingerprint()
    assert loaded.special_tokens == tokenizer.special_tokens
    for text in HAND_PICKED:
        assert loaded.encode(text, allowed_special="all") == tokenizer.encode(text, allowed_special="all")
    assert not list(tmp_path.glob("*.partial"))


def test_fingerprint_tracks_content(tokenizer):
    fingerprint = tokenizer.fingerprint()
    assert re.fullmatch("[0-9a-f]{64}", fingerprint)
    fewer_merges = BPETokenizer(tokenizer.merges[:-1], (ENDOFTEXT,))
    other_specials = BPETokenizer(tokenizer.merges, ("<|other|>",))
    assert len({fingerprint, fewer_merges.fingerprint(), other_specials.fingerprint()}) == 3
    assert BPETokenizer(tokenizer.merges, (ENDOFTEXT,)).fingerprint() == fingerprint


def _corrupt(text):
    document = json.loads(text)
    document["merges"][3] = [0, 10**6]
    return json.dumps(document)


@pytest.mark.parametrize("damage", [
    lambda text: text[: len(text) // 2],
    lambda text: "",
    lambda text: text.replace("xpmodel-bpe-tokenizer", "something-else"),
    lambda text: text.replace('"version": 1', '"version": 99'),
    lambda text: json.dumps({"model": {"type": "BPE"}}),
    lambda text: json.dumps([1, 2, 3]),
    _corrupt,
])
def test_damaged_files_are_data_errors_naming_the_file(tmp_path, tokenizer, damage):
    path = tmp_path / "tok.json"
    path.write_text(damage(tokenizer.to_json()), encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(path))):
        BPETokenizer.load(path)


def test_binary_and_missing_files_are_data_errors(tmp_path):
    binary = tmp_path / "tok.bin"
    binary.write_bytes(b"\x80\x81\xff" * 10)
    for path in (binary, tmp_path / "missing.json"):
        with pytest.raises(DataError, match=re.escape(str(path))):
            BPETokenizer.load(path)


# ----- Hugging Face export ---------------------------------------------------


@pytest.fixture(scope="module")
def parity_texts():
    texts = HAND_PICKED + random_strings(300, seed=5) + [CORPUS, " \n \n\n   \t\t\r\n  x  "]
    shakespeare = SHARED_DATA / "tinyshakespeare.txt"
    if shakespeare.exists():
        full = shakespeare.read_text(encoding="utf-8")
        texts += [full[start:start + 3000] for start in range(0, len(full), len(full) // 20)]
    return texts


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("hf")
    export_tokenizer_hf(tokenizer, directory, model_max_length=1024)
    return directory


def test_tokenizers_library_gives_the_same_ids(tokenizer, hf_dir, parity_texts):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert hf.get_vocab_size() == tokenizer.vocab_size
    for text in parity_texts:
        ids = tokenizer.encode(text, allowed_special="all")
        assert hf.encode(text).ids == ids, text
        assert hf.decode(ids, skip_special_tokens=False) == text


def test_transformers_loads_the_export(tokenizer, hf_dir, parity_texts, tmp_path):
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert auto.eos_token_id == auto.bos_token_id == tokenizer.eot_id
    assert auto.model_max_length == 1024
    # vocab.json + merges.txt alone, as the GPT-2 tokenizers read them.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(hf_dir / name, tmp_path / name)
    from_files = [cls.from_pretrained(tmp_path) for cls in
                  (transformers.GPT2TokenizerFast, transformers.GPT2Tokenizer)]
    for text in parity_texts[::3]:
        ids = tokenizer.encode(text, allowed_special="all")
        assert auto.encode(text) == ids, text
        assert auto.decode(ids) == text
        for other in from_files:
            assert other.encode(text) == ids, text


def test_two_merges_make_one_token_only_when_tokens_are_given(tmp_path):
    # (a, b) then (ab, c) and (b, c) then (a, bc): "abc" twice.
    merges = [(97, 98), (256, 99), (98, 99), (97, 258)]
    with pytest.raises(UsageError, match="ids 257 and 259 are both b'abc'"):
        BPETokenizer(merges, ())
    # With the tokens given, both merges make "abc" (id 257), as in vocabs converted from tiktoken.
    tok = BPETokenizer([(97, 98), (256, 99), (98, 99), (97, 258)], (),
                       tokens=[b"ab", b"abc", b"bc"])
    assert tok.vocab_size == 259 and tok.encode("abc") == [257]
    export_tokenizer_hf(tok, tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"] == [
        "a b", "ab c", "b c", "a bc"]


def test_hf_file_errors_show_at_most_about_100_characters_of_a_value(tmp_path):
    from xpmodel.tokenizer.hf_import import read_hf_tokenizer
    tok = BPETokenizer.train("hello world " * 50, 260)
    export_tokenizer_hf(tok, tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    huge = "x" * (1 << 20)
    (tmp_path / "merges.txt").write_text(f"#version: 0.2\n{huge}\n")
    with pytest.raises(DataError) as caught:
        read_hf_tokenizer(tmp_path)
    assert "is not two tokens" in str(caught.value) and len(str(caught.value)) < 400
    document = json.loads((tmp_path / "vocab.json").read_text())
    document[huge] = len(document)
    (tmp_path / "vocab.json").write_text(json.dumps(document))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises((DataError, UsageError)) as caught:
        read_hf_tokenizer(tmp_path)
    assert len(str(caught.value)) < 400, str(caught.value)[:500]
