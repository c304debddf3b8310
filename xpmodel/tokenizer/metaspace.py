"""SentencePiece-style spaces (Llama 2, Mistral, TinyLlama): the `Metaspace`
option, and how it cuts text into pieces and a piece into its characters' tokens.
"""
import dataclasses

import regex

from ..errors import UsageError, quote

PREPEND_SCHEMES = ("always", "unless_space", "first", "never")

# Metaspace pieces: with split, a piece starts at every space (Hugging Face's
# MergedWithNext); without, where a space follows other text (see
# `metaspace_splitter`).
_SPACE_SPLIT = regex.compile(r" [^ ]*|[^ ]+")
_WORD_SPLIT = regex.compile(r" *[^ ]+| +")
# Metaspace.cut: a space or "▁" after other text, the last one ((?r) searches from the end).
_LAST_CUT = regex.compile(r"(?r)(?<=[^ \u2581])[ \u2581]")


@dataclasses.dataclass(frozen=True)
class Metaspace:
    """How a SentencePiece-style tokenizer (Llama 2's, Mistral's) treats spaces.

    Its tokens spell a space "▁"; xpmodel keeps them with the space itself, so
    that token bytes are text, and reads a "▁" in the text as a space, as
    those tokenizers do. Before the text between special tokens is split, a
    space is put in front of it when `prepend` says so:
        "always"        every non-empty text (Hugging Face's Prepend normalizer)
        "unless_space"  every text that does not start with a space (Metaspace
                        prepend_scheme "always")
        "first"         only the text at the start of the input, unless it starts
                        with a space (Metaspace "first")
        "never"
    `split`: a piece starts at every space (Metaspace split true); else the
    whole text is one piece. `strip_decoded`: decoding drops one leading space
    (Hugging Face's Strip decoder).
    """
    prepend: str = "always"
    split: bool = False
    strip_decoded: bool = True

    def __post_init__(self):
        if self.prepend not in PREPEND_SCHEMES:
            raise UsageError(f"metaspace prepend must be one of {list(PREPEND_SCHEMES)}, "
                             f"got {quote(self.prepend, 40)}")
        for name in ("split", "strip_decoded"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"metaspace {name} must be true or false, "
                                 f"got {quote(getattr(self, name), 40)}")

    def spaced(self, text, at_start, continued=False):
        """`text` as its tokens spell it: spaces for "▁", and the prepended space
        unless `continued` (the text carries on text cut off before it at a `cut`)."""
        text = text.replace("\u2581", " ")
        if text and not continued and (self.prepend == "always" or not text.startswith(" ") and (
                self.prepend == "unless_space" or self.prepend == "first" and at_start)):
            text = " " + text
        return text

    @staticmethod
    def cut(text):
        """Where `text` may be cut into two texts, the second `continued`, whose
        ids join into those of the whole: the last space (or "▁") that follows
        other text, where a piece starts whether or not pieces are `split`.
        0 when there is none."""
        match = _LAST_CUT.search(text)
        return 0 if match is None else match.start()


def char_ids(token_bytes):
    """Character -> id of the token that is that one character, for the
    tokens after the 256 bytes."""
    ids = {}
    for token_id in range(256, len(token_bytes)):
        text = token_bytes[token_id].decode("utf-8", errors="ignore")
        if len(text) == 1 and text.encode("utf-8") == token_bytes[token_id]:
            ids[text] = token_id
    return ids


def metaspace_splitter(metaspace, merges, token_bytes):
    """A function text -> pieces for a metaspace tokenizer.

    Without split, Hugging Face merges the whole text as one piece; xpmodel
    cuts it where a space follows other text, which gives the same tokens as
    long as no merge joins a token that ends in other text to one that starts
    with a space. SentencePiece vocabs, whose tokens start with their spaces,
    have none; a tokenizer that has one is refused.
    """
    if metaspace.split:
        return _SPACE_SPLIT.findall
    for rank, (left, right) in enumerate(merges):
        if token_bytes[right].startswith(b" ") and not token_bytes[left].endswith(b" "):
            raise UsageError(
                f"merge {rank} joins {quote(token_bytes[left].decode('utf-8', 'replace'), 30)} "
                f"and {quote(token_bytes[right].decode('utf-8', 'replace'), 30)} across a space, "
                f"which xpmodel does not encode without Metaspace split (it cuts text into words)")
    return _WORD_SPLIT.findall
