"""SentencePiece-style BPE tokenizers, as Llama 2, Mistral and TinyLlama store them.

Tiny tokenizers are trained offline with the `tokenizers` library on words
that start with "▁" (as SentencePiece trains), then given the layout of
Llama 2's tokenizer.json: <unk>, <s>, </s>, the 256 byte-fallback tokens
"<0x00>".."<0xFF>", then the trained tokens, with BPE byte_fallback, spaces
written "▁" by a normalizer or a Metaspace pre-tokenizer, and the Replace,
ByteFallback, Fuse (, Strip) decoder. The alphabet is kept small so that
characters outside it fall back to bytes. Each form is imported and checked
id for id and text for text against `tokenizers`, saved, exported back, and
imported with a tiny random LlamaForCausalLM that `--init-from` fine-tunes.
"""
import dataclasses
import json
import random

import numpy
import pytest

from test_tokenizer import CORPUS, random_strings
from test_tokenizer_split import TEXTS, TRAINING_TEXT, check_export, check_transformers_export
from xpmodel.data import iter_text_pieces, prepare, read_token_file
from xpmodel.errors import UsageError
from xpmodel.tokenizer.bpe import BPETokenizer, Metaspace
from xpmodel.tokenizer.hf_export import export_tokenizer_hf
from xpmodel.tokenizer.hf_import import read_hf_tokenizer

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import models, pre_tokenizers, trainers  # noqa: E402

SPACE = "\u2581"
SPECIALS = ["<unk>", "<s>", "</s>"]
PREPEND = {"type": "Prepend", "prepend": SPACE}
REPLACE_SPACES = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
DECODERS = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]
STRIP = {"type": "Strip", "content": " ", "start": 1, "stop": 0}


def metaspace(prepend_scheme, split):
    return {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": prepend_scheme,
            "split": split}


# (normalizer, pre_tokenizer, decoder steps) of each form, and the Metaspace xpmodel reads.
FORMS = {
    "llama2": ({"type": "Sequence", "normalizers": [PREPEND, REPLACE_SPACES]}, None,
               DECODERS + [STRIP], Metaspace("always", False, True)),
    "metaspace_first": (None, metaspace("first", False), DECODERS + [STRIP],
                        Metaspace("first", False, True)),
    "metaspace_split": (None, metaspace("always", True), DECODERS,
                        Metaspace("unless_space", True, False)),
    "replace_only": (REPLACE_SPACES, None, DECODERS, Metaspace("never", False, False)),
}
VARIED = TEXTS + [
    "<s>Hello</s> world", "x</s>", "</s>", " lead", "  two", "   ", "a\u2581b \u2581\u2581c", "",
    "中文 and 日本語 mixed 🎉🎉 emoji \U0001f600", "tab\tand\nnewlines\n\n  \n", "trail ",
]


def sp_document(vocab_size=500, trained_on_words=True):
    """Llama 2's tokenizer.json layout around a BPE trained on TRAINING_TEXT."""
    tok = tokenizers.Tokenizer(models.BPE())
    if trained_on_words:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")
    else:
        tok.normalizer = tokenizers.normalizers.Replace(" ", SPACE)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, limit_alphabet=70, show_progress=False)
    tok.train_from_iterator([TRAINING_TEXT], trainer)
    document = json.loads(tok.to_str())
    trained = document["model"]["vocab"]
    names = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + sorted(trained, key=trained.get)
    document["model"].update(vocab={name: i for i, name in enumerate(names)}, byte_fallback=True,
                             unk_token="<unk>", fuse_unk=True)
    document["added_tokens"] = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True} for i, s in enumerate(SPECIALS)]
    return document


def in_form(document, form):
    normalizer, pre_tokenizer, decoders, _ = FORMS[form]
    return dict(document, normalizer=normalizer, pre_tokenizer=pre_tokenizer,
                decoder={"type": "Sequence", "decoders": decoders})


@pytest.fixture(scope="module")
def trained_document():
    return sp_document()


@pytest.fixture(scope="module", params=list(FORMS))
def imported(request, trained_document, tmp_path_factory):
    """(form, HF tokenizer, xpmodel tokenizer, hf_ids) for each form."""
    directory = tmp_path_factory.mktemp(request.param)
    text = json.dumps(in_form(trained_document, request.param))
    (directory / "tokenizer.json").write_text(text, encoding="utf-8")
    tok, hf_ids = read_hf_tokenizer(directory)
    return request.param, tokenizers.Tokenizer.from_str(text), tok, hf_ids


