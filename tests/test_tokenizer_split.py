"""Tokenizers that split by their own regex, as Llama 3's and Qwen2's do.

Tiny tokenizers are trained offline with the `tokenizers` library in the form
those models ship (a Split by the pattern, behavior "Isolated", then a
ByteLevel that only maps bytes; Llama 3's BPE with ignore_merges, Qwen2's
with an NFC normalizer), saved, imported, and checked id for id against
`tokenizers` on varied and random text; then exported back, and imported with
a tiny random LlamaForCausalLM whose logits must match.
"""
import json
import time
import unicodedata
from collections import Counter

import numpy
import pytest

from test_tokenizer import CORPUS, HAND_PICKED, random_strings
from xpmodel.errors import DataError, UsageError
from xpmodel.tokenizer.bpe import ENDOFTEXT, GPT2_SPLIT_PATTERN, BPETokenizer
from xpmodel.tokenizer import pretokenize
from xpmodel.tokenizer.hf_export import export_tokenizer_hf
from xpmodel.tokenizer.hf_forms import gpt2_byte_to_unicode
from xpmodel.tokenizer.hf_import import read_hf_tokenizer

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

TRAINING_TEXT = CORPUS * 3 + "".join(random_strings(60, seed=3)) + (
    "It's IT'S it'S we'll WE'LL they'RE I'm I'M you'd YOU'D we've 's 'ſ\n"
    "1 12 123 1234 12345 2024 3.14 1,000,000 ١٢٣ ½\n...!!! ??? --- ;;\n\n\n  \n\t\t\r\n") * 4
TEXTS = HAND_PICKED + [
    "It's IT'S it'S We'Ll they'RE I'M you'D we'VE 'S'T'Re'vE'M'lL'D 'ſ 'K x's",
    "don't'll ''s '''re 's's",
    "1 12 123 1234 12345 x1y22z333w4444v55555 ١٢٣٤٥ ⅠⅡⅢ ½² 3.14159 -42",
    "e\u0301 a\u0308 n\u0303 Z\u0351\u0358\u0334a\u0362l\u0344g\u0335o \u0301start ǅ ß ẞ İ ı",
    "...!!!??? --- (a) [b]{c} <|x|> \"q\" «guillemets» — – ‐ :) ;-) !!\n!!\r\n",
    "\n", "\r\n", "\n\n\n", "\r\r", "  \n  ", " \n", "\n ", "a  \n b", "a \n\n b", "a\t\n\tb",
    "\u00a0x\u00a0 \u2028y\u2029 \u3000z\u3000 \u200bw \x0b\x0c\x1c\x1d\x85v", "tail   ", "   ",
    "x" + " " * 70 + "y" + "\n" * 70,   # long pieces merge with the heap
]


def hf_tokenizer(pattern, ignore_merges=False, nfc=False, vocab_size=600, specials=(ENDOFTEXT,)):
    """A `tokenizers.Tokenizer` trained on TRAINING_TEXT in the Llama 3 / Qwen2 form."""
    tok = tokenizers.Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TRAINING_TEXT], trainer)
    if ignore_merges:   # the trainer builds a BPE without it; Llama 3's has it
        document = json.loads(tok.to_str())
        document["model"]["ignore_merges"] = True
        tok = tokenizers.Tokenizer.from_str(json.dumps(document))
    return tok


FORMS = {"llama3": dict(pattern=LLAMA3_PATTERN, ignore_merges=True),
         "llama3_plain": dict(pattern=LLAMA3_PATTERN),
         "qwen2": dict(pattern=QWEN2_PATTERN, nfc=True)}


@pytest.fixture(scope="module", params=list(FORMS))
def imported(request, tmp_path_factory):
    """(form, HF tokenizer, xpmodel tokenizer, hf_ids) for each form."""
    hf = hf_tokenizer(**FORMS[request.param])
    directory = tmp_path_factory.mktemp(request.param)
    hf.save(str(directory / "tokenizer.json"))
    tok, hf_ids = read_hf_tokenizer(directory)
    return request.param, hf, tok, hf_ids


