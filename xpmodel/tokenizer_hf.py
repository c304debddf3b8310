"""Hugging Face tokenizer directories, out of and into BPETokenizer.

`export_tokenizer_hf` writes, for the same ids as xpmodel's tokenizer:
    tokenizer.json           for `tokenizers.Tokenizer.from_file`
    vocab.json, merges.txt   for transformers' GPT2Tokenizer / GPT2TokenizerFast
    tokenizer_config.json,
    special_tokens_map.json  so `transformers.AutoTokenizer.from_pretrained(dir)` works

`read_hf_tokenizer` / `import_hf_tokenizer` read a byte-level BPE back
(tokenizer.json, else vocab.json + merges.txt): GPT-2's, whose ByteLevel
pre-tokenizer splits with its built-in regex, and the form of Llama 3 and
Qwen2, a Split by their own regex ("Isolated") followed by a ByteLevel that
only maps bytes (use_regex false), with Qwen2's NFC normalizer and BPE
ignore_merges. An export of a tokenizer with another split pattern writes
that form back. Anything else that would change the ids (Digits, Metaspace,
other normalizers, SentencePiece's Unigram or byte_fallback) is refused,
naming the part. Hugging Face vocabs may
number their tokens in any order; GPT-2's own puts the 256 byte tokens in
the order of the bytes-to-unicode table ("!" is id 0, "Ġ" is 220), where
BPETokenizer needs id == byte value. So an import relabels ids: bytes at
0..255, merge k at 256 + k, special tokens after, and returns for each new id
the Hugging Face id it came from, so model rows can be permuted to match.
The text-to-token mapping itself is unchanged; for GPT-2 only ids 0..255 move.

Hugging Face names byte-level tokens by GPT-2's bytes-to-unicode table, which
maps every byte to a printable character, so token strings never hold spaces
or control characters. Neither `tokenizers` nor `transformers` is needed to
read or write the files.
"""
import json
from pathlib import Path

import numpy

from .atomic import atomic_write_bytes
from .errors import DataError, UsageError, quote
from .files import parse_json, read_bounded
from .tokenizer import (ENDOFTEXT, GPT2_SPLIT_PATTERN, MAX_VOCAB, BPETokenizer,
                                check_split_pattern)

_MAX_FILE_BYTES = 64 << 20   # GPT-2's tokenizer.json is 1.4 MB, a 256k-token one about 35 MB


def gpt2_byte_to_unicode():
    """GPT-2's table: byte value -> one printable character.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (control
    characters, space, DEL, NBSP, soft hyphen...) take the characters from
    U+0100 on, in byte order, so space becomes "Ġ" and newline "Ċ".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    next_char = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(next_char)
            next_char += 1
    return table


def hf_vocab(tokenizer):
    """Token string -> id for every id, specials included, in id order."""
    byte_to_char = gpt2_byte_to_unicode()
    special_ids = set(tokenizer.special_tokens.values())
    vocab = {}
    for token_id in range(tokenizer.vocab_size):
        raw = tokenizer.token_bytes(token_id)
        name = raw.decode("utf-8") if token_id in special_ids else "".join(
            byte_to_char[b] for b in raw)
        if name in vocab:
            raise UsageError(f"ids {vocab[name]} and {token_id} are both {name!r}; "
                             f"a Hugging Face vocab needs distinct token strings")
        vocab[name] = token_id
    return vocab


def export_tokenizer_hf(tokenizer, directory, model_max_length=None):
    """Write the five Hugging Face files for `tokenizer` into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = hf_vocab(tokenizer)
    names = list(vocab)  # id -> token string, as ids run 0.. in order
    merges = [f"{names[left]} {names[right]}" for left, right in tokenizer.merges]
    specials = tokenizer.special_tokens

    byte_level = {"type": "ByteLevel", "add_prefix_space": False,
                  "trim_offsets": True, "use_regex": True}
    gpt2_split = tokenizer.split_pattern == GPT2_SPLIT_PATTERN
    pre_tokenizer = byte_level
    if not gpt2_split:   # as Llama 3 and Qwen2 write theirs
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.split_pattern},
             "behavior": "Isolated", "invert": False},
            dict(byte_level, use_regex=False)]}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": token_id, "content": text, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
            for text, token_id in specials.items()],
        "normalizer": {"type": "NFC"} if tokenizer.normalizer == "nfc" else None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": tokenizer.ignore_merges,
                  "vocab": vocab, "merges": merges},
    }
    _write_json(directory / "tokenizer.json", tokenizer_json)
    _write_json(directory / "vocab.json", vocab)
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(line + "\n" for line in merges), encoding="utf-8")

    special_map = {}
    if ENDOFTEXT in specials:
        special_map = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    # GPT2TokenizerFast would split as GPT-2 whatever tokenizer.json says; the
    # generic class reads tokenizer.json as it is, as Llama 3's config names it.
    tokenizer_class = "GPT2TokenizerFast" if gpt2_split else "PreTrainedTokenizerFast"
    config = {"tokenizer_class": tokenizer_class, "add_prefix_space": False,
              "add_bos_token": False, "clean_up_tokenization_spaces": False, **special_map}
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    _write_json(directory / "tokenizer_config.json", config)
    _write_json(directory / "special_tokens_map.json", special_map)