def texts():
    return VARIED + random_strings(200, seed=5, max_length=60)


def test_imported_tokenizer_gives_the_same_ids_and_text(imported):
    form, hf, tok, hf_ids = imported
    assert tok.metaspace == FORMS[form][3] and tok.split_pattern is None
    assert hf_ids[:3].tolist() == [3, 4, 5] and hf_ids[-3:].tolist() == [0, 1, 2]  # bytes first
    fell_back = 0
    for text in texts():
        ours = tok.encode(text, allowed_special="all")
        theirs = hf.encode(text).ids
        assert hf_ids[ours].tolist() == theirs, text
        assert tok.decode(ours) == hf.decode(theirs, skip_special_tokens=False), text
        fell_back += sum(i < 256 for i in ours)
    assert fell_back > 50   # characters outside the vocab took their bytes
    assert len(tok.encode_ordinary(CORPUS)) < 0.5 * len(CORPUS)


def test_any_ids_decode_as_tokenizers_decodes_them(imported):
    # Runs of byte ids that are not UTF-8 become one U+FFFD per byte, as ByteFallback does.
    _, hf, tok, hf_ids = imported
    rng = random.Random(0)
    for _ in range(400):
        ids = [rng.randrange(256) for _ in range(rng.randint(0, 6))]
        ids += [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 8))]
        rng.shuffle(ids)
        assert tok.decode(ids) == hf.decode(hf_ids[ids].tolist(), skip_special_tokens=False), ids
    assert tok.decode(numpy.array([0xE4, 0xB8, 0xAD, 0xE4])) == "\ufffd" * 4
    assert tok.decode([0xE4, 0xB8, 0xAD]) == "中"


def test_the_tokenizer_is_saved_and_loaded_whole(imported, tmp_path):
    form, _, tok, _ = imported
    tok.save(tmp_path / "tok.json")
    document = json.loads((tmp_path / "tok.json").read_text(encoding="utf-8"))
    assert (document["version"], document["pre_tokenizer"]) == (2, "metaspace")
    assert document["metaspace"] == dataclasses.asdict(FORMS[form][3])
    assert bytes.fromhex(document["tokens"][0]) == tok.token_bytes(256)
    loaded = BPETokenizer.load(tmp_path / "tok.json")
    assert loaded == tok and loaded.fingerprint() == tok.fingerprint()
    text = "Hello  wörld 中文\n x"
    assert [a.tolist() for a in tok.encode_chunks([text, text[::-1]], workers=2)] == [
        tok.encode(text), tok.encode(text[::-1])]


def test_export_writes_the_form_back(imported, tmp_path):
    form, _, tok, _ = imported
    export_tokenizer_hf(tok, tmp_path)
    assert not (tmp_path / "vocab.json").exists()   # GPT2Tokenizer would read them as byte-level
    check_export(tok, tmp_path, texts()[:120])


