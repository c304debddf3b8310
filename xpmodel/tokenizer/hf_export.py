"""Writing a BPETokenizer as a Hugging Face tokenizer directory (tokenizer.json,
vocab.json + merges.txt, tokenizer_config.json, special_tokens_map.json), in
the forms hf_forms.py describes."""
import contextlib
import os
from pathlib import Path

from ..atomic import atomic_writer, json_bytes
from ..errors import UsageError, quote
from ..folder_write import write_folder_atomically
from ..interrupts import deferred_signals
from .bpe import ENDOFTEXT, BPETokenizer
from .hf_forms import (BYTE_TOKENS, PREPEND, HF_PREPEND_SCHEMES, REPLACE_SPACES, SPACE, SPACE_DECODERS,
                       STRIP_DECODER, gpt2_byte_to_unicode)
from .pretokenize import GPT2_SPLIT_PATTERN


def hf_vocab(tokenizer):
    """Token string -> id for every id, specials included, in id order."""
    byte_to_char = gpt2_byte_to_unicode()
    special_ids = set(tokenizer.special_tokens.values())
    vocab = {}
    for token_id in range(tokenizer.vocab_size):
        raw = tokenizer.token_bytes(token_id)
        if token_id in special_ids:
            name = raw.decode("utf-8")
        elif tokenizer.metaspace is None:
            name = "".join(byte_to_char[b] for b in raw)
        elif token_id < 256:
            name = BYTE_TOKENS[token_id]
        else:
            try:
                name = raw.decode("utf-8").replace(" ", SPACE)
            except UnicodeDecodeError:
                raise UsageError(f"id {token_id} is {quote(raw, 100)}, not text; a SentencePiece vocab "
                                 f"needs text tokens") from None
        if name in vocab:
            raise UsageError(f"ids {vocab[name]} and {token_id} are both {quote(name, 100)}; "
                             f"a Hugging Face vocab needs distinct token strings")
        vocab[name] = token_id
    return vocab


def default_special_ids(tokenizer):
    """The bos_token_id and eos_token_id an export names without others: both
    "<|endoftext|>", as GPT-2's (None when the tokenizer lacks it)."""
    return {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}


def first_eos_id(special_ids):
    """The one eos id of `special_ids` that a tokenizer's eos_token and a pad id
    can hold: eos_token_id, or the first of a list."""
    eos = special_ids["eos_token_id"]
    return eos[0] if isinstance(eos, list) else eos


