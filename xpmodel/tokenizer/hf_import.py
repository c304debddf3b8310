"""Reading a Hugging Face BPE tokenizer directory into a BPETokenizer
(tokenizer.json, else vocab.json + merges.txt), in the forms hf_forms.py
describes; anything else that would change the ids or the decoded text is
refused, naming the part."""
import functools
import os
import re
from pathlib import Path

import numpy

from ..errors import DataError, UsageError, quote
from ..files import read_bounded, read_json
from .bpe import BPETokenizer
from .file_format import MAX_FILE_BYTES
from .hf_forms import (BYTE_TOKENS, PREPEND, HF_PREPEND_SCHEMES, REPLACE_SPACES, SPACE, SPACE_DECODERS,
                       STRIP_DECODER, gpt2_byte_to_unicode)
from .metaspace import Metaspace
from .pretokenize import GPT2_SPLIT_PATTERN, check_split_pattern
from .vocab import MAX_VOCAB

_BYTE_NAME = re.compile(r"<0x(\+[0-9a-fA-F]|[0-9a-fA-F]{2})>")   # what ByteFallback reads as one


def import_hf_tokenizer(directory):
    """A BPETokenizer from a Hugging Face BPE tokenizer directory.

    Ids may be relabeled (see the module docstring and `read_hf_tokenizer`);
    text encodes to the same tokens as with Hugging Face.
    """
    return read_hf_tokenizer(directory)[0]


def read_hf_tokenizer(directory):
    """Read a BPE tokenizer, byte-level or SentencePiece, from `directory`.

    Reads tokenizer.json when present (as the fast tokenizers do), otherwise
    vocab.json + merges.txt (+ added tokens from tokenizer_config.json or
    added_tokens.json), which split as GPT-2. Tokenizers whose ids or decoded
    text xpmodel would not reproduce (a normalizer, pre-tokenizer or decoder
    outside the forms of the module docstring, a ByteLevel prefix space, BPE
    dropout, non-special added tokens) raise UsageError naming the part.

    Returns (tokenizer, hf_ids): hf_ids is an int64 array (tokenizer.vocab_size,)
    holding, for each xpmodel id, the Hugging Face id of the same token.
    """
    directory = Path(directory)
    # A name that is there but is no regular file (a FIFO, a folder, a link to
    # nothing) is read, and refused naming it: passed over, tokenizer.json
    # would give way to vocab.json, which the fast tokenizers never read.
    if os.path.lexists(directory / "tokenizer.json"):
        source = directory / "tokenizer.json"
        vocab, merges, added, options = _read_tokenizer_json(source)
    elif os.path.lexists(directory / "vocab.json") and os.path.lexists(directory / "merges.txt"):
        source = directory / "vocab.json"
        vocab, merges, added = _read_vocab_and_merges(directory)
        options = {}
    else:
        raise UsageError(f"{directory}: no Hugging Face tokenizer (needs tokenizer.json, "
                         f"or vocab.json and merges.txt)")
    try:
        return _relabel(vocab, merges, added, options)
    except UsageError as exc:
        raise UsageError(f"{source}: tokenizer not usable: {exc}") from None