def all_texts():
    """TEXTS and random strings of code points assigned in Python's Unicode
    tables: the `regex` module's tables are newer than Oniguruma's in
    `tokenizers`, and count some code points unassigned there as letters."""
    assigned = ["".join(c for c in text if unicodedata.category(c) != "Cn")
                for text in random_strings(300, seed=11, max_length=60)]
    return TEXTS + assigned


def test_split_matches_tokenizers_pieces():
    # The pre-tokenization alone, before any merge: the pattern means to the
    # `regex` module what it means to Oniguruma.
    # Wrapped in a group, Llama 3's pattern splits under the time budget.
    for pattern in (LLAMA3_PATTERN, QWEN2_PATTERN, GPT2_SPLIT_PATTERN, f"(?:{LLAMA3_PATTERN})"):
        ours = BPETokenizer(split_pattern=pattern)._pieces
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
        for text in all_texts():
            assert ours(text) == [p for p, _ in split.pre_tokenize_str(text)], (pattern, text)


@pytest.mark.parametrize("pattern, text", [
    (r"x*|ab", "xab xxab abx"),           # empty matches right after a match
    (r"a$", "a\nba\na"),                   # $ at line ends, as Oniguruma's
    (r"^b", "b\nab\nb"),
    (r"\d+", "ab12cd345"),                 # text between matches is a piece too
    (r"(a)|(b)", "xaybz"),                 # groups: whole matches, not groups
    (r"(?=x)", "axbxx"),                   # only empty matches
])
def test_split_handles_gaps_and_empty_matches_as_tokenizers_does(pattern, text):
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
    assert BPETokenizer(split_pattern=pattern)._pieces(text) == [
        p for p, _ in split.pre_tokenize_str(text)]


def test_imported_tokenizer_gives_the_same_ids(imported):
    form, hf, tok, hf_ids = imported
    assert tok.split_pattern == FORMS[form]["pattern"]
    assert tok.ignore_merges == FORMS[form].get("ignore_merges", False)
    assert tok.normalizer == ("nfc" if FORMS[form].get("nfc") else None)
    assert len(tok.merges) > 200
    for text in all_texts():
        ours = tok.encode(text, allowed_special="all")
        assert hf_ids[ours].tolist() == hf.encode(text).ids, text
        expected = unicodedata.normalize("NFC", text) if tok.normalizer else text
        assert tok.decode(ours) == expected
        assert hf.decode(hf.encode(text).ids, skip_special_tokens=False) == expected


def test_ignore_merges_takes_a_whole_piece_that_is_a_token():
    # Merges "ab" then "bc" and "a"+"bc": by merges, "abc" is ab|c; with
    # ignore_merges the piece "abc" is its token.
    a, b, c = b"abc"
    merges = [(a, b), (b, c), (a, 257)]
    plain = BPETokenizer(merges, (), split_pattern=r"\p{L}+|\s+")
    whole = BPETokenizer(merges, (), split_pattern=r"\p{L}+|\s+", ignore_merges=True)
    assert plain.encode("abc abcc") == [256, c, 32, 256, c, c]
    assert whole.encode("abc abcc") == [258, 32, 256, c, c]
    assert whole.fingerprint() != plain.fingerprint() and whole != plain


def test_options_are_stored_and_fingerprinted(imported, tmp_path):
    form, _, tok, _ = imported
    gpt2 = BPETokenizer(tok.merges, tok.special_tokens)
    assert gpt2.split_pattern == GPT2_SPLIT_PATTERN
    assert tok.fingerprint() != gpt2.fingerprint() and tok != gpt2
    tok.save(tmp_path / "tok.json")
    document = json.loads((tmp_path / "tok.json").read_text(encoding="utf-8"))
    assert (document["version"], document["pre_tokenizer"]) == (2, "split")
    assert document["split_pattern"] == FORMS[form]["pattern"]
    loaded = BPETokenizer.load(tmp_path / "tok.json")
    assert loaded == tok and loaded.fingerprint() == tok.fingerprint()
    text = "It's 12345 naïve\r\n\n  x"
    assert [a.tolist() for a in tok.encode_chunks([text, text[::-1]], workers=2)] == [
        tok.encode(text), tok.encode(text[::-1])]


