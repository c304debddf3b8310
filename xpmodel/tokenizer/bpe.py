"""Byte-level BPE tokenizer, the way GPT-2 tokenizes text (and SentencePiece's BPE).

Text is split by a pre-tokenization regex into pieces (by default GPT-2's:
words with their leading space, digit runs, punctuation runs, whitespace
runs); each piece is UTF-8 encoded and its bytes are merged pairwise by
learned rank. Every string round-trips exactly, because the pieces cover the
text and ids 0..255 cover every byte. (Text must be valid Unicode: a lone
surrogate has no UTF-8 form and raises UnicodeEncodeError, a ValueError.)

Five options exist so that Hugging Face tokenizers other than GPT-2's import
exactly (see hf_import.py); each is off by default, and a tokenizer that
uses none is stored and fingerprinted in the version-1 format (file_format.py):
    split_pattern   another split regex, as Llama 3 and Qwen2 use (Hugging
                    Face's Split with behavior "Isolated": the matches and the
                    text between them are the pieces)
    normalizer      "nfc": text is put in Unicode NFC before it is split, as
                    Qwen2 does; such a tokenizer round-trips NFC text only
    ignore_merges   a piece whose bytes are a token is that token, before any
                    merge is tried (Hugging Face's BPE ignore_merges)
    tokens          the bytes of every token, given apart from the merges: a
                    token may then be made by several merges or by none (Meta's
                    Llama 3 vocab, converted from tiktoken, has both), and
                    merges may rank before those that make their sides
    metaspace       SentencePiece's BPE (Llama 2, Mistral, TinyLlama; see
                    `Metaspace`): a space is a token's "▁", a piece starts as
                    its characters' tokens, and a character without one falls
                    back to its UTF-8 bytes (ids 0..255 are then the byte
                    tokens "<0x00>".."<0xFF>")

Id space, in order:
    0 .. 255                    the raw bytes (id == byte value)
    256 .. 256 + M - 1          the M merges, in rank order (lower id merges first);
                                with `tokens`, the T tokens instead, merges
                                ranking apart from ids
    256 + M .. vocab_size - 1   the special tokens, e.g. "<|endoftext|>"

Two special tokens have a meaning: "<|endoftext|>" (`eot_id`) separates
documents, and "<|mask|>" (`mask_id`), present only in tokenizers built for
data.token_dropout_mode: mask, stands in for the input tokens it hides.
Encoding text never yields a special id unless the text names it and
`allowed_special` allows it.

With no merges this is a plain byte tokenizer, used for character-level runs.

`BPETokenizer` ties together the parts that live in files of their own:
pretokenize.py and metaspace.py cut text into pieces, merging.py merges a
piece's ids, learning.py learns the merges, vocab.py bounds and checks what
a vocabulary holds, decoding.py turns ids back into text as they arrive
(`IncrementalDecoder`), file_format.py is the JSON file `save` writes, and
parallel.py runs `encode_chunks` in worker processes. Hugging Face's files
are written by hf_export.py and read by hf_import.py (their shared forms in
hf_forms.py). This file does not read corpora or write token files:
the data module streams text through `encode_chunks`.
"""
import hashlib
import numbers
import os
import unicodedata
from collections import Counter
from pathlib import Path

import numpy
import regex

from ..atomic import atomic_write_bytes
from ..errors import UsageError, quote
from .decoding import IncrementalDecoder, id_list
from .file_format import read_tokenizer_file, tokenizer_arguments, tokenizer_json
from .learning import learn_merges, training_texts
from .merging import LONG_PIECE, merge_long, merge_short
from .metaspace import Metaspace, char_ids, metaspace_splitter
from .parallel import encode_in_workers
from .pretokenize import GPT2_SPLIT_PATTERN, NORMALIZERS, splitter
from .vocab import (MAX_VOCAB, RANK_SHIFT, check_special_tokens, check_token_lengths, check_tokens,
                    is_id_below, is_iterable, made_ids, merged_bytes, sides_made_first)

ENDOFTEXT = "<|endoftext|>"
MASK = "<|mask|>"
# The per-piece encode cache is dropped when it grows past this many pieces,
# so encoding an unbounded corpus keeps bounded memory.
_CACHE_LIMIT = 1 << 20