def test_transformers_loads_the_export(imported, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, _, tok, _ = imported
    export_tokenizer_hf(tok, tmp_path)
    check_transformers_export(transformers, tok, tmp_path, VARIED)


# ----- streamed text and corpora --------------------------------------------


def test_text_decoded_as_it_streams_is_the_decoded_text(imported):
    # Ids one at a time: whole characters only, a run of byte ids held until it
    # ends (one byte that is not UTF-8 makes all of it U+FFFD), one space stripped.
    _, _, tok, _ = imported
    rng = random.Random(1)
    for text in texts()[:150]:
        ids = tok.encode(text, allowed_special="all")
        for _ in range(3):
            at = rng.randint(0, len(ids))
            ids[at:at] = [rng.randrange(128, 256) for _ in range(rng.randint(1, 3))]
            decoder, streamed = tok.incremental_decoder(), ""
            for token in ids:
                streamed += decoder.decode([token])
                assert tok.decode(ids).startswith(streamed)
            assert streamed + decoder.decode([], final=True) == tok.decode(ids), ids
    decoder = tok.incremental_decoder()
    assert [decoder.decode([b]) for b in "中".encode()] == ["", "", ""]
    assert decoder.decode([0xE4]) == "" and decoder.decode([], final=True) == "\ufffd" * 4
    # After a prompt the ids decode as they do after it, spaces included.
    context, whole = tok.encode("Hello"), tok.encode("Hello world 中")
    assert whole[:len(context)] == context
    after = tok.incremental_decoder(context)
    streamed = "".join(after.decode([i]) for i in whole[len(context):])
    assert tok.decode(context) + streamed + after.decode([], final=True) == tok.decode(whole)
    assert tok.decode(whole).endswith("Hello world 中")


def test_sample_prints_what_the_tokenizer_decodes(imported, monkeypatch, capsys):
    from xpmodel.cli import main as cli
    _, _, tok, _ = imported
    context = tok.encode("Hello")
    sampled = (tok.encode("Hello world, 中文 🎉!")[len(context):] + [0xE4, 0xB8]
               + tok.encode("Hello end")[len(context):])
    monkeypatch.setattr("xpmodel.train.runs.load", lambda *args, **kwargs: (None, tok))
    monkeypatch.setattr("xpmodel.model.generate.generate", lambda *args, **kwargs: iter(sampled))
    for prompt, before in [("Hello", context), ("", [])]:
        assert cli.main(["sample", "run", "--prompt", prompt, "--max-new-tokens", "99"]) == 0
        shown = tok.decode(before)
        assert capsys.readouterr().out == prompt + tok.decode(before + sampled)[len(shown):] + "\n"
    assert "\ufffd\ufffd" in tok.decode(sampled) and "中文 🎉" in tok.decode(sampled)


def test_a_corpus_read_in_pieces_encodes_as_its_whole_documents(imported, tmp_path):
    form, _, tok, _ = imported
    lines = [t.replace("\0", "") for t in VARIED + random_strings(40, seed=7, max_length=60)]
    documents = [" " + "\n".join(lines),
                 "no_space_" * 40 + "\n" + "a\u2581b" * 30, "First line\nsecond \u2581 line\n"]
    for i, document in enumerate(documents):
        (tmp_path / "corpus").mkdir(exist_ok=True)
        (tmp_path / "corpus" / f"{i}.txt").write_text(document, encoding="utf-8")
    assert tok.eot_id is None   # documents follow each other with nothing between
    path = prepare(str(tmp_path / "corpus"), tok, cache_dir=tmp_path / "cache", chunk_bytes=64,
                   workers=2 if form == "llama2" else 1)
    pieces = sum(1 for _ in iter_text_pieces(str(tmp_path / "corpus"), 64))
    assert pieces > 3 * len(documents)
    assert read_token_file(path).tolist() == sum(map(tok.encode_ordinary, documents), [])


# ----- refusals -------------------------------------------------------------


def drop_byte_token(document):
    document["model"]["vocab"] = {name: i for i, name in enumerate(
        n for n in document["model"]["vocab"] if n != "<0x41>")}


def add_token(document, name):
    vocab = document["model"]["vocab"]
    vocab[name] = len(vocab)


@pytest.mark.parametrize("edit, named", [
    (lambda d: d["model"].update(byte_fallback=False), "pre_tokenizer 'Metaspace' without BPE "
                                                       "byte_fallback is not supported"),
    (lambda d: (d["model"].update(byte_fallback=False), d.update(normalizer=FORMS["llama2"][0],
                                                                  pre_tokenizer=None)),
     "SentencePiece's BPE .spaces written \u2581 by the normalizer. without BPE byte_fallback is "
     "not supported"),
    (lambda d: (d["model"].update(byte_fallback=False), d.update(normalizer=REPLACE_SPACES,
                                                                  pre_tokenizer=None)),
     "SentencePiece's BPE .spaces written \u2581 by the normalizer. without BPE byte_fallback"),
    (lambda d: d["model"].update(ignore_merges=True), "BPE ignore_merges with byte_fallback"),
    (lambda d: d.update(pre_tokenizer={"type": "ByteLevel"}), "pre_tokenizer 'ByteLevel' with BPE "
                                                              "byte_fallback is not supported"),
    (lambda d: d.update(normalizer={"type": "NFKC"}), "normalizer 'NFKC' with BPE byte_fallback"),
    (lambda d: d.update(pre_tokenizer=dict(metaspace("first", False), replacement="_")),
     "Metaspace replacement '_'"),
    (lambda d: d.update(pre_tokenizer=metaspace("sometimes", False)),
     "Metaspace prepend_scheme 'sometimes'"),
    (lambda d: d.update(pre_tokenizer=None), "neither a Metaspace pre_tokenizer nor a Replace"),
    (lambda d: d.update(decoder={"type": "Metaspace"}), "decoder 'Metaspace' with BPE byte_fallback"),
    (lambda d: d.update(decoder={"type": "Sequence", "decoders": DECODERS[::2]}),
     "decoder 'Sequence' with BPE byte_fallback"),
    (drop_byte_token, "no byte-fallback token for byte 65"),
    (lambda d: add_token(d, "<0xab>"), "'<0xab>' is not one of the 256 byte-fallback tokens"),
])
def test_import_refuses_other_forms_naming_the_part(trained_document, tmp_path, edit, named):
    document = json.loads(json.dumps(in_form(trained_document, "metaspace_first")))
    edit(document)
    (tmp_path / "tokenizer.json").write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(UsageError, match="tokenizer.json: .*" + named.replace("(", r"\(")) as info:
        read_hf_tokenizer(tmp_path)
    assert "\n" not in str(info.value)


def test_merges_across_spaces_are_refused_without_split(tmp_path):
    # Trained on whole lines, merges join words ("e" + "▁t"); xpmodel cuts text
    # into words before merging, so only a Metaspace split makes such merges exact.
    document = sp_document(trained_on_words=False)
    (tmp_path / "tokenizer.json").write_text(json.dumps(in_form(document, "llama2")))
    with pytest.raises(UsageError, match="tokenizer.json: .* across a space, which xpmodel does "
                                         "not encode without Metaspace split"):
        read_hf_tokenizer(tmp_path)
    text = json.dumps(in_form(document, "metaspace_split"))
    (tmp_path / "tokenizer.json").write_text(text)
    tok, hf_ids = read_hf_tokenizer(tmp_path)
    hf = tokenizers.Tokenizer.from_str(text)
    for text in texts()[:60]:
        assert hf_ids[tok.encode(text, allowed_special="all")].tolist() == hf.encode(text).ids


def test_metaspace_options_are_checked():
    with pytest.raises(UsageError, match="prepend must be one of"):
        Metaspace("sometimes")
    with pytest.raises(UsageError, match="split must be true or false"):
        Metaspace("always", split="yes")
    with pytest.raises(UsageError, match="takes no split_pattern"):
        BPETokenizer((), metaspace=Metaspace())
    with pytest.raises(UsageError, match="joins a fallback byte"):
        BPETokenizer([(97, 98)], (), split_pattern=None, tokens=[b"ab"], metaspace=Metaspace())


# ----- a Llama model with such a tokenizer ----------------------------------


def test_llama_with_a_sentencepiece_tokenizer_imports_and_fine_tunes(tmp_path, tinyshakespeare,
                                                                     capsys, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from cli_helpers import run_cli
    from test_hf_llama import BLOCK, hf_logits, hf_random_llama, relative_error, xp_model
    from xpmodel.hf.convert import export_hf, import_hf
    document = in_form(sp_document(vocab_size=120), "llama2")
    hf_tok = tokenizers.Tokenizer.from_str(json.dumps(document))
    hf_model = hf_random_llama(seed=23, vocab=400)
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    hf_tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    config, arrays, tok = import_hf(tmp_path / "hf")
    assert tok.metaspace == FORMS["llama2"][3]
    _, hf_ids = read_hf_tokenizer(tmp_path / "hf")
    column = numpy.concatenate([hf_ids, numpy.arange(len(hf_ids), 400)])
    ours = xp_model(config, arrays)
    for text in [t for t in VARIED if t.strip()][-6:]:
        ids = tok.encode(text, allowed_special="all")[:BLOCK]
        theirs = hf_tok.encode(text).ids[:BLOCK]
        assert column[ids].tolist() == theirs, text
        logits = hf_logits(hf_model, [theirs])[..., column]   # columns in xpmodel's order
        assert relative_error(ours.forward(numpy.array([ids])), logits) < 1e-4, text
    export_hf(ours, tok, tmp_path / "back")
    assert import_hf(tmp_path / "back")[2] == tok

    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli(capsys, "train", "--device", "cpu", "--quiet", "--out", tmp_path / "tuned",
                           "--init-from", tmp_path / "hf", f"data.source={tinyshakespeare}",
                           "train.batch_size=4", "train.max_iters=2", "train.eval_interval=2",
                           "train.eval_batches=1", "train.sample_interval=0",
                           "train.warmup_iters=0", "train.save_interval=2")
    assert code == 0, err
    import xpmodel
    _, tuned_tok = xpmodel.load(tmp_path / "tuned")
    assert tuned_tok == tok