def _read_tokenizer_json(path):
    """-> (vocab name -> id, merges [(left, right)], added [(id, content, special)],
    BPETokenizer options)."""
    document = _load_json(path)
    model = document.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else model
        raise UsageError(f"{path}: model type {quote(kind, 100)} is not supported (xpmodel reads BPE)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise UsageError(f"{path}: BPE {key} {quote(model[key], 100)} is not supported")
    if model.get("dropout") not in (None, 0, 0.0):
        raise UsageError(f"{path}: BPE dropout {quote(model['dropout'], 100)} is not supported "
                         f"(it makes encoding random)")
    for key in ("ignore_merges", "byte_fallback"):
        if not isinstance(model.get(key, False), bool):
            raise DataError(f"{path}: BPE {key} is {quote(model[key], 100)}, not true or false")
    if model.get("byte_fallback"):
        if model.get("ignore_merges"):
            raise UsageError(f"{path}: BPE ignore_merges with byte_fallback is not supported")
        options = dict(normalizer=None, split_pattern=None,
                       metaspace=_read_metaspace(document, path))
    else:
        options = dict(normalizer=_read_normalizer(document.get("normalizer"), path),
                       split_pattern=_read_pre_tokenizer(document.get("pre_tokenizer"), path),
                       ignore_merges=model.get("ignore_merges", False))
        _check_decoder(document.get("decoder"), path)
    merges = _read_merges(model, path)
    added = document.get("added_tokens")
    added = [] if added is None else added
    if not isinstance(added, list):
        raise DataError(f"{path}: added_tokens is {quote(added, 100)}, not a list of tokens")
    for k, token in enumerate(added):
        if not isinstance(token, dict):
            raise DataError(f"{path}: added token {k} is {quote(token, 100)}, not an object")
    added = [(t.get("id"), t.get("content"), t.get("special", False)) for t in added]
    return _check_vocab(model.get("vocab"), path), merges, added, options


def _read_merges(model, path):
    """tokenizer.json's BPE merges ("a b" or ["a", "b"]) as [(left, right)]."""
    entries = model.get("merges")
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise DataError(f"{path}: BPE merges is {quote(entries, 100)}, not a list of merges "
                        f"(\"a b\" or [\"a\", \"b\"])")
    if len(entries) > MAX_VOCAB:
        raise DataError(f"{path}: {len(entries):,} merges, more than the {MAX_VOCAB:,} ids "
                        f"xpmodel supports")
    merges = []
    for k, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = entry.split(" ")
        if not (isinstance(entry, list) and len(entry) == 2
                and all(isinstance(side, str) and side for side in entry)):
            raise DataError(f"{path}: merge {k} is {quote(entry, 100)}, not a pair of tokens")
        merges.append(tuple(entry))
    return merges


def _read_vocab_and_merges(directory):
    """vocab.json + merges.txt, as GPT2Tokenizer reads them."""
    config = {}
    if os.path.lexists(directory / "tokenizer_config.json"):
        config = _load_json(directory / "tokenizer_config.json")
    if config.get("add_prefix_space"):
        raise UsageError(f"{directory / 'tokenizer_config.json'}: add_prefix_space is not "
                         f"supported (GPT-2 adds no space)")
    vocab = _check_vocab(_load_json(directory / "vocab.json"), directory / "vocab.json")
    merges = []
    path = directory / "merges.txt"
    try:
        lines = read_bounded(path, MAX_FILE_BYTES, DataError, "merges file").decode("utf-8").split("\n")
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
            raise DataError(f"{path}:{number}: {quote(line, 100)} is not two tokens separated by a space")
        merges.append(tuple(sides))
    added = []
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for token_id, entry in decoder.items():
            if isinstance(entry, dict):
                added.append((_token_id(token_id), entry.get("content"),
                              entry.get("special", False)))
    if os.path.lexists(directory / "added_tokens.json"):
        extra = _load_json(directory / "added_tokens.json")
        if isinstance(extra, dict):
            added.extend((token_id, content, True) for content, token_id in extra.items())
    return vocab, merges, added


def _relabel(vocab, merges, added, options):
    """Build the BPETokenizer and the xpmodel id -> Hugging Face id table."""
    id_to_name, special_names = _names_by_id(vocab, added)
    name_to_id = {name: token_id for token_id, name in id_to_name.items()}

    metaspace = options.get("metaspace") is not None
    if metaspace:
        byte_names = BYTE_TOKENS
        token_text = _metaspace_text
    else:
        byte_to_char = gpt2_byte_to_unicode()
        byte_names = [byte_to_char[b] for b in range(256)]
        char_to_byte = {c: b for b, c in byte_to_char.items()}
        token_text = functools.partial(_byte_level_bytes, char_to_byte=char_to_byte)
    for byte, name in enumerate(byte_names):
        if name not in name_to_id or name in special_names:
            kind = "byte-fallback token" if metaspace else "byte token"
            raise UsageError(f"the vocab has no {kind} for byte {byte} ({quote(name, 100)}); "
                             f"xpmodel reads BPE vocabs that cover every byte")
    ordinary = set(name_to_id) - special_names - set(byte_names)
    made = {}   # name -> None, in the order of the first merge making each
    for rank, (left, right) in enumerate(merges):
        for side in (left, right):
            if side not in ordinary and (metaspace or side not in byte_names):
                raise UsageError(f"merge {rank} ({quote(left, 100)} {quote(right, 100)}) uses "
                                 f"{quote(side, 100)}, which is not "
                                 f"{'a token' if metaspace else 'a byte or token'} of the vocab")
        if left + right not in ordinary:
            raise UsageError(f"merge {rank} makes {quote(left + right, 100)}, which is not an ordinary "
                             f"token of the vocab")
        made.setdefault(left + right)
    names = list(byte_names) + list(made)
    specials = []
    for token_id in range(len(id_to_name)):
        name = id_to_name[token_id]
        if name in made or name in byte_names:
            continue
        # A byte-level vocab entry outside BPE that Hugging Face decodes as
        # itself (like "<|endoftext|>" in GPT-2's vocab.json) is a special
        # token, unless ignore_merges reaches it.
        if name in special_names or not (metaspace or options.get("ignore_merges")) and (
                token_text(name) == name.encode("utf-8")):
            specials.append(name)
        else:
            names.append(name)
    tokens = []
    for name in names[256:]:
        text = token_text(name)
        if text is None:
            raise UsageError(f"token {quote(name, 100)} (id {name_to_id[name]}) is not byte-level text "
                             f"(as GPT-2's bytes-to-unicode table writes bytes)")
        tokens.append(text)
    xp_ids = {name: xp_id for xp_id, name in enumerate(names)}
    merge_pairs = [(xp_ids[left], xp_ids[right]) for left, right in merges]
    tokenizer = BPETokenizer(merge_pairs, specials, tokens=tokens, **options)
    hf_ids = [name_to_id[name] for name in names + specials]
    return tokenizer, numpy.array(hf_ids, dtype=numpy.int64)


def _names_by_id(vocab, added):
    """(Hugging Face id -> token string, added tokens included; the set of the
    added tokens' strings). Added tokens must be special and agree with the vocab."""
    id_to_name = {token_id: name for name, token_id in vocab.items()}
    special_names = set()
    for token_id, content, special in added:
        if type(token_id) is not int or token_id < 0 or not isinstance(content, str) or not content:
            raise UsageError(f"added token {quote(content, 100)} with id {quote(token_id, 100)} is malformed")
        if id_to_name.get(token_id, content) != content:
            raise UsageError(f"id {token_id} is both {quote(id_to_name[token_id], 100)} and {quote(content, 100)}")
        if vocab.get(content, token_id) != token_id:
            raise UsageError(f"{quote(content, 100)} has two ids, {vocab[content]} and {token_id}")
        if not special:
            raise UsageError(f"added token {quote(content, 100)} (id {token_id}) is not special; "
                             f"xpmodel only matches special tokens outside BPE")
        id_to_name[token_id] = content
        special_names.add(content)
    missing = sorted(set(range(len(id_to_name))) - set(id_to_name))
    if missing:
        raise UsageError(f"token ids are not contiguous from 0: id {missing[0]} has no token")
    return id_to_name, special_names


def _byte_level_bytes(name, char_to_byte):
    """The bytes a byte-level token string stands for, or None if it is not one."""
    try:
        return bytes(char_to_byte[c] for c in name)
    except KeyError:
        return None


def _metaspace_text(name):
    """The bytes a SentencePiece token stands for: its text with spaces for "▁"."""
    if _BYTE_NAME.fullmatch(name):   # Hugging Face's ByteFallback decoder reads it as a byte
        raise UsageError(f"token {quote(name, 100)} is not one of the 256 byte-fallback tokens "
                         f"but decodes as a byte")
    return name.replace(SPACE, " ").encode("utf-8")


def _read_metaspace(document, path):
    """The Metaspace of a SentencePiece-style tokenizer.json (see the module docstring)."""
    normalizer, pre_tokenizer = document.get("normalizer"), document.get("pre_tokenizer")
    prepend, split = "never", False
    if normalizer is not None:
        steps = _steps(normalizer, "normalizers")
        if isinstance(steps, list) and steps[:1] == [PREPEND]:
            prepend, steps = "always", steps[1:]
        if steps != [REPLACE_SPACES]:
            raise UsageError(f"{path}: normalizer {_kind(normalizer)} with BPE byte_fallback is "
                             f"not supported (xpmodel reads Prepend \"{SPACE}\" then Replace \" \" "
                             f"by \"{SPACE}\", or a Metaspace pre_tokenizer)")
    if pre_tokenizer is not None:
        if not (isinstance(pre_tokenizer, dict) and pre_tokenizer.get("type") == "Metaspace"):
            raise UsageError(f"{path}: pre_tokenizer {_kind(pre_tokenizer)} with BPE byte_fallback "
                             f"is not supported (xpmodel reads Metaspace or none)")
        if pre_tokenizer.get("replacement") != SPACE:
            raise UsageError(f"{path}: Metaspace replacement "
                             f"{quote(pre_tokenizer.get('replacement'), 20)} is not supported "
                             f"(xpmodel reads \"{SPACE}\")")
        scheme = pre_tokenizer.get("prepend_scheme")
        if scheme is None:   # written before prepend_scheme existed
            scheme = "always" if pre_tokenizer.get("add_prefix_space", True) else "never"
        if scheme not in HF_PREPEND_SCHEMES:
            raise UsageError(f"{path}: Metaspace prepend_scheme {quote(scheme, 20)} is not "
                             f"supported")
        split = pre_tokenizer.get("split", True)
        if not isinstance(split, bool):
            raise DataError(f"{path}: Metaspace split is {quote(split, 100)}, not true or false")
        if prepend == "never":   # after a Prepend normalizer the text starts with "▁" already
            prepend = HF_PREPEND_SCHEMES[scheme]
    elif normalizer is None:
        raise UsageError(f"{path}: BPE byte_fallback with neither a Metaspace pre_tokenizer nor a "
                         f"Replace \" \" by \"{SPACE}\" normalizer is not supported")
    return Metaspace(prepend, split, _read_metaspace_decoder(document.get("decoder"), path))


def _read_metaspace_decoder(decoder, path):
    """Whether a SentencePiece decoder strips one leading space; others are refused."""
    steps = _steps(decoder, "decoders")
    if steps == SPACE_DECODERS + [STRIP_DECODER]:
        return True
    if steps != SPACE_DECODERS:
        raise UsageError(f"{path}: decoder {_kind(decoder)} with BPE byte_fallback is not "
                         f"supported (xpmodel decodes as Replace \"{SPACE}\" by \" \", "
                         f"ByteFallback, Fuse and Strip one leading space or not)")
    return False


def _read_normalizer(normalizer, path):
    """None, or "nfc" for NFC (alone or as a one-step Sequence, as Qwen2 writes it)."""
    steps = _steps(normalizer, "normalizers")
    if isinstance(steps, list) and any(step in (PREPEND, REPLACE_SPACES) for step in steps):
        raise UsageError(f"{path}: SentencePiece's BPE (spaces written {SPACE} by the normalizer) "
                         f"without BPE byte_fallback is not supported (a character outside the "
                         f"vocab would be the unknown token)")
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
    steps = _steps(pre_tokenizer, "pretokenizers")
    if not isinstance(steps, list) or not 1 <= len(steps) <= 2:
        raise UsageError(f"{path}: a pre_tokenizer Sequence of "
                         f"{quote(len(steps) if isinstance(steps, list) else steps, 100)} steps is not "
                         f"supported (xpmodel reads ByteLevel, or Split then ByteLevel)")
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "Metaspace":
            raise UsageError(f"{path}: pre_tokenizer 'Metaspace' without BPE byte_fallback is "
                             f"not supported (a character outside the vocab would be the unknown "
                             f"token)")
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
        raise UsageError(f"{path}: Split behavior {quote(split.get('behavior'), 100)} is not supported "
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
    steps = _steps(decoder, "decoders")
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
            raise DataError(f"{path}: token {quote(name, 100)} has id {quote(token_id, 100)}, not a "
                            f"non-negative integer")
    if len(set(vocab.values())) != len(vocab):
        raise DataError(f"{path}: two tokens share an id")
    return vocab


def _steps(component, key):
    """The steps of a Sequence `component` (its `key` entry, as the file has
    it), or [component]."""
    if isinstance(component, dict) and component.get("type") == "Sequence":
        return component.get(key)
    return [component]


def _kind(component):
    return quote(component.get("type"), 100) if isinstance(component, dict) else quote(component, 100)


def _token_id(key):
    """An added_tokens_decoder key as the id it spells, or the key itself
    (which _names_by_id refuses, naming it)."""
    try:
        return int(key)
    except (TypeError, ValueError):
        return key


def _load_json(path):
    """A JSON object from a regular file of at most MAX_FILE_BYTES."""
    return read_json(path, MAX_FILE_BYTES, DataError, "tokenizer file")
