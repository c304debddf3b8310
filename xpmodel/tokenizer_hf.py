"""Export a BPETokenizer as a Hugging Face tokenizer directory.

Writes, for the same ids as xpmodel's tokenizer:
    tokenizer.json           for `tokenizers.Tokenizer.from_file`
    vocab.json, merges.txt   for transformers' GPT2Tokenizer / GPT2TokenizerFast
    tokenizer_config.json,
    special_tokens_map.json  so `transformers.AutoTokenizer.from_pretrained(dir)` works

Hugging Face names byte-level tokens by GPT-2's bytes-to-unicode table, which
maps every byte to a printable character, so token strings never hold spaces
or control characters. Neither `tokenizers` nor `transformers` is needed to
write the files.
"""
import json
from pathlib import Path

from xpmodel.errors import UsageError
from xpmodel.tokenizer import ENDOFTEXT


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


def export_hf(tokenizer, directory, model_max_length=None):
    """Write the five Hugging Face files for `tokenizer` into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = hf_vocab(tokenizer)
    names = list(vocab)  # id -> token string, as ids run 0.. in order
    merges = [f"{names[left]} {names[right]}" for left, right in tokenizer.merges]
    specials = tokenizer.special_tokens

    byte_level = {"type": "ByteLevel", "add_prefix_space": False,
                  "trim_offsets": True, "use_regex": True}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": token_id, "content": text, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
            for text, token_id in specials.items()],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    _write_json(directory / "tokenizer.json", tokenizer_json)
    _write_json(directory / "vocab.json", vocab)
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(line + "\n" for line in merges), encoding="utf-8")

    special_map = {}
    if ENDOFTEXT in specials:
        special_map = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    config = {"tokenizer_class": "GPT2TokenizerFast", "add_prefix_space": False,
              "add_bos_token": False, "clean_up_tokenization_spaces": False, **special_map}
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    _write_json(directory / "tokenizer_config.json", config)
    _write_json(directory / "special_tokens_map.json", special_map)


def _write_json(path, document):
    path.write_text(json.dumps(document, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
