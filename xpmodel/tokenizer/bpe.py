"""Byte-level BPE tokenizer, the way GPT-2 tokenizes text (and SentencePiece's BPE).

Text is split by a pre-tokenization regex into pieces (by default GPT-2's:
words with their leading space, digit runs, punctuation runs, whitespace
runs); each piece is UTF-8 encoded and its bytes are merged pairwise by
learned rank. Every string round-trips exactly, because the pieces cover the
text and ids 0..255 cover every byte. (Text must be valid Unicode: a lone
surrogate has no UTF-8 form and raises UnicodeEncodeError, a ValueError.)

Five options exist so that Hugging Face tokenizers other than GPT-2's import
exactly (see hf_files.py); each is off by default, and a tokenizer that
uses none is stored, fingerprinted and encodes exactly as before they existed:
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

`IncrementalDecoder` turns ids into text as they arrive (a model's samples);
its texts join into what `decode` gives.

Files are one readable JSON document (see `save`); nothing is pickled.
Hugging Face export lives in `hf_files.py`. This file does not read
corpora or write token files: the data module streams text through
`encode_chunks`.
"""
import codecs
import dataclasses
import hashlib
import heapq
import itertools
import json
import multiprocessing
import numbers
import operator
import os
import unicodedata
from collections import Counter, defaultdict, deque
from pathlib import Path

import numpy
import regex

from ..atomic import atomic_write_bytes
from ..errors import DataError, UsageError, quote
from ..files import parse_json, read_bounded

GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
MASK = "<|mask|>"
FILE_FORMAT = "xpmodel-bpe-tokenizer"
FILE_VERSION = 1    # what a tokenizer with none of the options writes, as xpmodel always has
FILE_VERSION_OPTIONS = 2   # with any option, so that an older xpmodel refuses the file
NORMALIZERS = ("nfc",)
PREPEND_SCHEMES = ("always", "unless_space", "first", "never")
MAX_SPLIT_PATTERN_BYTES = 4096

