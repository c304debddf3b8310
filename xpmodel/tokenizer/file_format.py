"""xpmodel's tokenizer file: one readable JSON document, written from a
tokenizer's parts and read back into them; nothing is pickled.

The document holds "format", "version", "pre_tokenizer" ("gpt2", "split" with
a "split_pattern", or "metaspace" with its fields), the "normalizer" and
"ignore_merges" when set, "special_tokens", "merges" one per line and, when
the merges do not make exactly the tokens in order, "tokens" as hex, one
per line. A tokenizer that uses none of the options is written, and so
fingerprinted, in version 1.
"""
import dataclasses
import json

from ..errors import DataError, UsageError, one_line, quote
from ..files import read_json
from .metaspace import Metaspace
from .pretokenize import GPT2_SPLIT_PATTERN

FILE_FORMAT = "xpmodel-bpe-tokenizer"
FILE_VERSION = 1    # what a tokenizer with none of the options writes
FILE_VERSION_OPTIONS = 2   # with any option, so that an older xpmodel refuses the file
# A tokenizer file, xpmodel's or Hugging Face's, is read whole up to this size:
# GPT-2's tokenizer.json is 1.4 MB, a 256k-token one about 35 MB.
MAX_FILE_BYTES = 64 << 20


def tokenizer_json(merges, special_tokens, split_pattern, normalizer, ignore_merges, tokens,
                   metaspace):
    """The tokenizer as a JSON document (str): one merge per line, readable and diffable.

    The arguments are BPETokenizer's, except that `tokens` is None when the
    merges make exactly the tokens, in order."""
    header = {"format": FILE_FORMAT, "version": FILE_VERSION, "pre_tokenizer": "gpt2"}
    if (split_pattern != GPT2_SPLIT_PATTERN or normalizer is not None or ignore_merges
            or tokens is not None):
        header["version"] = FILE_VERSION_OPTIONS
        if normalizer is not None:
            header["normalizer"] = normalizer
        if metaspace is not None:
            header.update(pre_tokenizer="metaspace", metaspace=dataclasses.asdict(metaspace))
        elif split_pattern != GPT2_SPLIT_PATTERN:
            header.update(pre_tokenizer="split", split_pattern=split_pattern)
        if ignore_merges:
            header["ignore_merges"] = True
    header = json.dumps({**header, "special_tokens": list(special_tokens)})
    merge_lines = ",\n".join(f"  [{a}, {b}]" for a, b in merges)
    token_lines = ""
    if tokens is not None:   # hex, one token per line
        token_lines = ', "tokens": [\n' + ",\n".join(f'  "{t.hex()}"' for t in tokens) + "\n]"
    return header[:-1] + ', "merges": [\n' + merge_lines + "\n]" + token_lines + "}\n"


def read_tokenizer_file(path, build):
    """`build(document)` of the tokenizer file at `path`. Raises DataError naming
    the file if it is missing, truncated, corrupt or not an xpmodel tokenizer."""
    document = read_json(path, MAX_FILE_BYTES, DataError, "tokenizer file")
    try:
        return build(document)
    except (UsageError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: tokenizer file is not usable: {one_line(exc)}") from None


def tokenizer_arguments(document):
    """BPETokenizer's arguments, by name, from a tokenizer file's parsed JSON."""
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
    return dict(merges=merges, special_tokens=specials, **options)


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


def _token_from_hex(k, text):
    try:
        return bytes.fromhex(text)
    except (TypeError, ValueError):
        raise UsageError(f"token {256 + k} is {quote(text, 40)}, not hex bytes") from None