def _check_options(metaspace, split_pattern, normalizer, ignore_merges):
    """Refuse options a tokenizer cannot take, naming the first (UsageError)."""
    if metaspace is not None:
        if not isinstance(metaspace, Metaspace):
            raise UsageError(f"metaspace must be a Metaspace or None, got {quote(metaspace, 40)}")
        if split_pattern is not None or normalizer is not None or ignore_merges:
            raise UsageError("a metaspace tokenizer takes no split_pattern, normalizer "
                             "or ignore_merges")
    if normalizer is not None and normalizer not in NORMALIZERS:
        raise UsageError(f"normalizer must be one of {list(NORMALIZERS)} or None, "
                         f"got {quote(normalizer, 40)}")
    if not isinstance(ignore_merges, bool):
        raise UsageError(f"ignore_merges must be true or false, got {quote(ignore_merges, 40)}")


def _merge_keys(merges, made, ranked):
    """(left_id, right_id) -> the key encoding prefers: the id the merge makes,
    or, when the ids are not in merge order (ranked), rank << RANK_SHIFT | id."""
    keys = {}
    for rank, (pair, new_id) in enumerate(zip(merges, made)):
        if pair in keys:
            raise UsageError(f"merge {rank} {list(pair)} is listed twice")
        keys[pair] = rank << RANK_SHIFT | new_id if ranked else new_id
    return keys


def _special_splitter(specials):
    """A pattern that splits text at the special tokens (longest first, so a
    special that contains another wins), or None without any."""
    if not specials:
        return None
    alternatives = sorted(specials, key=len, reverse=True)
    return regex.compile("(" + "|".join(regex.escape(s) for s in alternatives) + ")")