# Every file a Hugging Face tokenizer export may write.
TOKENIZER_FILES = frozenset({"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                             "special_tokens_map.json"})


def export_tokenizer_hf(tokenizer, directory, model_max_length=None, special_ids=None,
                        overwrite=False):
    """Write the Hugging Face files for `tokenizer` into `directory` (created
    if needed; a file of the same name already there is refused unless
    overwrite); bos_token and eos_token are the tokens of special_ids (see
    default_special_ids).

    A new directory is written as a whole (folder_write.py), so that a kill
    leaves all the files or none; into an existing one, which keeps its
    identity, permissions and other files, all the files are written aside,
    then renamed one by one."""
    files = hf_tokenizer_files(tokenizer, model_max_length, special_ids)
    directory = Path(directory)
    present = [name for name in files if os.path.lexists(directory / name)]
    if present and not overwrite:
        raise UsageError(f"{directory}: {present[0]} is already there; pass overwrite=True to "
                         f"replace the Hugging Face tokenizer files in it")
    if directory.is_symlink():
        directory = directory.resolve()
    if os.path.lexists(directory):
        write_tokenizer_files(directory, files)
    else:
        write_folder_atomically(directory, lambda folder: write_tokenizer_files(folder, files),
                                TOKENIZER_FILES)


def write_tokenizer_files(folder, files):
    """Write `files` ({name: JSON document or bytes}, hf_tokenizer_files) into
    `folder`: every file's data first, on disk, then the renames, which need
    no space, so that a full disk leaves the folder's files as they were; a
    signal meanwhile acts once they are all written (interrupts.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    with deferred_signals(), contextlib.ExitStack() as writes:   # no Ctrl-C between renames
        for name, content in files.items():
            data = content if isinstance(content, bytes) else json_bytes(content)
            file = writes.enter_context(atomic_writer(folder / name))
            file.write(data)
            file.sync()


def hf_tokenizer_files(tokenizer, model_max_length=None, special_ids=None):
    """{file name: JSON document, or bytes}: the Hugging Face tokenizer files
    of `tokenizer` (see export_tokenizer_hf)."""
    if not isinstance(tokenizer, BPETokenizer):
        raise TypeError(f"export_tokenizer_hf takes a BPETokenizer, got {type(tokenizer).__name__}")
    vocab = hf_vocab(tokenizer)
    names = list(vocab)  # id -> token string, as ids run 0.. in order
    merges = [f"{names[left]} {names[right]}" for left, right in tokenizer.merges]
    specials = tokenizer.special_tokens

    byte_level = {"type": "ByteLevel", "add_prefix_space": False,
                  "trim_offsets": True, "use_regex": True}
    gpt2_split = tokenizer.split_pattern == GPT2_SPLIT_PATTERN
    normalizer = {"type": "NFC"} if tokenizer.normalizer == "nfc" else None
    pre_tokenizer = decoder = byte_level
    if tokenizer.metaspace is not None:
        normalizer, pre_tokenizer, decoder = _metaspace_parts(tokenizer.metaspace)
    elif not gpt2_split:   # as Llama 3 and Qwen2 write theirs
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
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": decoder,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": tokenizer.metaspace is not None,
                  "ignore_merges": tokenizer.ignore_merges,
                  "vocab": vocab, "merges": merges},
    }
    special_map = _special_tokens_map(names, specials, special_ids or default_special_ids(tokenizer))
    # GPT2TokenizerFast would split as GPT-2 whatever tokenizer.json says; the
    # generic class reads tokenizer.json as it is, as Llama 3's config names it.
    tokenizer_class = "GPT2TokenizerFast" if gpt2_split else "PreTrainedTokenizerFast"
    config = {"tokenizer_class": tokenizer_class, "add_prefix_space": False,
              "add_bos_token": False, "clean_up_tokenization_spaces": False, **special_map}
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)

    files = {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config,
             "special_tokens_map.json": special_map}
    if tokenizer.metaspace is None:   # GPT2Tokenizer's files mean byte-level BPE
        files["vocab.json"] = vocab
        files["merges.txt"] = ("#version: 0.2\n" + "".join(line + "\n" for line in merges)).encode("utf-8")
    return files


def _special_tokens_map(names, specials, special_ids):
    """special_tokens_map.json: the tokens of bos and eos among `names` (id ->
    token string), and "<|endoftext|>" as unk_token, as GPT-2's."""
    special_map = {}
    for key, token_id in (("bos_token", special_ids["bos_token_id"]),
                          ("eos_token", first_eos_id(special_ids))):
        if token_id is not None:
            special_map[key] = names[token_id]
    if ENDOFTEXT in specials:
        special_map["unk_token"] = ENDOFTEXT
    return special_map


def _metaspace_parts(metaspace):
    """(normalizer, pre_tokenizer, decoder) of tokenizer.json for a Metaspace."""
    normalizer = pre_tokenizer = None
    if metaspace.prepend == "always":   # as Llama 2 writes it
        normalizer = {"type": "Sequence", "normalizers": [PREPEND, REPLACE_SPACES]}
        if metaspace.split:
            pre_tokenizer = {"type": "Metaspace", "replacement": SPACE,
                             "prepend_scheme": "never", "split": True}
    else:
        scheme = next(k for k, v in HF_PREPEND_SCHEMES.items() if v == metaspace.prepend)
        pre_tokenizer = {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": scheme,
                         "split": metaspace.split}
    strip = [STRIP_DECODER] if metaspace.strip_decoded else []
    return normalizer, pre_tokenizer, {"type": "Sequence", "decoders": SPACE_DECODERS + strip}