def test_gpt2_pattern_is_stored_as_before(tmp_path):
    # Spelled out, GPT-2's pattern is the default: version 1, "gpt2", no key added.
    tok = BPETokenizer.train(CORPUS, 300, split_pattern=GPT2_SPLIT_PATTERN)
    assert tok == BPETokenizer.train(CORPUS, 300)
    document = json.loads(tok.to_json())
    assert list(document) == ["format", "version", "pre_tokenizer", "special_tokens", "merges"]
    assert (document["version"], document["pre_tokenizer"]) == (1, "gpt2")


def test_training_with_a_pattern_splits_by_it():
    tok = BPETokenizer.train(TRAINING_TEXT, 400, split_pattern=LLAMA3_PATTERN)
    assert tok.split_pattern == LLAMA3_PATTERN
    # Llama 3 keeps at most three digits together, whatever was learned.
    assert all(len(tok.token_bytes(i)) <= 3 for i in tok.encode("1234567 12345678"))
    assert tok.decode(tok.encode(TRAINING_TEXT)) == TRAINING_TEXT


def test_export_writes_the_split_form_back(imported, tmp_path):
    form, hf, tok, _ = imported
    export_tokenizer_hf(tok, tmp_path)
    document = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    split, byte_level = document["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"] == {"Regex": FORMS[form]["pattern"]}
    assert (byte_level["type"], byte_level["use_regex"]) == ("ByteLevel", False)
    check_export(tok, tmp_path, all_texts()[:120])


def test_transformers_loads_the_export(imported, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, _, tok, _ = imported
    export_tokenizer_hf(tok, tmp_path)
    check_transformers_export(transformers, tok, tmp_path, TEXTS)


# ----- refusals -------------------------------------------------------------


def byte_level(use_regex):
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
            "use_regex": use_regex}


def split(pattern=LLAMA3_PATTERN, **changes):
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
            "invert": False, **changes}


def sequence(*steps):
    return {"type": "Sequence", "pretokenizers": list(steps)}


@pytest.fixture(scope="module")
def llama3_document():
    return json.loads(hf_tokenizer(LLAMA3_PATTERN, vocab_size=300).to_str())


