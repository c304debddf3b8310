"""Hugging Face tokenizer directories and the forms xpmodel reads and writes:
the names and tokenizer.json parts that hf_export.py (out of BPETokenizer) and
hf_import.py (into it) share.

`export_tokenizer_hf` writes, for the same ids as xpmodel's tokenizer:
    tokenizer.json           for `tokenizers.Tokenizer.from_file`
    vocab.json, merges.txt   for transformers' GPT2Tokenizer / GPT2TokenizerFast
    tokenizer_config.json,
    special_tokens_map.json  so `transformers.AutoTokenizer.from_pretrained(dir)` works

`read_hf_tokenizer` / `import_hf_tokenizer` read a BPE back (tokenizer.json,
else vocab.json + merges.txt), in one of three forms:
    GPT-2's        a ByteLevel pre-tokenizer that splits with its built-in regex
    Llama 3's,     a Split by their own regex ("Isolated") followed by a
    Qwen2's        ByteLevel that only maps bytes (use_regex false), with
                   Qwen2's NFC normalizer and BPE ignore_merges; Meta's own
                   Llama 3 vocab, where some tokens are made by several merges
                   or (reached by ignore_merges) by none, included
    SentencePiece  Llama 2's, Mistral's, TinyLlama's: BPE with byte_fallback and
                   the 256 tokens "<0x00>".."<0xFF>", spaces written "▁" by a
                   Prepend + Replace normalizer or a Metaspace pre-tokenizer,
                   decoded by Replace, ByteFallback, Fuse and an optional Strip
An export writes the same form back. Anything else that would change the ids
or the decoded text (Digits, other normalizers or decoders, Unigram, an
unknown token instead of byte fallback) is refused, naming the part.
Hugging Face vocabs may number their tokens in any order; GPT-2's own puts the
256 byte tokens in the order of the bytes-to-unicode table ("!" is id 0, "Ġ"
is 220), where BPETokenizer needs id == byte value. So an import relabels
ids: bytes (or byte-fallback tokens) at 0..255, then the tokens the merges
make, in the order of the first merge making each (merge k at 256 + k when
each token has one merge), then the other tokens, special tokens last; and it
returns for each new id the Hugging Face id it came from, so model rows can be
permuted to match. The text-to-token mapping itself is unchanged; for GPT-2
only ids 0..255 move.

Hugging Face names byte-level tokens by GPT-2's bytes-to-unicode table, which
maps every byte to a printable character, so token strings never hold spaces
or control characters; SentencePiece tokens are their text with "▁" for a
space. Neither `tokenizers` nor `transformers` is needed to read or write the
files.
"""
SPACE = "\u2581"   # "▁", SentencePiece's space
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]   # SentencePiece's byte-fallback tokens
# The tokenizer.json parts of SentencePiece's spaces, as Hugging Face writes them.
PREPEND = {"type": "Prepend", "prepend": SPACE}
REPLACE_SPACES = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
SPACE_DECODERS = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                  {"type": "ByteFallback"}, {"type": "Fuse"}]
STRIP_DECODER = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
# Metaspace's prepend_scheme -> Metaspace.prepend (its "always" spares text that
# starts with a space).
HF_PREPEND_SCHEMES = {"always": "unless_space", "first": "first", "never": "never"}


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