def _write_json(path, document):
    atomic_write_bytes(path, (json.dumps(document, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))


# ----- import ---------------------------------------------------------------


def import_hf_tokenizer(directory):
    """A BPETokenizer from a Hugging Face byte-level BPE tokenizer directory.

    Ids may be relabeled (see the module docstring and `read_hf_tokenizer`);
    text encodes to the same tokens as with Hugging Face.
    """
    return read_hf_tokenizer(directory)[0]


def read_hf_tokenizer(directory):
    """Read a byte-level BPE tokenizer from `directory`.

    Reads tokenizer.json when present (as the fast tokenizers do), otherwise
    vocab.json + merges.txt (+ added tokens from tokenizer_config.json or
    added_tokens.json), which split as GPT-2. Tokenizers whose ids xpmodel
    would not reproduce (a normalizer other than NFC, a pre-tokenizer other
    than the two byte-level forms of the module docstring, a prefix space,
    BPE dropout, non-special added tokens) raise UsageError naming the part.

    Returns (tokenizer, hf_ids): hf_ids is an int64 array (tokenizer.vocab_size,)
    holding, for each xpmodel id, the Hugging Face id of the same token.
    """
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        vocab, merges, added, options = _read_tokenizer_json(directory / "tokenizer.json")
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        vocab, merges, added = _read_vocab_and_merges(directory)
        options = {}
    else:
        raise UsageError(f"{directory}: no Hugging Face tokenizer (needs tokenizer.json, "
                         f"or vocab.json and merges.txt)")
    try:
        return _relabel(vocab, merges, added, options)
    except UsageError as exc:
        raise UsageError(f"{directory}: tokenizer not usable: {exc}") from None


def _read_tokenizer_json(path):
    """-> (vocab name -> id, merges [(left, right)], added [(id, content, special)],
    BPETokenizer options)."""
    document = _load_json(path)
    model = document.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else model
        raise UsageError(f"{path}: model type {kind!r} is not supported (xpmodel reads BPE)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise UsageError(f"{path}: BPE {key} {model[key]!r} is not supported")
    if model.get("byte_fallback"):
        raise UsageError(f"{path}: BPE byte_fallback is not supported")
    if model.get("dropout") not in (None, 0, 0.0):
        raise UsageError(f"{path}: BPE dropout {model['dropout']!r} is not supported "
                         f"(it makes encoding random)")
    ignore_merges = model.get("ignore_merges", False)
    if not isinstance(ignore_merges, bool):
        raise DataError(f"{path}: BPE ignore_merges is {ignore_merges!r}, not true or false")
    options = dict(normalizer=_read_normalizer(document.get("normalizer"), path),
                   split_pattern=_read_pre_tokenizer(document.get("pre_tokenizer"), path),
                   ignore_merges=ignore_merges)
    _check_decoder(document.get("decoder"), path)
    merges = []
    if len(model.get("merges") or []) > MAX_VOCAB:
        raise DataError(f"{path}: {len(model['merges']):,} merges, more than the {MAX_VOCAB:,} ids "
                        f"xpmodel supports")
    for k, entry in enumerate(model.get("merges") or []):
        if isinstance(entry, str):
            entry = entry.split(" ")
        if not (isinstance(entry, list) and len(entry) == 2
                and all(isinstance(side, str) and side for side in entry)):
            raise DataError(f"{path}: merge {k} is {entry!r}, not a pair of tokens")
        merges.append(tuple(entry))
    added = [(t.get("id"), t.get("content"), t.get("special", False))
             for t in document.get("added_tokens") or [] if isinstance(t, dict)]
    return _check_vocab(model.get("vocab"), path), merges, added, options


def _read_vocab_and_merges(directory):
    """vocab.json + merges.txt, as GPT2Tokenizer reads them."""
    config = {}
    if (directory / "tokenizer_config.json").is_file():
        config = _load_json(directory / "tokenizer_config.json")
    if config.get("add_prefix_space"):
        raise UsageError(f"{directory / 'tokenizer_config.json'}: add_prefix_space is not "
                         f"supported (GPT-2 adds no space)")
    vocab = _check_vocab(_load_json(directory / "vocab.json"), directory / "vocab.json")
    merges = []
    path = directory / "merges.txt"
    try:
        lines = read_bounded(path, _MAX_FILE_BYTES, DataError, "merges file").decode("utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if len(lines) > MAX_VOCAB + 1:
        raise DataError(f"{path}: {len(lines):,} merges, more than the {MAX_VOCAB:,} ids xpmodel supports")
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line or (number == 1 and line.startswith("#version")):
            continue
        sides = line.split(" ")
        if len(sides) != 2 or not all(sides):
            raise DataError(f"{path}:{number}: {line!r} is not two tokens separated by a space")
        merges.append(tuple(sides))
    added = []
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for token_id, entry in decoder.items():
            if isinstance(entry, dict):
                added.append((_int_or_none(token_id), entry.get("content"),
                              entry.get("special", False)))
    if (directory / "added_tokens.json").is_file():
        extra = _load_json(directory / "added_tokens.json")
        if isinstance(extra, dict):
            added.extend((token_id, content, True) for content, token_id in extra.items())
    return vocab, merges, added


def _relabel(vocab, merges, added, options):
    """Build the BPETokenizer and the xpmodel id -> Hugging Face id table."""
    id_to_name = {token_id: name for name, token_id in vocab.items()}
    special_names = set()
    for token_id, content, special in added:
        if type(token_id) is not int or token_id < 0 or not isinstance(content, str) or not content:
            raise UsageError(f"added token {content!r} with id {token_id!r} is malformed")
        if id_to_name.get(token_id, content) != content:
            raise UsageError(f"id {token_id} is both {id_to_name[token_id]!r} and {content!r}")
        if vocab.get(content, token_id) != token_id:
            raise UsageError(f"{content!r} has two ids, {vocab[content]} and {token_id}")
        if not special:
            raise UsageError(f"added token {content!r} (id {token_id}) is not special; "
                             f"xpmodel only matches special tokens outside BPE")
        id_to_name[token_id] = content
        special_names.add(content)
    missing = sorted(set(range(len(id_to_name))) - set(id_to_name))
    if missing:
        raise UsageError(f"token ids are not contiguous from 0: id {missing[0]} has no token")
    name_to_id = {name: token_id for token_id, name in id_to_name.items()}

    byte_to_char = gpt2_byte_to_unicode()
    char_to_byte = {c: b for b, c in byte_to_char.items()}
    xp_ids = {}    # token string -> xpmodel id
    hf_ids = []    # xpmodel id -> Hugging Face id
    for byte in range(256):
        name = byte_to_char[byte]
        if name not in name_to_id or name in special_names:
            raise UsageError(f"the vocab has no byte token for byte {byte} ({name!r}); "
                             f"only byte-level BPE (as GPT-2's) is supported")
        xp_ids[name] = byte
        hf_ids.append(name_to_id[name])
    merge_pairs = []
    for rank, (left, right) in enumerate(merges):
        if left not in xp_ids or right not in xp_ids:
            raise UsageError(f"merge {rank} ({left!r} {right!r}) uses a token that neither a "
                             f"byte nor an earlier merge makes")
        merged = left + right
        if merged not in name_to_id or merged in special_names:
            raise UsageError(f"merge {rank} makes {merged!r}, which is not an ordinary "
                             f"token of the vocab")
        if merged in xp_ids:
            raise UsageError(f"merge {rank} makes {merged!r}, which an earlier merge or "
                             f"byte already makes{_TIKTOKEN_HINT}")
        xp_ids[merged] = 256 + rank
        merge_pairs.append((xp_ids[left], xp_ids[right]))
        hf_ids.append(name_to_id[merged])
    specials = []
    made = set(hf_ids)
    for token_id in range(len(id_to_name)):
        if token_id in made:
            continue
        name = id_to_name[token_id]
        # A vocab entry outside BPE that Hugging Face decodes as itself (like
        # "<|endoftext|>" in GPT-2's vocab.json) is a special token.
        if name not in special_names and _byte_level_text(name, char_to_byte) != name:
            raise UsageError(f"token {name!r} (id {token_id}) is neither a byte, a merge "
                             f"result nor a special token{_TIKTOKEN_HINT}")
        specials.append(name)
        hf_ids.append(token_id)
    tokenizer = BPETokenizer(merge_pairs, specials, **options)
    return tokenizer, numpy.array(hf_ids, dtype=numpy.int64)


def _byte_level_text(name, char_to_byte):
    """The text a byte-level token string decodes to, or None if it is not one."""
    try:
        return bytes(char_to_byte[c] for c in name).decode("utf-8", errors="replace")
    except KeyError:
        return None


# Said when a vocab is not one token per merge, as in vocabs converted from
# tiktoken (Llama 3's own has redundant merges and tokens only ignore_merges reaches).
_TIKTOKEN_HINT = ("; xpmodel reads BPE vocabs where every token but the bytes and the "
                  "special tokens is made by exactly one merge")


def _read_normalizer(normalizer, path):
    """None, or "nfc" for NFC (alone or as a one-step Sequence, as Qwen2 writes it)."""
    if isinstance(normalizer, dict) and normalizer.get("type") == "Sequence":
        steps = normalizer.get("normalizers")
        if isinstance(steps, list) and len(steps) <= 1:
            normalizer = steps[0] if steps else None
    if normalizer is None:
        return None
    if isinstance(normalizer, dict) and normalizer.get("type") == "NFC":
        return "nfc"
    raise UsageError(f"{path}: normalizer {_kind(normalizer)} is not supported "
                     f"(xpmodel reads none or NFC)")


def _read_pre_tokenizer(pre_tokenizer, path):
    """The split pattern of one of the two byte-level forms xpmodel computes:
    GPT-2's ByteLevel with its built-in regex (GPT2_SPLIT_PATTERN), or a Split
    by a regex with behavior Isolated followed by a ByteLevel that only maps
    bytes (Llama 3, Qwen2). Neither may add a prefix space."""
    steps = [pre_tokenizer]
    if isinstance(pre_tokenizer, dict) and pre_tokenizer.get("type") == "Sequence":
        steps = pre_tokenizer.get("pretokenizers")
        if not isinstance(steps, list) or not 1 <= len(steps) <= 2:
            raise UsageError(f"{path}: a pre_tokenizer Sequence of "
                             f"{len(steps) if isinstance(steps, list) else steps!r} steps is not "
                             f"supported (xpmodel reads ByteLevel, or Split then ByteLevel)")
    for step in steps:
        if not (isinstance(step, dict) and step.get("type") in ("Split", "ByteLevel")):
            raise UsageError(f"{path}: pre_tokenizer {_kind(step)} is not supported "
                             f"(xpmodel reads ByteLevel, or Split then ByteLevel)")
    byte_level = steps[-1]
    if byte_level.get("type") != "ByteLevel":
        raise UsageError(f"{path}: pre_tokenizer {_kind(byte_level)} without a ByteLevel after "
                         f"it is not supported (xpmodel reads byte-level BPE)")
    if byte_level.get("add_prefix_space"):
        raise UsageError(f"{path}: ByteLevel add_prefix_space is not supported "
                         f"(xpmodel adds no space)")
    use_regex = byte_level.get("use_regex", True)
    if len(steps) == 1:
        if not use_regex:
            raise UsageError(f"{path}: ByteLevel use_regex false with no Split before it is "
                             f"not supported (the text would be one piece)")
        return GPT2_SPLIT_PATTERN
    if use_regex:
        raise UsageError(f"{path}: a Split followed by ByteLevel use_regex true is not "
                         f"supported (xpmodel splits text by one regex)")
    return _read_split(steps[0], path)


def _read_split(split, path):
    if split.get("type") != "Split":
        raise UsageError(f"{path}: pre_tokenizer {_kind(split)} before ByteLevel is not "
                         f"supported (xpmodel reads a Split there)")
    if split.get("behavior") != "Isolated":
        raise UsageError(f"{path}: Split behavior {split.get('behavior')!r} is not supported "
                         f"(xpmodel reads \"Isolated\")")
    if split.get("invert"):
        raise UsageError(f"{path}: Split invert true is not supported")
    pattern = split.get("pattern")
    if not (isinstance(pattern, dict) and list(pattern) == ["Regex"]):
        raise UsageError(f"{path}: Split pattern {quote(pattern, 80)} is not supported "
                         f"(xpmodel reads {{\"Regex\": ...}})")
    try:
        check_split_pattern(pattern["Regex"])
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None
    return pattern["Regex"]


def _check_decoder(decoder, path):
    """xpmodel decodes ids to their bytes, as the ByteLevel decoder does."""
    if isinstance(decoder, dict) and decoder.get("type") == "Sequence":
        steps = decoder.get("decoders")
        if isinstance(steps, list) and len(steps) == 1:
            decoder = steps[0]
    if decoder is not None and not (isinstance(decoder, dict)
                                    and decoder.get("type") == "ByteLevel"):
        raise UsageError(f"{path}: decoder {_kind(decoder)} is not supported "
                         f"(xpmodel decodes as ByteLevel does)")


def _check_vocab(vocab, path):
    if not isinstance(vocab, dict) or not vocab:
        raise DataError(f"{path}: the vocab is not a non-empty object of token -> id")
    if len(vocab) > MAX_VOCAB:
        raise DataError(f"{path}: a vocab of {len(vocab):,} tokens, more than the {MAX_VOCAB:,} "
                        f"xpmodel supports")
    for name, token_id in vocab.items():
        if type(token_id) is not int or token_id < 0:
            raise DataError(f"{path}: token {name!r} has id {token_id!r}, not a "
                            f"non-negative integer")
    if len(set(vocab.values())) != len(vocab):
        raise DataError(f"{path}: two tokens share an id")
    return vocab


def _kind(component):
    return repr(component.get("type")) if isinstance(component, dict) else repr(component)


def _int_or_none(text):
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _load_json(path):
    """A JSON object from a regular file of at most _MAX_FILE_BYTES."""
    data = read_bounded(path, _MAX_FILE_BYTES, DataError, "tokenizer file")
    try:
        document = parse_json(data.decode("utf-8"))
    except ValueError as exc:   # UnicodeDecodeError and JSONDecodeError included
        raise DataError(f"{path}: cannot read: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(document, dict):
        raise DataError(f"{path}: not a JSON object")
    return document
