"""A run's data: its tokenizer and its train/validation token streams.

The BPE tokenizer for a corpus is trained once and cached beside the token
files, keyed by the corpus fingerprint, the vocabulary size and its special
tokens; the byte tokenizer needs no training. Both reserve "<|mask|>" after
"<|endoftext|>" when data.token_dropout_mode is mask. A tokenizer file
(data.tokenizer=PATH, as `xpmodel tokenizer train` writes) is read as it is.
Token files come from `data.prepare`, which caches them too, so an unchanged
corpus is never tokenized twice.
"""
import hashlib
import itertools
from contextlib import nullcontext

from ..atomic import remove_stale_temporaries
from ..config.sections import names_tokenizer_file
from ..errors import DataError, UsageError
from ..files import existing_file
from ..tokenizer.bpe import ENDOFTEXT, MASK, BPETokenizer
from ..tokenizer.learning import vocab_size_note
from .batching import split_tokens
from .prepare import CACHED_TOKENIZER, cache_root, prepare
from .progress import tokenizing_progress
from .reading import iter_text_pieces
from .sources import corpus_fingerprint, resolve_source
from .tokenfile import read_token_file

# A BPE vocabulary is learned from at most this much text; beyond it the
# merge statistics barely change and training time keeps growing.
_TOKENIZER_TRAIN_BYTES = 64 * 2**20
# Below this much text, starting a pool of encoding processes costs more than
# it saves; the corpus is encoded in this process.
_PARALLEL_ENCODING_BYTES = 8 * 2**20


def run_cache_root(data_config):
    """The run's cache folder (data.cache_dir, else the default; see prepare.cache_root)."""
    return cache_root(data_config.cache_dir)


def build_tokenizer(data_config, say=print):
    """The run's tokenizer: bytes, BPE trained on (the start of) the corpus, or
    the tokenizer file data.tokenizer names."""
    specials = special_tokens(data_config)
    if data_config.tokenizer == "byte":
        return BPETokenizer(special_tokens=specials)
    if names_tokenizer_file(data_config.tokenizer):
        return _tokenizer_file(data_config.tokenizer, specials)
    source = resolve_source(data_config.source)
    facts = f"bpe-{data_config.vocab_size}\0{corpus_fingerprint(source)}"
    if specials != (ENDOFTEXT,):
        facts += "\0" + "\0".join(specials)
    key = hashlib.sha256(facts.encode()).hexdigest()[:24]
    path = run_cache_root(data_config) / "tokenizers" / f"bpe-{data_config.vocab_size}-{key}.json"
    remove_stale_temporaries(path.parent, CACHED_TOKENIZER.match)
    tokenizer = _cached_tokenizer(path)
    if tokenizer is None:
        tokenizer = _train_bpe(source, data_config, specials, say)
        tokenizer.save(path)
    note = vocab_size_note(tokenizer, data_config.vocab_size)
    if note is not None:
        say(f"note: the BPE tokenizer has {note}; the model's vocabulary is sized to its ids")
    return tokenizer


def _cached_tokenizer(path):
    """The tokenizer cached at `path`, or None (none there, or damaged: removed)."""
    if path.exists():
        try:
            return BPETokenizer.load(path)
        except DataError:
            path.unlink(missing_ok=True)   # a damaged cache entry is rebuilt
    return None


def _train_bpe(source, data_config, specials, say):
    pieces = iter_text_pieces(source)
    # The corpus's first piece is read (and checked to be text) before training
    # is announced, so a binary or non-UTF-8 source fails with nothing promised.
    first = list(itertools.islice(pieces, 1))
    say(f"training a {data_config.vocab_size}-token BPE tokenizer on {data_config.source} ...")
    return BPETokenizer.train(_leading_texts(itertools.chain(first, pieces), _TOKENIZER_TRAIN_BYTES),
                              data_config.vocab_size, special_tokens=specials)


def _tokenizer_file(path, specials):
    """The tokenizer in the file `path` (data.tokenizer), as it is: it must
    reserve <|mask|> when the run masks. The run saves it as its own tokenizer,
    and its fingerprint keys the token cache, so an edited file tokenizes afresh."""
    existing_file(path, "data.tokenizer", "tokenizer file")   # names nothing: exit 2, as for data.source
    try:
        tokenizer = BPETokenizer.load(path)
    except DataError as exc:
        raise DataError(f"data.tokenizer {exc}") from None
    if MASK in specials and tokenizer.mask_id is None:
        raise UsageError(f"data.tokenizer {path}: the tokenizer does not reserve {MASK}, which "
                         f"data.token_dropout_mode=mask needs (xpmodel tokenizer train reserves "
                         f"only {ENDOFTEXT}): use data.token_dropout_mode=random, or "
                         f"data.tokenizer=bpe to learn one that reserves it")
    return tokenizer


def special_tokens(data_config):
    """The special tokens a new run's tokenizer reserves: end-of-text, and the
    mask id when token dropout masks (counted in data.vocab_size for BPE)."""
    return (ENDOFTEXT, MASK) if data_config.token_dropout_mode == "mask" else (ENDOFTEXT,)


def _leading_texts(pieces, budget):
    """The documents of a corpus's text pieces (reading.py), whole, until
    `budget` characters: counted piece by piece, so one huge document is read
    only up to the budget."""
    used, parts = 0, []
    for piece in pieces:
        if piece.first_in_document and parts:
            yield "".join(parts)
            parts = []
        text = piece.text[:budget - used]
        parts.append(text)
        used += len(text)
        if used >= budget:
            break
    if parts:
        yield "".join(parts)


def encoding_workers(source):
    """Processes to encode `source` with: one for a small corpus, else all cores."""
    return 1 if resolve_source(source).total_bytes() < _PARALLEL_ENCODING_BYTES else None


def load_tokens(data_config, tokenizer, block_size, show_progress=True, corpus=None):
    """(train, val) token arrays for the run's corpus, read from the cached token
    file. corpus: data_config.source already resolved (a sources.Source), else
    it is resolved here."""
    cache_dir = run_cache_root(data_config) / "tokens"
    source = resolve_source(data_config.source if corpus is None else corpus)
    workers = encoding_workers(source)
    with tokenizing_progress() if show_progress else nullcontext() as progress:
        path = prepare(source, tokenizer, cache_dir=cache_dir, workers=workers, progress=progress)
    tokens = read_token_file(path, expected_fingerprint=tokenizer.fingerprint(),
                             vocab_size=tokenizer.vocab_size)
    return split_tokens(tokens, data_config.val_fraction, block_size=block_size,
                        source=str(data_config.source))