_SPLIT = regex.compile(GPT2_SPLIT_PATTERN)
# Metaspace pieces: with split, a piece starts at every space (Hugging Face's
# MergedWithNext); without, where a space follows other text (see `__init__`).
_SPACE_SPLIT = regex.compile(r" [^ ]*|[^ ]+")
_WORD_SPLIT = regex.compile(r" *[^ ]+| +")
# Metaspace.cut: a space or "▁" after other text, the last one ((?r) searches from the end).
_LAST_CUT = regex.compile(r"(?r)(?<=[^ \u2581])[ \u2581]")
# Pieces longer than this are merged with a heap (O(n log n)) instead of
# repeated scans (O(n * merges applied)): a long run of spaces or a base64 blob
# would otherwise be quadratic.
_LONG_PIECE = 64
# The per-piece encode cache is dropped when it grows past this many pieces,
# so encoding an unbounded corpus keeps bounded memory.
_CACHE_LIMIT = 1 << 20
# Bounds on what a tokenizer file may describe, checked from its sizes before
# anything is built: real vocabularies have at most a few hundred thousand ids
# and tokens of at most a few hundred bytes.
MAX_VOCAB = 1 << 20
_MAX_TOKEN_BYTES = 1 << 14
_MAX_TOTAL_TOKEN_BYTES = 1 << 28
_MAX_SPECIAL_TOKENS = 1024
_MAX_SPECIAL_CHARS = 256
_MAX_FILE_BYTES = 64 << 20
# A merge's key orders merges by rank and names the token it makes:
# rank << _RANK_SHIFT | id. When merge k makes id 256 + k the key is the id.
_RANK_SHIFT = 20
_ID_MASK = (1 << _RANK_SHIFT) - 1
assert MAX_VOCAB <= 1 << _RANK_SHIFT


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
        _check_special_tokens(special_tokens)
        if metaspace is not None:
            if not isinstance(metaspace, Metaspace):
                raise UsageError(f"metaspace must be a Metaspace or None, "
                                 f"got {quote(metaspace, 40)}")
            if split_pattern is not None or normalizer is not None or ignore_merges:
                raise UsageError("a metaspace tokenizer takes no split_pattern, normalizer "
                                 "or ignore_merges")
        self._metaspace = metaspace
        self._split_pattern = split_pattern
        if metaspace is None:
            self._pieces = _splitter(split_pattern)   # text -> list of piece str
        if normalizer is not None and normalizer not in NORMALIZERS:
            raise UsageError(f"normalizer must be one of {list(NORMALIZERS)} or None, "
                             f"got {quote(normalizer, 40)}")
        self._normalizer = normalizer
        if not isinstance(ignore_merges, bool):
            raise UsageError(f"ignore_merges must be true or false, got {quote(ignore_merges, 40)}")
        self._ignore_merges = ignore_merges
        merges = tuple(merges)
        count = len(merges) if tokens is None else len(tokens)
        if max(count, len(merges)) + 256 + len(special_tokens) > MAX_VOCAB:
            raise UsageError(f"{count:,} tokens and {len(merges):,} merges make more than the "
                             f"{MAX_VOCAB:,} ids xpmodel supports")
        self._merges = tuple((int(a), int(b)) for a, b in merges)
        self._specials = tuple(special_tokens)
        if tokens is None:
            _check_token_lengths(self._merges)
            tokens = _merged_bytes(self._merges)
        else:
            tokens = _check_tokens(tokens)
        self._token_bytes = [bytes([i]) for i in range(256)] + list(tokens)  # id -> bytes
        made = _made_ids(self._merges, self._token_bytes, metaspace is not None)  # merge -> id
        # Tokens that are exactly what the merges make, in order, need not be stored.
        self._tokens = None if made == list(range(256, 256 + len(tokens))) else tokens
        self._merge_ids = {}  # (left_id, right_id) -> merge key (see _RANK_SHIFT)
        for rank, (pair, new_id) in enumerate(zip(self._merges, made)):
            if pair in self._merge_ids:
                raise UsageError(f"merge {rank} {list(pair)} is listed twice")
            self._merge_ids[pair] = new_id if self._tokens is None else rank << _RANK_SHIFT | new_id
        # Merging all of a piece's best pair per round is exact when no merge
        # ranks before one that makes its sides; otherwise every piece takes the heap.
        self._long_piece = _LONG_PIECE if _sides_made_first(self._merges, made) else 0
        first_special = len(self._token_bytes)
        self._special_ids = {s: first_special + i for i, s in enumerate(self._specials)}
        self._token_bytes.extend(s.encode("utf-8") for s in self._specials)
        self._special_split = None
        if self._specials:
            # Longest first, so a special that contains another wins.
            alternatives = sorted(self._specials, key=len, reverse=True)
            self._special_split = regex.compile(
                "(" + "|".join(regex.escape(s) for s in alternatives) + ")")
        self._whole_ids = None  # with ignore_merges: bytes -> id of every non-special token
        if ignore_merges:
            self._whole_ids = {b: i for i, b in enumerate(self._token_bytes[:first_special])}
        self._char_ids = None   # with metaspace: character -> its token's id
        if metaspace is not None:
            self._char_ids = _char_ids(self._token_bytes[:first_special])
            self._pieces = _metaspace_splitter(metaspace, self._merges, self._token_bytes)
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
        _check_special_tokens(special_tokens)  # before the slow part, not after
        special_tokens = tuple(special_tokens)
        options = cls((), special_tokens, split_pattern, normalizer)   # checks them
        word_counts = Counter()
        for text in _training_texts(texts):
            word_counts.update(options._pieces(options._normalize(text)))
        num_merges = max(0, vocab_size - 256 - len(special_tokens))
        merges = _learn_merges(word_counts, num_merges)
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
            return self.encode_ordinary(text)
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
        if isinstance(allowed_special, (str, bytes)) or not _is_iterable(allowed_special):
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
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        pool = context.Pool(workers, initializer=_install_worker_tokenizer, initargs=(self.to_json(),))
        try:
            pending = deque()
            for chunk in chunks:
                pending.append(pool.apply_async(_encode_in_worker, chunk))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().get(_WORKER_TIMEOUT_S)
            while pending:
                yield pending.popleft().get(_WORKER_TIMEOUT_S)
            pool.close()
        finally:
            pool.terminate()
            pool.join()

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
            return _merge_long(ids, self._merge_ids)
        return _merge_short(ids, self._merge_ids)

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
        ids = _id_list(ids)
        table = self._token_bytes
        try:
            if min(ids, default=0) >= 0:
                return b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            pass
        bad = next(i for i in ids if not _is_id_below(i, len(table)))
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
        header = {"format": FILE_FORMAT, "version": FILE_VERSION, "pre_tokenizer": "gpt2"}
        if self._has_options():
            header["version"] = FILE_VERSION_OPTIONS
            if self._normalizer is not None:
                header["normalizer"] = self._normalizer
            if self._metaspace is not None:
                header.update(pre_tokenizer="metaspace",
                              metaspace=dataclasses.asdict(self._metaspace))
            elif self._split_pattern != GPT2_SPLIT_PATTERN:
                header.update(pre_tokenizer="split", split_pattern=self._split_pattern)
            if self._ignore_merges:
                header["ignore_merges"] = True
        header = json.dumps({**header, "special_tokens": list(self._specials)})
        merge_lines = ",\n".join(f"  [{a}, {b}]" for a, b in self._merges)
        tokens = ""
        if self._tokens is not None:   # hex, one token per line
            tokens = ', "tokens": [\n' + ",\n".join(f'  "{t.hex()}"' for t in self._tokens) + "\n]"
        return header[:-1] + ', "merges": [\n' + merge_lines + "\n]" + tokens + "}\n"

    def save(self, path):
        """Write the tokenizer to one JSON file (written whole, then renamed into place)."""
        atomic_write_bytes(Path(path), self.to_json().encode("utf-8"))

    @classmethod
    def load(cls, path):
        """Read a file written by `save`. Raises DataError naming the file if it
        is missing, truncated, corrupt or not an xpmodel tokenizer."""
        path = Path(path)
        data = read_bounded(path, _MAX_FILE_BYTES, DataError, "tokenizer file")
        try:
            document = parse_json(data.decode("utf-8"))
        except ValueError as exc:   # UnicodeDecodeError and JSONDecodeError included
            raise DataError(f"{path}: cannot read tokenizer file: {_one_line(exc)}") from None
        try:
            return cls._from_document(document)
        except (UsageError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: tokenizer file is not usable: {_one_line(exc)}") from None

    @classmethod
    def _from_document(cls, document):
        if not isinstance(document, dict) or document.get("format") != FILE_FORMAT:
            raise UsageError(f"it is not an xpmodel tokenizer (no \"format\": \"{FILE_FORMAT}\")")
        version = document.get("version")
        if version not in (FILE_VERSION, FILE_VERSION_OPTIONS) or type(version) is not int:
            raise UsageError(f"format version {quote(version, 100)} is not supported "
                             f"(this xpmodel reads versions {FILE_VERSION} and "
                             f"{FILE_VERSION_OPTIONS})")
        split_pattern, metaspace = _document_splitting(document)
        tokens = document.get("tokens")
        if tokens is not None:
            if not isinstance(tokens, list):
                raise UsageError("\"tokens\" must be a list")
            tokens = [_token_from_hex(k, text) for k, text in enumerate(tokens)]
        options = dict(split_pattern=split_pattern, normalizer=document.get("normalizer"),
                       ignore_merges=document.get("ignore_merges", False), tokens=tokens,
                       metaspace=metaspace)
        merges = document.get("merges")
        specials = document.get("special_tokens")
        if not isinstance(merges, list) or not isinstance(specials, list):
            raise UsageError("\"merges\" and \"special_tokens\" must be lists")
        for k, pair in enumerate(merges):
            if not (isinstance(pair, list) and len(pair) == 2
                    and all(type(i) is int for i in pair)):
                raise UsageError(f"merge {k} is {quote(pair, 60)}, not a pair of ids")
        return cls(merges, specials, **options)

    def fingerprint(self):
        """Hex sha256 of the tokenizer's content: equal fingerprints mean equal encodings."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def _has_options(self):
        return (self._split_pattern != GPT2_SPLIT_PATTERN or self._normalizer is not None
                or self._ignore_merges or self._tokens is not None)

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


class IncrementalDecoder:
    """Text from ids that arrive a few at a time, as a model samples them.

    Each `decode(ids)` returns the text the ids complete; the texts of all
    calls, the last with `final`, join into `BPETokenizer.decode` of all the
    ids. Until `final`, text that later ids could still change is held back:
    a character whose UTF-8 bytes have not all arrived and, with a metaspace,
    a run of byte ids that has not ended (one byte that is not UTF-8 makes
    the whole run U+FFFD).
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._byte_run = bytearray()   # metaspace: the bytes of the byte ids since the last other id
        metaspace = tokenizer.metaspace
        self._strip = metaspace is not None and metaspace.strip_decoded   # no text out yet

    def decode(self, ids, final=False):
        tokenizer = self._tokenizer
        if tokenizer.metaspace is None:
            return self._utf8.decode(tokenizer.decode_bytes(ids), final)
        ids = _id_list(ids)
        tokenizer.decode_bytes(ids)   # refuses an id outside the vocabulary
        parts = []
        for is_byte, run in itertools.groupby(ids, key=(256).__gt__):
            data = tokenizer.decode_bytes(list(run))
            if is_byte:
                parts.append(self._utf8.decode(b"", final=True))
                self._byte_run += data
            else:
                parts.append(self._end_byte_run())
                parts.append(self._utf8.decode(data))
        if final:
            parts.append(self._end_byte_run())
            parts.append(self._utf8.decode(b"", final=True))
        text = "".join(parts)
        if self._strip and text:
            self._strip = False
            if text.startswith(" "):
                text = text[1:]
        return text

    def _end_byte_run(self):
        data, self._byte_run = self._byte_run, bytearray()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "\ufffd" * len(data)


def _document_splitting(document):
    """(split_pattern, metaspace) of a tokenizer file's document."""
    pre_tokenizer = document.get("pre_tokenizer")
    if pre_tokenizer == "split":
        return document.get("split_pattern"), None
    if pre_tokenizer == "metaspace":
        fields = document.get("metaspace")
        names = [field.name for field in dataclasses.fields(Metaspace)]
        if not isinstance(fields, dict) or sorted(fields) != sorted(names):
            raise UsageError(f"\"metaspace\" must be an object of {names}, "
                             f"got {quote(fields, 80)}")
        return None, Metaspace(**fields)
    if pre_tokenizer != "gpt2":
        raise UsageError(f"pre_tokenizer {quote(pre_tokenizer, 40)} is not supported")
    if "split_pattern" in document:
        raise UsageError("it has a \"split_pattern\" but its pre_tokenizer is \"gpt2\"")
    return GPT2_SPLIT_PATTERN, None


def _training_texts(texts):
    """`train`'s texts (a str or an iterable of str), one str at a time."""
    if isinstance(texts, str):
        yield texts
        return
    if isinstance(texts, (bytes, bytearray)) or not _is_iterable(texts):
        raise TypeError(f"texts must be a str or an iterable of str, got {quote(texts, 60)}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts must be a str or an iterable of str; text {i} is "
                            f"{quote(text, 60)}")
        yield text


def _check_text(text):
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {quote(text, 60)}")


def _id_list(ids):
    """`ids` (a list, tuple, numpy array or other iterable of ids) as a list."""
    if isinstance(ids, list):
        return ids
    if isinstance(ids, numpy.ndarray):
        return ids.tolist()
    if isinstance(ids, (str, bytes, bytearray)) or not _is_iterable(ids):
        raise TypeError(f"ids must be a sequence of token ids, got {quote(ids, 60)}")
    return list(ids)


def _is_iterable(value):
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _check_special_tokens(special_tokens):
    if isinstance(special_tokens, str) or not all(
            isinstance(s, str) and s for s in special_tokens):
        raise UsageError("special_tokens must be a sequence of non-empty strings, "
                         f"got {quote(special_tokens, 80)}")
    if len(special_tokens) > _MAX_SPECIAL_TOKENS:
        raise UsageError(f"{len(special_tokens):,} special tokens, more than the "
                         f"{_MAX_SPECIAL_TOKENS} xpmodel supports")
    for s in special_tokens:
        if len(s) > _MAX_SPECIAL_CHARS:
            raise UsageError(f"special token {quote(s, 40)} is {len(s):,} characters, more than "
                             f"{_MAX_SPECIAL_CHARS}")
    if len(set(special_tokens)) != len(special_tokens):
        raise UsageError(f"special_tokens has duplicates: {list(special_tokens)}")


def check_split_pattern(pattern):
    """The compiled `pattern`, or UsageError saying in one line why it is not usable.

    Hugging Face compiles split patterns with Oniguruma, whose ^ and $ match at
    line breaks, so they are compiled MULTILINE here. The `regex` module and
    Oniguruma agree on the syntax such patterns use (classes, \\p{..},
    lookaheads, (?i:...)); the tests check GPT-2's, Llama 3's and Qwen2's
    patterns id for id against the `tokenizers` library.
    """
    if not isinstance(pattern, str) or not pattern:
        raise UsageError(f"the split pattern must be a non-empty string, got {quote(pattern, 60)}")
    size = len(pattern.encode("utf-8", errors="replace"))
    if size > MAX_SPLIT_PATTERN_BYTES:
        raise UsageError(f"the split pattern is {size:,} bytes, more than the "
                         f"{MAX_SPLIT_PATTERN_BYTES:,} xpmodel allows")
    try:
        return regex.compile(pattern, regex.MULTILINE)
    except (regex.error, ValueError, OverflowError, RecursionError) as exc:
        raise UsageError(f"the split pattern {quote(pattern, 60)} does not compile: "
                         f"{_one_line(exc)}") from None


def _splitter(pattern):
    """A function text -> the list of its pieces under `pattern`, "Isolated".

    For every pattern that can neither match the empty string nor skip text
    (GPT-2's, Llama 3's and Qwen2's), `findall` gives the pieces; `_isolated`
    handles any other exactly, more slowly.
    """
    if pattern == GPT2_SPLIT_PATTERN:
        return _SPLIT.findall
    compiled = check_split_pattern(pattern)
    if compiled.groups:   # findall would return the groups, not the matches
        return lambda text: _isolated(compiled, text)

    def pieces(text):
        found = compiled.findall(text)
        if sum(map(len, found)) == len(text) and "" not in found:
            return found
        return _isolated(compiled, text)
    return pieces


def _isolated(compiled, text):
    """The pieces of Hugging Face's Split(pattern, "Isolated"): each match and
    each run of text between matches, empty ones dropped. Matches are found
    as the Rust `onig` crate's find_iter finds them: an empty match right
    where the previous match ended is skipped by moving on one character."""
    pieces = []
    start = search_at = 0      # start: end of the text already cut into pieces
    last_match_end = None
    while search_at <= len(text):
        match = compiled.search(text, search_at)
        if match is None:
            break
        begin, end = match.span()
        if begin == end and last_match_end == end:
            search_at += 1
            continue
        if begin > start:
            pieces.append(text[start:begin])
        if end > begin:
            pieces.append(text[begin:end])
        start = search_at = last_match_end = end
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _check_token_lengths(merges):
    """Refuse merges that refer to later ids or build absurdly long tokens,
    from the lengths alone (a chain of 41 doublings would be 2 TiB)."""
    lengths = [1] * 256
    total = 256
    for k, (left, right) in enumerate(merges):
        new_id = 256 + k
        if not (0 <= left < new_id and 0 <= right < new_id):
            raise UsageError(f"merge {k} {[left, right]} refers to an id not defined before it")
        length = lengths[left] + lengths[right]
        if length > _MAX_TOKEN_BYTES:
            raise UsageError(f"merge {k} builds a token of {length:,} bytes, more than the "
                             f"{_MAX_TOKEN_BYTES:,} xpmodel allows")
        total += length
        if total > _MAX_TOTAL_TOKEN_BYTES:
            raise UsageError(f"the merges build {total:,}+ bytes of tokens, more than the "
                             f"{_MAX_TOTAL_TOKEN_BYTES:,} xpmodel allows")
        lengths.append(length)


def _merged_bytes(merges):
    """The bytes of the tokens that merges[k] makes as id 256 + k."""
    table = [bytes([i]) for i in range(256)]
    for left, right in merges:
        table.append(table[left] + table[right])
    return table[256:]


def _check_tokens(tokens):
    """`tokens` as a tuple of bytes; refused if one is empty or they are absurdly long."""
    checked = []
    total = 256
    for k, token in enumerate(tokens):
        if not isinstance(token, (bytes, bytearray)) or not token:
            raise UsageError(f"token {256 + k} is {quote(token, 40)}, not non-empty bytes")
        if len(token) > _MAX_TOKEN_BYTES:
            raise UsageError(f"token {256 + k} is {len(token):,} bytes, more than the "
                             f"{_MAX_TOKEN_BYTES:,} xpmodel allows")
        total += len(token)
        if total > _MAX_TOTAL_TOKEN_BYTES:
            raise UsageError(f"the tokens are {total:,}+ bytes, more than the "
                             f"{_MAX_TOTAL_TOKEN_BYTES:,} xpmodel allows")
        checked.append(bytes(token))
    return tuple(checked)


def _token_from_hex(k, text):
    try:
        return bytes.fromhex(text)
    except (TypeError, ValueError):
        raise UsageError(f"token {256 + k} is {quote(text, 40)}, not hex bytes") from None


def _made_ids(merges, token_bytes, metaspace):
    """For each merge, the id of the token it makes: the one whose bytes are its
    sides' bytes joined. Tokens must differ in bytes; with a metaspace a token
    may be one byte (a character's token, apart from the byte's fallback id),
    but merges join tokens, not fallback bytes."""
    first = 256 if metaspace else 0
    ids = {}
    for token_id in range(first, len(token_bytes)):
        other = ids.setdefault(token_bytes[token_id], token_id)
        if other != token_id:
            raise UsageError(f"ids {other} and {token_id} are both "
                             f"{quote(token_bytes[token_id], 40)}")
    made = []
    for rank, (left, right) in enumerate(merges):
        if not (_is_id_below(left, len(token_bytes)) and _is_id_below(right, len(token_bytes))):
            raise UsageError(f"merge {rank} {[left, right]} refers to an id that is not a token")
        if left < first or right < first:
            raise UsageError(f"merge {rank} {[left, right]} joins a fallback byte; "
                             f"metaspace merges join tokens")
        merged = token_bytes[left] + token_bytes[right]
        if merged not in ids:
            raise UsageError(f"merge {rank} {[left, right]} makes {quote(merged, 40)}, "
                             f"which is not a token")
        made.append(ids[merged])
    return made


def _sides_made_first(merges, made):
    """Whether every merge ranks after all the merges that make its sides."""
    last_made = {}   # id -> rank of the last merge that makes it
    for rank, new_id in enumerate(made):
        last_made[new_id] = rank
    return all(last_made.get(left, -1) < rank and last_made.get(right, -1) < rank
               for rank, (left, right) in enumerate(merges))


def _char_ids(token_bytes):
    """Character -> id of the token that is that one character, for the
    tokens after the 256 bytes."""
    ids = {}
    for token_id in range(256, len(token_bytes)):
        text = token_bytes[token_id].decode("utf-8", errors="ignore")
        if len(text) == 1 and text.encode("utf-8") == token_bytes[token_id]:
            ids[text] = token_id
    return ids


def _metaspace_splitter(metaspace, merges, token_bytes):
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


def _one_line(exc):
    return " ".join(str(exc).split())[:300]


def _is_id_below(value, limit):
    try:
        return 0 <= operator.index(value) < limit
    except TypeError:
        return False


# ----- merging one piece ----------------------------------------------------


def _merge_short(ids, merge_ids):
    """Apply merges to one piece's ids, lowest merge key (= rank) first.

    `merge_ids` maps a pair to its merge key (see _RANK_SHIFT). Each round
    merges every occurrence of the best pair, left to right: the same as
    `_merge_long` when no merge ranks before those that make its sides."""
    get = merge_ids.get
    while len(ids) > 1:
        best_key = None
        for pair in zip(ids, ids[1:]):
            key = get(pair)
            if key is not None and (best_key is None or key < best_key):
                best_key, best_pair = key, pair
        if best_key is None:
            break
        best_id = best_key & _ID_MASK
        left, right = best_pair
        merged = []
        i, n = 0, len(ids)
        while i < n:
            if ids[i] == left and i + 1 < n and ids[i + 1] == right:
                merged.append(best_id)
                i += 2
            else:
                merged.append(ids[i])
                i += 1
        ids = merged
    return ids


def _merge_long(ids, merge_ids):
    """Apply merges to one piece's ids in O(n log n), as Hugging Face's BPE does.

    Symbols form a linked list; a heap holds candidate merges keyed by
    (merge key, position), so the lowest rank applies first and equal ranks
    left to right, also when a merge creates a pair that ranks before it.
    Stale heap entries are skipped by checking the two symbols are still
    there and unchanged.
    """
    n = len(ids)
    symbols = list(ids)               # (n,) id at each position; -1 once merged away
    next_pos = list(range(1, n + 1))  # (n,) n means none
    prev_pos = list(range(-1, n - 1))  # (n,) -1 means none
    heap = []
    for pos in range(n - 1):
        key = merge_ids.get((symbols[pos], symbols[pos + 1]))
        if key is not None:
            heap.append((key, pos, symbols[pos], symbols[pos + 1]))
    heapq.heapify(heap)
    while heap:
        key, pos, left, right = heapq.heappop(heap)
        right_pos = next_pos[pos]
        if symbols[pos] != left or right_pos >= n or symbols[right_pos] != right:
            continue
        new_id = key & _ID_MASK
        symbols[pos] = new_id
        symbols[right_pos] = -1
        after = next_pos[right_pos]
        next_pos[pos] = after
        if after < n:
            prev_pos[after] = pos
            candidate = merge_ids.get((new_id, symbols[after]))
            if candidate is not None:
                heapq.heappush(heap, (candidate, pos, new_id, symbols[after]))
        before = prev_pos[pos]
        if before >= 0:
            candidate = merge_ids.get((symbols[before], new_id))
            if candidate is not None:
                heapq.heappush(heap, (candidate, before, symbols[before], new_id))
    return [s for s in symbols if s >= 0]


# ----- learning merges ------------------------------------------------------


def _learn_merges(word_counts, num_merges):
    """Learn up to `num_merges` merges from a Counter of piece str -> frequency.

    Each unique piece is a list of ids. `pair_counts` holds the weighted count
    of every adjacent pair, `pair_words` which pieces may hold it (entries go
    stale, and are skipped, once a piece no longer holds the pair). A merge
    rewrites only the pieces that hold its pair and adjusts the counts of the
    neighbouring pairs; a heap of (-count, left, right) with lazy invalidation
    finds the next best pair.

    A pair whose token would be longer than _MAX_TOKEN_BYTES is never merged,
    and learning stops before the tokens' bytes pass _MAX_TOTAL_TOKEN_BYTES:
    the tokenizer loads what it learns.
    """
    words = []  # unique pieces, each a list of ids
    freqs = []  # how often each piece occurs
    for piece, freq in word_counts.items():
        words.append(list(piece.encode("utf-8")))
        freqs.append(freq)
    pair_counts = defaultdict(int)
    pair_words = defaultdict(set)
    for index, word in enumerate(words):
        freq = freqs[index]
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            pair_words[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    known_bytes = {bytes([i]) for i in range(256)}
    token_bytes = [bytes([i]) for i in range(256)]
    total_bytes = 256
    merges = []
    while len(merges) < num_merges and heap:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative_count:
            continue  # stale: the count changed and a newer entry was pushed
        left, right = pair
        merged_bytes = token_bytes[left] + token_bytes[right]
        if merged_bytes in known_bytes or len(merged_bytes) > _MAX_TOKEN_BYTES:
            del pair_counts[pair]  # never merged: the bytes have an id, or are too long for one
            continue
        total_bytes += len(merged_bytes)
        if total_bytes > _MAX_TOTAL_TOKEN_BYTES:
            break
        new_id = 256 + len(merges)
        merges.append(pair)
        token_bytes.append(merged_bytes)
        known_bytes.add(merged_bytes)
        del pair_counts[pair]
        deltas = defaultdict(int)
        for index in pair_words.pop(pair):
            _merge_in_word(words, index, freqs[index], left, right, new_id, deltas, pair_words)
        deltas.pop(pair, None)
        for changed, delta in deltas.items():
            if delta:
                count = pair_counts[changed] + delta
                if count > 0:
                    pair_counts[changed] = count
                    heapq.heappush(heap, (-count, changed))
                else:
                    del pair_counts[changed]
    return merges


def _merge_in_word(words, index, freq, left, right, new_id, deltas, pair_words):
    """Replace every (left, right) in words[index] by new_id, left to right.

    Records the change in the counts of neighbouring pairs in `deltas` and
    indexes the new pairs. The left neighbour is read from the merged output,
    so back-to-back merges ("abab" -> "XX") count the pair between them once.
    """
    word = words[index]
    n = len(word)
    merged = []
    i = 0
    while i < n:
        if word[i] == left and i + 1 < n and word[i + 1] == right:
            if merged:
                before = merged[-1]
                deltas[(before, left)] -= freq
                deltas[(before, new_id)] += freq
                pair_words[(before, new_id)].add(index)
            if i + 2 < n:
                after = word[i + 2]
                deltas[(right, after)] -= freq
                deltas[(new_id, after)] += freq
                pair_words[(new_id, after)].add(index)
            merged.append(new_id)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    if len(merged) != n:
        words[index] = merged


# ----- worker processes for encode_chunks -----------------------------------

_worker_tokenizer = None  # set in each worker by _install_worker_tokenizer
_WORKER_TIMEOUT_S = 600   # one chunk (about a megabyte) takes well under a second


def _install_worker_tokenizer(document):
    global _worker_tokenizer
    _worker_tokenizer = BPETokenizer._from_document(json.loads(document))


def _encode_in_worker(text, continued):
    return _worker_tokenizer._encode_to_array(text, continued)