class BPETokenizer:
    """A byte-level BPE tokenizer: merges learned by `train`, or loaded by `load`.

    `merges[k] == (left_id, right_id)` makes token id 256 + k; each side is a
    byte or an earlier merge. With `tokens` (a sequence of bytes: ids 256,
    257, ...), merge k instead makes the token whose bytes are its sides'
    bytes joined, and its sides may be any tokens. Special tokens take the ids
    after, in the order given. `split_pattern`, `normalizer`, `ignore_merges`,
    `tokens` and `metaspace` are the options of the module docstring; with a
    `metaspace`, `split_pattern` is None (spaces decide the pieces).
    """

    def __init__(self, merges=(), special_tokens=(ENDOFTEXT,), split_pattern=GPT2_SPLIT_PATTERN,
                 normalizer=None, ignore_merges=False, tokens=None, metaspace=None):
        check_special_tokens(special_tokens)
        _check_options(metaspace, split_pattern, normalizer, ignore_merges)
        self._metaspace, self._split_pattern = metaspace, split_pattern
        self._normalizer, self._ignore_merges = normalizer, ignore_merges
        if metaspace is None:
            self._pieces = splitter(split_pattern)   # text -> list of piece str
        merges = tuple(merges)
        count = len(merges) if tokens is None else len(tokens)
        if max(count, len(merges)) + 256 + len(special_tokens) > MAX_VOCAB:
            raise UsageError(f"{count:,} tokens and {len(merges):,} merges make more than the "
                             f"{MAX_VOCAB:,} ids xpmodel supports")
        self._merges = tuple((int(a), int(b)) for a, b in merges)
        self._specials = tuple(special_tokens)
        if tokens is None:
            check_token_lengths(self._merges)
            tokens = merged_bytes(self._merges)
        else:
            tokens = check_tokens(tokens)
        self._token_bytes = [bytes([i]) for i in range(256)] + list(tokens)  # id -> bytes
        made = made_ids(self._merges, self._token_bytes, metaspace is not None)  # merge -> id
        # Tokens that are exactly what the merges make, in order, need not be stored.
        self._tokens = None if made == list(range(256, 256 + len(tokens))) else tokens
        # (left_id, right_id) -> merge key (see vocab.RANK_SHIFT)
        self._merge_ids = _merge_keys(self._merges, made, ranked=self._tokens is not None)
        # Merging all of a piece's best pair per round is exact when no merge
        # ranks before one that makes its sides; otherwise every piece takes the heap.
        self._long_piece = LONG_PIECE if sides_made_first(self._merges, made) else 0
        first_special = len(self._token_bytes)
        self._special_ids = {s: first_special + i for i, s in enumerate(self._specials)}
        self._token_bytes.extend(s.encode("utf-8") for s in self._specials)
        self._special_split = _special_splitter(self._specials)
        self._whole_ids = None  # with ignore_merges: bytes -> id of every non-special token
        if ignore_merges:
            self._whole_ids = {b: i for i, b in enumerate(self._token_bytes[:first_special])}
        self._char_ids = None   # with metaspace: character -> its token's id
        if metaspace is not None:
            self._char_ids = char_ids(self._token_bytes[:first_special])
            self._pieces = metaspace_splitter(metaspace, self._merges, self._token_bytes)
        self._piece_cache = {}  # piece str -> list of ids

    # ----- training -------------------------------------------------------

    @classmethod
    def train(cls, texts, vocab_size, special_tokens=(ENDOFTEXT,),
              split_pattern=GPT2_SPLIT_PATTERN, normalizer=None):
        """Learn merges from `texts` (a str or an iterable of str), split by
        `split_pattern` after `normalizer` (see the module docstring).

        `vocab_size` counts every id: 256 bytes + merges + special tokens, so
        4096 with one special token learns 3839 merges. The 256 byte ids and
        the special tokens are always present: `vocab_size=256` means no
        merges (a byte tokenizer), and its one special token still gets id 256,
        giving 257 ids. Training stops early when no pair of adjacent tokens
        is left to merge, or when the tokens would pass the bytes a tokenizer
        may hold in all; `tok.vocab_size` is always the true id count. A pair
        whose token would pass the bytes one token may hold (16 KiB) is never
        merged.

        Ties between equally frequent pairs go to the lowest (left id,
        right id), so training is reproducible. A pair whose bytes already
        form a token is never merged, so every id has distinct bytes (which
        the Hugging Face vocab needs).
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
            raise UsageError(f"vocab_size must be an integer, got {quote(vocab_size, 100)}")
        vocab_size = int(vocab_size)
        if vocab_size < 256:
            raise UsageError(f"vocab_size must be at least 256 (the byte ids), "
                             f"got {vocab_size}")
        if vocab_size > MAX_VOCAB:
            raise UsageError(f"vocab_size must be at most {MAX_VOCAB:,}, got {vocab_size:,}")
        check_special_tokens(special_tokens)  # before the slow part, not after
        special_tokens = tuple(special_tokens)
        options = cls((), special_tokens, split_pattern, normalizer)   # checks them
        word_counts = Counter()
        for text in training_texts(texts):
            word_counts.update(options._pieces(options._normalize(text)))
        num_merges = max(0, vocab_size - 256 - len(special_tokens))
        merges = learn_merges(word_counts, num_merges)
        return cls(merges, special_tokens, split_pattern, normalizer)

    # ----- the id space ---------------------------------------------------

    @property
    def vocab_size(self):
        """Number of ids: 256 + len(merges) + len(special_tokens)."""
        return len(self._token_bytes)

    @property
    def merges(self):
        """The merges in rank order: a tuple of (left_id, right_id)."""
        return self._merges

    @property
    def special_tokens(self):
        """A new dict of special token string -> id."""
        return dict(self._special_ids)

    @property
    def eot_id(self):
        """The id of "<|endoftext|>", or None when it is not a special token."""
        return self._special_ids.get(ENDOFTEXT)

    @property
    def mask_id(self):
        """The id of "<|mask|>", or None when it is not a special token."""
        return self._special_ids.get(MASK)

    @property
    def split_pattern(self):
        """The regex that splits text into pieces (GPT2_SPLIT_PATTERN by default;
        None with a metaspace)."""
        return self._split_pattern

    @property
    def normalizer(self):
        """None, or "nfc" when text is put in NFC before it is split."""
        return self._normalizer

    @property
    def ignore_merges(self):
        """Whether a piece whose bytes are a token is that token before any merge."""
        return self._ignore_merges

    @property
    def metaspace(self):
        """None for byte-level BPE, or the Metaspace of a SentencePiece-style BPE."""
        return self._metaspace

    def token_bytes(self, token_id):
        """The bytes that one id decodes to."""
        return self.decode_bytes((token_id,))

    # ----- encoding -------------------------------------------------------

    def encode_ordinary(self, text):
        """Encode `text` as plain text (special token strings are just text). -> list[int]"""
        _check_text(text)
        return self._encode_text(text, at_start=True)

    def _encode_text(self, text, at_start, continued=False):
        """The ids of ordinary `text`; `at_start`: it begins the input, `continued`:
        it carries on a text cut before it (see Metaspace)."""
        cache = self._piece_cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        ids = []
        extend = ids.extend
        for piece in self._pieces(self._normalize(text, at_start, continued)):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = self._encode_piece(piece)
                cache[piece] = piece_ids
            extend(piece_ids)
        return ids

    def encode(self, text, allowed_special=frozenset()):
        """Encode `text`, turning the allowed special token strings into their ids.

        `allowed_special` is a set of special token strings or "all". Text that
        contains a special token string that is not allowed raises UsageError
        (a ValueError), because silently encoding it as text is rarely meant:
        use `encode_ordinary` for that.
        """
        _check_text(text)
        allowed = self._allowed_specials(allowed_special)
        for special in self._specials:
            if special not in allowed and special in text:
                raise UsageError(
                    f"text contains the special token {special!r}, which is not allowed; "
                    f"pass allowed_special={{{special!r}}} to encode it as a special token, "
                    f"or use encode_ordinary to encode it as text")
        if not allowed:
            return self._encode_text(text, at_start=True)
        ids = []
        # With a capturing group, split alternates text, special, text, ...
        for i, part in enumerate(self._special_split.split(text)):
            if i % 2:
                ids.append(self._special_ids[part])
            elif part:
                ids.extend(self._encode_text(part, at_start=i == 0))
        return ids

    def _allowed_specials(self, allowed_special):
        """`encode`'s allowed_special as a set of this tokenizer's special tokens."""
        if allowed_special == "all":
            return set(self._specials)
        if isinstance(allowed_special, (str, bytes)) or not is_iterable(allowed_special):
            raise TypeError(f"allowed_special must be \"all\" or a set of special token "
                            f"strings such as {{{ENDOFTEXT!r}}}, got {quote(allowed_special, 60)}")
        allowed = set(allowed_special)
        unknown = allowed - set(self._specials)
        if unknown:
            raise UsageError(f"allowed_special names tokens that are not special "
                             f"tokens of this tokenizer: {sorted(unknown, key=repr)}")
        return allowed

    def encode_chunks(self, chunks, workers=None):
        """Encode an iterable of chunks, yielding one numpy uint32 array per chunk, in order.

        A chunk is ordinary text, as in `encode_ordinary`, or a pair (text,
        continued): with `continued` true the text carries on the chunk before,
        and the arrays of a text's chunks join into the ids of the whole text.
        With a metaspace that holds wherever the text was cut, because a
        chunk's text after its last `Metaspace.cut` (all of it when it has
        none) is encoded with the next chunk that continues it. Byte-level
        chunks are encoded as they are: they join exactly when cut between two
        pieces of the split pattern (the corpus reader cuts at a newline
        between non-spaces, where GPT-2's, Llama 3's and Qwen2's patterns do).

        With `workers` > 1
        (default: the CPU count), chunks are encoded in worker processes that
        rebuild this tokenizer from its JSON; only strings and arrays cross
        the process boundary, and at most a few chunks per worker are in
        flight, so a corpus larger than memory streams through. Workers are
        started by a fork server (or spawned), never forked from this process,
        whose other threads may hold locks a forked child would wait on forever.
        With workers <= 1, chunks are encoded here, one by one.
        """
        workers = (os.cpu_count() or 1) if workers is None else int(workers)
        chunks = self._cut_chunks(chunks)
        if workers <= 1:
            for text, continued in chunks:
                yield self._encode_to_array(text, continued)
            return
        yield from encode_in_workers(BPETokenizer, self.to_json(), chunks, workers)

    def _cut_chunks(self, chunks):
        """`encode_chunks`' chunks as (text, continued) pairs. With a metaspace,
        the text of a chunk that the next continues, from its last cut on,
        moves to that next chunk; so each chunk waits until the next is seen."""
        held = None   # (text, continued) of the chunk before
        for chunk in chunks:
            text, continued = (chunk, False) if isinstance(chunk, str) else chunk
            if held is not None and continued and self._metaspace is not None:
                before, before_continued = held
                cut = Metaspace.cut(before)
                held = before[:cut], before_continued
                text, continued = before[cut:] + text, before_continued if cut == 0 else True
            if held is not None:
                yield held
            held = text, bool(continued)
        if held is not None:
            yield held

    def _encode_to_array(self, text, continued=False):
        ids = self._encode_text(text, at_start=True, continued=continued)
        return numpy.array(ids, dtype=numpy.uint32)  # (tokens,)

    def _normalize(self, text, at_start=True, continued=False):
        if self._metaspace is not None:
            return self._metaspace.spaced(text, at_start, continued)
        return text if self._normalizer is None else unicodedata.normalize("NFC", text)

    def _encode_piece(self, piece):
        if self._whole_ids is not None:
            whole = self._whole_ids.get(piece.encode("utf-8"))
            if whole is not None:
                return [whole]
        if self._char_ids is None:
            ids = list(piece.encode("utf-8"))
        else:
            ids = self._char_symbols(piece)
        if len(ids) > self._long_piece:
            return merge_long(ids, self._merge_ids)
        return merge_short(ids, self._merge_ids)

    def _char_symbols(self, piece):
        """A metaspace piece before merges: each character's token, or its UTF-8
        bytes when it has none (Hugging Face's byte_fallback)."""
        get = self._char_ids.get
        ids = []
        for char in piece:
            char_id = get(char)
            if char_id is None:
                ids.extend(char.encode("utf-8"))
            else:
                ids.append(char_id)
        return ids

    # ----- decoding -------------------------------------------------------

    def decode_bytes(self, ids):
        """The bytes that a sequence of ids (list, tuple or numpy array) stands for."""
        ids = id_list(ids)
        table = self._token_bytes
        try:
            if min(ids, default=0) >= 0:
                return b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            pass
        bad = next(i for i in ids if not is_id_below(i, len(table)))
        raise UsageError(f"token id {quote(bad, 100)} is not in this tokenizer's vocabulary "
                         f"(ids 0..{len(table) - 1})")

    def decode(self, ids):
        """The text that `ids` stand for. Bytes that do not form valid UTF-8 (ids that
        end mid-character) become U+FFFD.

        With a metaspace, as Hugging Face's ByteFallback decoder: a run of byte
        ids that is not valid UTF-8 becomes one U+FFFD per byte; then one
        leading space is dropped if `strip_decoded`.
        """
        return IncrementalDecoder(self).decode(ids, final=True)

    def incremental_decoder(self, context=()):
        """An `IncrementalDecoder` for ids that follow `context`, ids whose text is
        shown already (a prompt): they decode as they do after it in `decode`,
        except that a run of byte ids or a character does not span the two."""
        decoder = IncrementalDecoder(self)
        decoder.decode(context, final=True)
        return decoder

    # ----- files ----------------------------------------------------------

    def to_json(self):
        """The tokenizer as a JSON document (str): one merge per line, readable and diffable."""
        return tokenizer_json(self._merges, self._specials, self._split_pattern, self._normalizer,
                              self._ignore_merges, self._tokens, self._metaspace)

    def save(self, path):
        """Write the tokenizer to one JSON file (written whole, then renamed into place)."""
        atomic_write_bytes(Path(path), self.to_json().encode("utf-8"))

    @classmethod
    def load(cls, path):
        """Read a file written by `save`. Raises DataError naming the file if it
        is missing, truncated, corrupt or not an xpmodel tokenizer."""
        return read_tokenizer_file(Path(path), cls._from_document)

    @classmethod
    def _from_document(cls, document):
        return cls(**tokenizer_arguments(document))

    def fingerprint(self):
        """Hex sha256 of the tokenizer's content: equal fingerprints mean equal encodings."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def __eq__(self, other):
        if not isinstance(other, BPETokenizer):
            return NotImplemented
        return (self._merges == other._merges and self._specials == other._specials
                and self._split_pattern == other._split_pattern
                and self._normalizer == other._normalizer
                and self._ignore_merges == other._ignore_merges
                and self._tokens == other._tokens and self._metaspace == other._metaspace)

    __hash__ = None  # tokenizers are compared by content; use fingerprint() as a key

    def __repr__(self):
        options = ""
        if self._metaspace is not None:
            options += f", metaspace={self._metaspace!r}"
        elif self._split_pattern != GPT2_SPLIT_PATTERN:
            options += f", split_pattern={quote(self._split_pattern, 40)}"
        if self._normalizer is not None:
            options += f", normalizer={self._normalizer!r}"
        if self._ignore_merges:
            options += ", ignore_merges=True"
        if self._tokens is not None:
            options += f", tokens={len(self._tokens)}"
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)}, "
                f"special_tokens={list(self._specials)}{options})")


def _check_text(text):
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {quote(text, 60)}")