@pytest.mark.parametrize("key, value, named", [
    ("pre_tokenizer", sequence({"type": "Digits", "individual_digits": True}, byte_level(True)),
     "pre_tokenizer 'Digits' is not supported"),
    ("pre_tokenizer", {"type": "Metaspace", "replacement": "▁"}, "'Metaspace'"),
    ("pre_tokenizer", sequence(split(behavior="Removed"), byte_level(False)),
     "Split behavior 'Removed'"),
    ("pre_tokenizer", sequence(split(invert=True), byte_level(False)), "Split invert"),
    ("pre_tokenizer", sequence(dict(split(), pattern={"String": " "}), byte_level(False)),
     "Split pattern {'String': ' '}"),
    ("pre_tokenizer", sequence(split(), byte_level(True)), "ByteLevel use_regex true"),
    ("pre_tokenizer", byte_level(False), "use_regex false with no Split"),
    ("pre_tokenizer", sequence(split(), split(), byte_level(False)), "Sequence of 3 steps"),
    ("pre_tokenizer", sequence(split("(unclosed"), byte_level(False)), "does not compile"),
    ("pre_tokenizer", sequence(split("a" * 4097), byte_level(False)),
     "4,097 bytes, more than the 4,096"),
    ("normalizer", {"type": "NFKC"}, "normalizer 'NFKC'"),
    ("decoder", {"type": "Metaspace"}, "decoder 'Metaspace'"),
])
def test_import_refuses_other_forms_naming_the_part(llama3_document, tmp_path, key, value, named):
    document = dict(llama3_document, **{key: value})
    (tmp_path / "tokenizer.json").write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(UsageError, match="tokenizer.json: .*" + named.replace("(", r"\(")
                       .replace("{", r"\{").replace("[", r"\[")) as info:
        read_hf_tokenizer(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("model, named", [
    ({"type": "Unigram", "vocab": [["a", 0.0]]}, "model type 'Unigram'"),
    ({"type": "BPE", "byte_fallback": True, "vocab": {"a": 0}, "merges": []},
     "pre_tokenizer 'Sequence' with BPE byte_fallback is not supported"),
])
def test_import_refuses_sentencepiece_parts_with_a_split(llama3_document, tmp_path, model, named):
    (tmp_path / "tokenizer.json").write_text(json.dumps(dict(llama3_document, model=model)))
    with pytest.raises(UsageError, match=named):
        read_hf_tokenizer(tmp_path)


@pytest.mark.parametrize("pattern, named", [("(unclosed", "does not compile"),
                                            ("", "non-empty string"), (7, "non-empty string"),
                                            ("a" * 5000, "more than the 4,096")])
def test_a_bad_pattern_in_a_tokenizer_file_is_a_data_error_naming_it(tmp_path, pattern, named):
    path = tmp_path / "tok.json"
    path.write_text(json.dumps({"format": "xpmodel-bpe-tokenizer", "version": 2,
                                "pre_tokenizer": "split", "split_pattern": pattern,
                                "special_tokens": [], "merges": []}))
    with pytest.raises(DataError, match=f"tok.json: tokenizer file is not usable: .*{named}"):
        BPETokenizer.load(path)
    with pytest.raises(UsageError, match=named):
        BPETokenizer(split_pattern=pattern)


# ----- patterns that backtrack ----------------------------------------------

# Nested repeats: the first alternative backtracks exponentially on a run of
# word characters with no NUL after it (four characters take seconds).
BACKTRACKING = r"(?:(?:(?:\w?){1,9}){1,9}){1,9}\x00|\w+|\s+|[^\w\s]+"
# The same only after a "Q", which no probe string holds: only the budget of
# each split stops it.
BACKTRACKING_AFTER_Q = "Q" + BACKTRACKING


def test_the_linear_patterns_are_the_ones_checked_against_tokenizers():
    assert pretokenize.LINEAR_SPLIT_PATTERNS == (GPT2_SPLIT_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN)


def test_a_pattern_that_backtracks_is_refused_when_checked(monkeypatch, tmp_path):
    monkeypatch.setattr(pretokenize, "PROBE_SECONDS", 0.2, raising=False)
    start = time.perf_counter()
    with pytest.raises(UsageError, match=r"split pattern '\(\?:.*backtracks too much") as info:
        BPETokenizer(split_pattern=BACKTRACKING)
    assert "\n" not in str(info.value)
    path = tmp_path / "tok.json"
    path.write_text(json.dumps({"format": "xpmodel-bpe-tokenizer", "version": 2,
                                "pre_tokenizer": "split", "split_pattern": BACKTRACKING,
                                "special_tokens": [ENDOFTEXT], "merges": []}))
    with pytest.raises(DataError, match="tok.json: tokenizer file is not usable: .*backtracks"):
        BPETokenizer.load(path)
    assert time.perf_counter() - start < 30


def test_import_refuses_a_split_that_backtracks(llama3_document, tmp_path, monkeypatch):
    monkeypatch.setattr(pretokenize, "PROBE_SECONDS", 0.2, raising=False)
    document = dict(llama3_document, pre_tokenizer=sequence(split(BACKTRACKING), byte_level(False)))
    (tmp_path / "tokenizer.json").write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(UsageError, match="tokenizer.json: the split pattern .* backtracks too much"):
        read_hf_tokenizer(tmp_path)


def test_a_split_past_its_budget_is_a_data_error_naming_the_pattern(monkeypatch):
    tok = BPETokenizer(split_pattern=BACKTRACKING_AFTER_Q)   # passes the probes
    assert tok.encode_ordinary("a Q b") == tok.encode_ordinary("a Q b")
    monkeypatch.setattr(pretokenize, "SPLIT_SECONDS", 0.02, raising=False)
    text = " ".join(["Qaaa"] * 4)   # the old splitter took about half a second
    for call in (tok.encode_ordinary, lambda t: BPETokenizer.train(t, 300, (),
                                                                   BACKTRACKING_AFTER_Q)):
        with pytest.raises(DataError, match=r"split pattern 'Q\(\?:.*backtracks too much: "
                                            r"splitting 19 characters") as info:
            call(text)
        assert "\n" not in str(info.value)


def test_a_split_past_its_budget_in_a_worker_is_the_same_error():
    # Workers split with the default budget of SPLIT_SECONDS.
    tok = BPETokenizer(split_pattern=BACKTRACKING_AFTER_Q)
    with pytest.raises(DataError, match="backtracks too much"):
        list(tok.encode_chunks(["fine text\n", "Q" + "a" * 20], workers=2))


# Runs of one kind of character and of two interleaved, on which a regex
# engine could be slowest.
LONG_TEXTS = {"spaces": " " * 65536, "spaces then a letter": " " * 65535 + "a",
              "letters": "a" * 65536, "digits": "1" * 65536, "punctuation": "!" * 65536,
              "newlines": "\n" * 65536, "crlf": "\r\n" * 32768, "space newline": " \n" * 32768,
              "space tab": " \t" * 32768 + "x", "cjk": "\u4e2d" * 65536, "apostrophes": "'" * 65536,
              "apostrophe s": "'s" * 32768, "space punctuation": " !" * 32768,
              "prose": (CORPUS * 200)[:65536]}


@pytest.mark.parametrize("pattern", [GPT2_SPLIT_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN],
                         ids=["gpt2", "llama3", "qwen2"])
def test_the_linear_patterns_split_long_texts_well_within_the_budget(pattern):
    # The budget the three would have if they had one: each split takes a
    # small part of it (tens of milliseconds where the budget is 8.5 s).
    compiled = pretokenize.check_split_pattern(pattern)
    for name, text in LONG_TEXTS.items():
        budget = (pretokenize.SPLIT_SECONDS + len(text) * pretokenize.SPLIT_SECONDS_PER_CHAR) / 10
        pieces = pretokenize._budgeted_pieces(compiled, text, time.process_time() + budget)
        assert "".join(pieces) == text, name
    for text in pretokenize._PROBE_TEXTS:
        assert "".join(pretokenize._budgeted_pieces(compiled, text, time.process_time() + 0.1)) == text


# ----- Meta's Llama 3 layout, converted from tiktoken -----------------------


def tiktoken_style_tokenizer():
    """A Llama 3 tokenizer laid out as Meta's tokenizer.json (converted from
    tiktoken): every split of a token into two tokens is a merge, ranked by
    the token's id, so one token has several merges and a merge may rank
    before the merges that make its sides; and tokens with no merge at all
    that only ignore_merges reaches. Returns (tokenizer, the whole-only names)."""
    document = json.loads(hf_tokenizer(LLAMA3_PATTERN, vocab_size=400).to_str())
    vocab = document["model"]["vocab"]
    specials = [token["content"] for token in document["added_tokens"]]
    byte_to_char = gpt2_byte_to_unicode()
    split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False)
    counts = Counter("".join(byte_to_char[b] for b in piece.encode("utf-8"))
                     for piece, _ in split.pre_tokenize_str(TRAINING_TEXT))
    unseen = [name for name, _ in counts.most_common() if name not in vocab and len(name) > 1]
    whole, later = unseen[:30], unseen[30:60]
    names = sorted((name for name in vocab if name not in specials), key=vocab.get) + whole
    names += list(dict.fromkeys(name[1:] for name in later if name[1:] not in names))
    names += [name for name in later if name not in names]   # ids after their own right sides
    ids = {name: i for i, name in enumerate(names)}
    merges = []
    for name in names:
        if name not in whole:
            splits = [(name[:i], name[i:]) for i in range(1, len(name))
                      if {name[:i], name[i:]} <= ids.keys() - set(whole)]
            merges += sorted(splits, key=lambda pair: (ids[pair[0]], ids[pair[1]]))
    for k, token in enumerate(document["added_tokens"]):
        token["id"] = ids[token["content"]] = len(names) + k
    document["model"].update(vocab=ids, merges=[list(pair) for pair in merges], ignore_merges=True)
    return tokenizers.Tokenizer.from_str(json.dumps(document)), whole


def test_meta_llama3_layout_imports_exactly(tmp_path):
    hf, whole = tiktoken_style_tokenizer()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok, hf_ids = read_hf_tokenizer(tmp_path)
    made = {tok.token_bytes(left) + tok.token_bytes(right) for left, right in tok.merges}
    assert tok.ignore_merges and len(made) < len(tok.merges)   # tokens with several merges
    assert tok._long_piece == 0   # a merge ranks before one making its side: all by heap
    reached = set()
    for text in all_texts() + [TRAINING_TEXT]:
        ours = tok.encode(text, allowed_special="all")
        assert hf_ids[ours].tolist() == hf.encode(text).ids, text
        assert tok.decode(ours) == text
        reached.update(tok.decode([i]) for i in ours)
    byte_to_char = gpt2_byte_to_unicode()
    whole_texts = {bytes(b for c in name for b, char in byte_to_char.items() if char == c)
                   .decode("utf-8") for name in whole}
    assert len(whole_texts & reached) > 20   # tokens that no merge makes

    tok.save(tmp_path / "tok.json")
    document = json.loads((tmp_path / "tok.json").read_text(encoding="utf-8"))
    assert len(document["tokens"]) == tok.vocab_size - 256 - 1
    assert BPETokenizer.load(tmp_path / "tok.json") == tok
    export_tokenizer_hf(tok, tmp_path / "back")
    exported = tokenizers.Tokenizer.from_file(str(tmp_path / "back" / "tokenizer.json"))
    for text in all_texts()[:120] + [TRAINING_TEXT]:
        assert exported.encode(text).ids == tok.encode(text, allowed_special="all"), text
    assert read_hf_tokenizer(tmp_path / "back")[0] == tok


# ----- a Llama model with such a tokenizer ----------------------------------


def test_llama_with_a_llama3_tokenizer_imports_and_exports(tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from test_hf_llama import (BLOCK, PADDED_VOCAB, TOKENIZER_VOCAB, hf_logits, hf_random_llama,
                               relative_error, xp_model)
    from xpmodel.hf.convert import export_hf, import_hf
    hf_tok = hf_tokenizer(LLAMA3_PATTERN, ignore_merges=True, vocab_size=TOKENIZER_VOCAB)
    hf_model = hf_random_llama(seed=21)
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    hf_tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    config, arrays, tok = import_hf(tmp_path / "hf")
    assert (tok.split_pattern, tok.ignore_merges) == (LLAMA3_PATTERN, True)
    _, hf_ids = read_hf_tokenizer(tmp_path / "hf")
    assert not numpy.array_equal(hf_ids, numpy.arange(len(hf_ids)))  # specials first
    column = numpy.concatenate([hf_ids, numpy.arange(len(hf_ids), PADDED_VOCAB)])
    ours = xp_model(config, arrays)
    for text in TEXTS[10:14] + ["It's 12345 we'LL see\n\n  naïve café"]:
        ids = tok.encode(text, allowed_special="all")[:BLOCK]
        theirs = hf_tok.encode(text).ids[:BLOCK]
        assert column[ids].tolist() == theirs, text
        logits = hf_logits(hf_model, [theirs])[..., column]   # columns in xpmodel's order
        assert relative_error(ours.forward(numpy.array([ids])), logits) < 1e-4, text
    export_hf(ours, tok, tmp_path / "back")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    text = "It's 12345 we'LL see\n\n  naïve café"
    assert loaded(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    _, _, again = import_hf(tmp_path / "back")
    assert again == tok


def check_export(tok, folder, texts):
    """The tokenizer.json `tok` exported to `folder` encodes and decodes `texts`
    as `tok` does in `tokenizers`, and reads back as `tok`."""
    exported = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in texts:
        ids = tok.encode(text, allowed_special="all")
        assert exported.encode(text).ids == ids, text
        assert exported.decode(ids, skip_special_tokens=False) == tok.decode(ids)
    again, hf_ids = read_hf_tokenizer(folder)
    assert again == tok and numpy.array_equal(hf_ids, numpy.arange(tok.vocab_size))


def check_transformers_export(transformers, tok, folder, texts):
    """transformers' AutoTokenizer reads `folder` and encodes and decodes `texts` as `tok` does."""
    loaded = transformers.AutoTokenizer.from_pretrained(folder)
    for text in texts:
        ids = tok.encode(text, allowed_special="all")
        assert loaded(text, add_special_tokens=False)["input_ids"] == ids, text
        assert loaded.decode(ids) == tok.decode(ids)
