"""Hugging Face interop: GPT-2 and Llama model directories out of and into xpmodel.

export_hf(model, tokenizer, out_dir, special_ids=None)
    writes what `AutoModelForCausalLM.from_pretrained` and
    `AutoTokenizer.from_pretrained` read: config.json, model.safetensors
    (float32), generation_config.json and the tokenizer files. A model with
    GPT-2's options becomes a GPT2LMHeadModel, one with Llama's (rmsnorm,
    rope, swiglu, no QK-norm) a LlamaForCausalLM; any other is refused,
    naming every option the closer of the two does not hold.
import_hf(hf_dir) -> (GPTConfig, arrays, tokenizer)
    reads a local GPT-2 or Llama directory (one safetensors file or shards)
    into xpmodel's parameter names, ready for `GPT.load_state_arrays`.
hf_special_ids(hf_dir) -> (special ids, tokenizer)
    config.json's bos_token_id and eos_token_id, in the tokenizer's ids: what
    export_hf takes as special_ids, so that a round trip keeps them (without
    them an export names "<|endoftext|>" for both).
import_hf_with_special_ids(hf_dir) -> (GPTConfig, arrays, tokenizer, special ids)
    both of the above from one reading of the directory.

Each family (gpt2.py, llama.py) says how config.json maps to a
GPTConfig and which Hugging Face tensors make each xpmodel tensor; this file
does the reading, checking and writing for both.

Vocab padding: a model whose vocab is padded past its tokenizer's (50304 rows
for GPT-2's 50257 ids, as llm.c and nanoGPT train) is exported with every
row, and config.vocab_size is the padded size: Hugging Face needs it to equal
the embedding's rows, the tokenizer never produces a padding id, and the
round trip is exact. An import likewise keeps every row the file has.

Token ids: Hugging Face's GPT-2 numbers its 256 byte tokens in the order of
its bytes-to-unicode table, xpmodel by byte value (see tokenizer/hf_forms.py). An
import relabels the tokenizer to xpmodel's order and permutes the rows of the
embedding (and of an untied head) to match, so the imported model scores
every text exactly as the original did; only the ids of byte tokens differ
(and an export writes xpmodel's order).

An export is written into a temporary folder beside out_dir and renamed into
place, so out_dir holds a whole export or none; a failure (a full disk)
leaves it as it was. Every export holds EXPORT_MARKER, so a later export
replaces it without asking; a directory of the same file names without the
marker (a `save_pretrained` folder, say) is replaced only with overwrite.
Nothing is unpickled: a directory with only pytorch_model.bin is refused.
"""
import numbers
import os
import re
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import numpy
from safetensors.numpy import save as safetensors_bytes

from ..atomic import atomic_write_bytes, atomic_write_json
from ..errors import DataError, UsageError, one_line, quote, setting_text
from ..files import folder_problem, read_json
from ..folder_write import write_folder_atomically
from ..model.config import GPTConfig
from ..model.gpt import check_model
from ..model.params import parameter_shapes
from ..tokenizer.hf_export import (TOKENIZER_FILES, default_special_ids, first_eos_id,
                                   hf_tokenizer_files, hf_vocab, write_tokenizer_files)
from ..tokenizer.bpe import BPETokenizer
from ..tokenizer.hf_import import read_hf_tokenizer
from . import gpt2, llama
from .safetensors_file import FLOAT_DTYPES, SafetensorsFile

FAMILIES = (gpt2, llama)
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Marks a directory as an xpmodel export; Hugging Face's loaders ignore it.
EXPORT_MARKER = "xpmodel_export.json"
# Files an export writes; an existing directory holding anything else is refused.
EXPORT_FILES = TOKENIZER_FILES | {"config.json", WEIGHTS_FILE, "generation_config.json",
                                  EXPORT_MARKER}
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_OTHER_FORMATS = ("tf_model.h5", "flax_model.msgpack", "model.ckpt.index")
MAX_JSON_BYTES = 16 * 2**20   # a config.json or shard index is a few kilobytes
# config.json's ids of the tokens that begin and end a text
SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id")


# ----- export ---------------------------------------------------------------


def export_hf(model, tokenizer, out_dir, overwrite=False, special_ids=None):
    """Write `model` (a GPT) and `tokenizer` (a BPETokenizer) as a Hugging Face
    directory; returns the architecture written ("GPT2LMHeadModel" or
    "LlamaForCausalLM"). `out_dir` is created if needed; an existing one must
    be empty or an earlier export (which is replaced); with overwrite, it may
    also be another directory holding only files an export writes.
    special_ids: {"bos_token_id", "eos_token_id"} in the tokenizer's ids (as
    hf_special_ids gives them); by default "<|endoftext|>"'s for both."""
    check_model(model, "export_hf")
    if not isinstance(tokenizer, BPETokenizer):
        raise TypeError(f"export_hf takes a BPETokenizer, got {type(tokenizer).__name__}")
    cfg = model.config
    family = export_family(cfg)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab "
                         f"has only {cfg.vocab_size} rows")
    hf_vocab(tokenizer)   # refuses a tokenizer Hugging Face cannot hold, before writing
    if special_ids is not None and (not isinstance(special_ids, dict)
                                    or not set(special_ids) <= set(SPECIAL_ID_KEYS)):
        raise UsageError(f"special_ids must be a dict of {' and/or '.join(SPECIAL_ID_KEYS)}, got "
                         f"{quote(special_ids, 100)}")
    ids = default_special_ids(tokenizer) if special_ids is None else \
        check_special_ids(special_ids, tokenizer.vocab_size, UsageError, "special_ids")
    out_dir = check_export_target(out_dir, overwrite)

    tensors = to_hf_tensors(family.tensor_table(cfg), model.state_arrays())

    def write(folder):
        _write_safetensors(folder / WEIGHTS_FILE, tensors)
        atomic_write_json(folder / "config.json", family.hf_config(cfg, ids))
        atomic_write_json(folder / "generation_config.json",
                    {**ids, "pad_token_id": first_eos_id(ids)})
        write_tokenizer_files(folder, hf_tokenizer_files(tokenizer, cfg.block_size, ids))
        atomic_write_json(folder / EXPORT_MARKER, {"written_by": "xpmodel export-hf",
                                             "architecture": family.ARCHITECTURE})
    write_folder_atomically(out_dir, write, EXPORT_FILES)
    return family.ARCHITECTURE


def check_export_target(out_dir, overwrite, given_as="out_dir"):
    """The folder to export into (a link to one resolved), or a UsageError
    naming it (as `given_as`): a folder that cannot be made where it is
    asked for, a file, a folder holding files an export does not write, or
    one holding a model directory xpmodel did not export (unless overwrite)."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        out_dir = out_dir.resolve()
    if not out_dir.exists():
        problem = folder_problem(out_dir)
        if problem is not None:
            raise UsageError(f"{given_as} {out_dir}: {problem}; export into another folder")
        return out_dir
    if not out_dir.is_dir():
        raise UsageError(f"{given_as} {out_dir}: exists and is not a directory")
    names = sorted(p.name for p in out_dir.iterdir())
    others = [name for name in names if name not in EXPORT_FILES]
    if others:
        raise UsageError(f"{given_as} {out_dir}: already holds files an export does not write "
                         f"({', '.join(others[:5])}); export into a new or empty directory")
    if names and EXPORT_MARKER not in names and not overwrite:
        raise UsageError(f"{given_as} {out_dir}: holds a model directory xpmodel did not export "
                         f"(no {EXPORT_MARKER}); export elsewhere, or pass --overwrite to "
                         f"replace it")
    return out_dir


def export_family(config):
    """The family (gpt2 or llama) whose architecture holds `config`
    exactly; otherwise a UsageError naming every option that the family it
    is closest to does not hold, and what that family has instead."""
    found = [(family.mismatches(config), family) for family in FAMILIES]
    for mismatched, family in found:
        if not mismatched:
            return family
    mismatched, family = min(found, key=lambda pair: len(pair[0]))
    options = ", ".join(f"model.{key} {setting_text(value)}" for key, value, _ in mismatched)
    *others, last = [has for _, _, has in mismatched]
    has = f"{', '.join(others)} and {last}" if others else last
    raise UsageError(f"{options} cannot be exported as {family.ARCHITECTURE}, which has {has} "
                     f"(Hugging Face export takes GPT-2's options as {gpt2.ARCHITECTURE}, or "
                     f"norm rmsnorm, position rope, mlp swiglu and qk_norm false as "
                     f"{llama.ARCHITECTURE})")


def to_hf_tensors(table, arrays):
    """Hugging Face name -> float32 array, from xpmodel's name -> array and a family's table."""
    tensors = {}
    for name, parts, transposed in table:
        value = numpy.asarray(arrays[name], dtype=numpy.float32)
        pieces = numpy.split(value, numpy.cumsum([width for _, width in parts])[:-1], axis=-1)
        for (hf_name, _), piece in zip(parts, pieces):
            tensors[hf_name] = numpy.ascontiguousarray(piece.T if transposed else piece)
    return tensors


# ----- import ---------------------------------------------------------------


def import_hf(hf_dir):
    """Read a local Hugging Face GPT-2 or Llama directory.

    Returns (config, arrays, tokenizer): a GPTConfig, name -> float32 NumPy
    array in xpmodel's names and shapes, and a BPETokenizer. The embedding
    keeps every row of the file (config.vocab_size may exceed
    tokenizer.vocab_size). Raises UsageError naming what is not supported
    (another architecture, a config feature xpmodel does not compute, pickled
    weights) and DataError for unreadable, oversized or inconsistent files.
    """
    return _read_model(hf_dir)[:3]


def import_hf_with_special_ids(hf_dir):
    """import_hf's (config, arrays, tokenizer) and hf_special_ids' ids, from one
    reading of the directory."""
    config, arrays, tokenizer, hf_cfg, hf_ids = _read_model(hf_dir)
    return config, arrays, tokenizer, _special_ids(hf_cfg, hf_ids, Path(hf_dir) / "config.json")


def _read_model(hf_dir):
    """import_hf's work: (config, arrays, tokenizer, config.json's document,
    the Hugging Face id of each of the tokenizer's ids)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise UsageError(f"{hf_dir} is not a directory")
    where = hf_dir / "config.json"
    if not os.path.lexists(where):
        raise UsageError(f"{hf_dir} has no config.json; it is not a Hugging Face model directory")
    hf_cfg = _read_json(where)
    family = import_family(hf_cfg, where)
    config = _gpt_config(family, hf_cfg, where)
    tokenizer, hf_ids = read_hf_tokenizer(hf_dir)   # hf_ids: (tokenizer.vocab_size,)
    if tokenizer.vocab_size > config.vocab_size:
        raise DataError(f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} ids but the "
                        f"model's vocab has only {config.vocab_size} rows")
    with ExitStack() as files:    # each file read through one descriptor, closed at the end
        sources = [(files.enter_context(_weights_file(path)), keys) for path, keys in _weight_paths(hf_dir)]
        _check_layers(config, family, sources, hf_dir)    # before anything sized by n_layer
        table = family.tensor_table(config)
        tensors = _read_tensors(hf_dir, sources, family, _hf_shapes(table, config),
                                config.tie_embeddings)
    arrays = from_hf_tensors(table, tensors)
    if not numpy.array_equal(hf_ids, numpy.arange(len(hf_ids))):
        for name in ("wte.weight", "lm_head.weight"):   # (V, C); rows past the tokenizer's stay
            if name in arrays:
                rows = arrays[name]
                rows[:len(hf_ids)] = rows[hf_ids]      # row i now belongs to xpmodel's token i
    return config, arrays, tokenizer, hf_cfg, hf_ids


def hf_special_ids(hf_dir):
    """(special ids, tokenizer): the bos_token_id and eos_token_id of a Hugging
    Face directory's config.json, in the ids of the tokenizer import_hf reads
    from it (which may number tokens otherwise than the directory does). Each
    is an id or None, eos_token_id also a list of ids (some models stop at
    several)."""
    where = Path(hf_dir) / "config.json"
    hf_cfg = _read_json(where)
    tokenizer, hf_ids = read_hf_tokenizer(hf_dir)
    return _special_ids(hf_cfg, hf_ids, where), tokenizer


def _special_ids(hf_cfg, hf_ids, where):
    """config.json's bos_token_id and eos_token_id, checked, in xpmodel's ids."""
    given = {key: hf_cfg.get(key) for key in SPECIAL_ID_KEYS}
    ids = check_special_ids(given, len(hf_ids), DataError, where)
    ours = numpy.argsort(hf_ids)   # Hugging Face id -> xpmodel id
    return {key: _renumbered(value, ours) for key, value in ids.items()}


def _renumbered(value, ours):
    """A special id, a list of them or None, with each id i made ours[i]."""
    if isinstance(value, list):
        return [int(ours[i]) for i in value]
    return None if value is None else int(ours[value])


def check_special_ids(ids, vocab_size, error, where):
    """{"bos_token_id", "eos_token_id"} of `ids`, each None or a token id below
    vocab_size (eos_token_id also a non-empty list of them); else `error`."""
    checked = {}
    for key in SPECIAL_ID_KEYS:
        value = ids.get(key)
        listed = value if key == "eos_token_id" and isinstance(value, list) and value else [value]
        if value is not None and not all(_is_integer(i) and 0 <= i < vocab_size for i in listed):
            raise error(f"{where}: {key} {quote(value, 100)} is not a token id of the tokenizer (0 to "
                        f"{vocab_size - 1}){', a list of them' if key == 'eos_token_id' else ''} "
                        f"or null")
        checked[key] = [int(i) for i in value] if isinstance(value, list) else \
            (None if value is None else int(value))
    return checked


def _is_integer(value):
    """Whether value is an integer (a NumPy one too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def import_family(hf_cfg, where="config.json"):
    """The family (gpt2 or llama) of a config.json document, by its model_type."""
    if not isinstance(hf_cfg, dict):
        raise DataError(f"{where}: not a JSON object")
    model_type = hf_cfg.get("model_type")
    architectures = hf_cfg.get("architectures") or []
    if not isinstance(architectures, list):
        raise DataError(f"{where}: architectures must be a list, got {quote(architectures, 100)}")
    family = next((f for f in FAMILIES if f.MODEL_TYPE == model_type), None)
    others = [a for a in architectures if family is None or a not in family.ARCHITECTURES]
    if family is None or others:
        if family is None:   # the architecture may be a known one (Mistral's is LlamaForCausalLM)
            name = f"model_type {quote(model_type, 100)}" + (
                f" ({one_line(', '.join(map(str, architectures)), 100)})" if architectures else "")
        else:
            name = f"{one_line(others[0], 100)} with model_type {quote(model_type, 100)}"
        raise UsageError(f"{where}: {name} is not supported; xpmodel imports GPT-2 "
                         f"(model_type \"gpt2\", {' or '.join(gpt2.ARCHITECTURES)}) and Llama "
                         f"(model_type \"llama\", {llama.ARCHITECTURE})")
    return family


def _gpt_config(family, hf_cfg, where):
    """The family's GPTConfig fields as a GPTConfig; a bad value is named by its config.json key."""
    _check_integer_sizes(hf_cfg, where)
    try:
        return GPTConfig(**family.config_fields(hf_cfg, where))
    except OverflowError as exc:   # a number no check above foresaw
        raise DataError(f"{where}: a value is too large: {one_line(exc, 200)}") from None
    except ValueError as exc:
        if isinstance(exc, UsageError):
            raise
        message = str(exc).replace("GPTConfig.", "").replace("GPTConfig: ", "")
        message = re.sub(r"\w+", lambda word: family.HF_KEYS.get(word[0], word[0]), message)
        raise DataError(f"{where}: {message}") from None


def _check_integer_sizes(hf_cfg, where):
    """Refuse an integer of more than 63 bits anywhere in config.json: none is
    meant, and a field that wants a float could not even convert it (JSON
    allows integers of thousands of digits). Walked with a stack, not
    recursion (the nesting may be as deep as the JSON parser allowed), each
    value's place kept as (place of its parent, its key), spelled out only
    for the message."""
    pending = [(None, hf_cfg)]
    while pending:
        place, value = pending.pop()
        if isinstance(value, dict):
            pending.extend(((place, f".{name}"), item) for name, item in value.items())
        elif isinstance(value, list):
            pending.extend(((place, f"[{index}]"), item) for index, item in enumerate(value))
        elif type(value) is int and value.bit_length() > 63:
            names = []
            while place is not None:
                place, name = place
                names.append(name)
            raise DataError(f"{where}: {quote(''.join(reversed(names))[1:], 100)} is an integer "
                            f"of {value.bit_length():,} bits, beyond the signed 64-bit range "
                            f"xpmodel reads")


def _check_layers(config, family, sources, hf_dir):
    """Refuse weights whose layers are not config.json's before anything is
    built per layer: the stored names must number layers 0 .. n_layer - 1,
    each holding as many tensors as a layer has (the first that holds fewer
    is refused naming what it lacks). The names and shapes then built for
    n_layer layers are no more than the files hold: a crafted
    num_hidden_layers of 10**9, or of 200,000 over as many empty tensors, is
    refused at once."""
    head, tail = family.LAYER_PREFIX.split("{}")
    numbered = re.compile(re.escape(head) + r"(0|[1-9][0-9]{0,17})" + re.escape(tail))
    layers = {}   # layer number -> the names stored under it
    for source, _ in sources:
        for key in source.names:
            name = family.canonical(key)
            match = numbered.match(name)
            if match and not key.endswith(family.IGNORED_SUFFIXES):
                layers.setdefault(int(match[1]), set()).add(name)
    n_layer = config.n_layer
    if len(layers) != n_layer or max(layers) != n_layer - 1:
        key = family.HF_KEYS.get("n_layer", "n_layer")
        raise DataError(f"{hf_dir / 'config.json'}: {key} is {n_layer:,} but the weights hold "
                        f"{_layers_held(layers)}")
    first = family.LAYER_PREFIX.format(0)
    one_layer = family.tensor_table(replace(config, n_layer=1))
    layer_names = [hf_name[len(first):] for _, parts, _ in one_layer
                   for hf_name, _ in parts if hf_name.startswith(first)]
    for number in sorted(layers):
        if len(layers[number]) < len(layer_names):
            prefix = family.LAYER_PREFIX.format(number)
            raise DataError(_lacking(hf_dir, [prefix + name for name in layer_names
                                              if prefix + name not in layers[number]]))


def _layers_held(layers):
    """The layer numbers of the weights, for a message: "layers 0..5", "no
    layers", or "3 layers numbered up to 5 (none numbered 1)"."""
    if not layers:
        return "no layers"
    numbers = sorted(layers)
    gap = next((expected for expected, number in enumerate(numbers) if number != expected), None)
    if gap is None:
        return "layer 0" if len(numbers) == 1 else f"layers 0..{numbers[-1]}"
    return f"{len(numbers):,} layers numbered up to {numbers[-1]} (none numbered {gap})"


def _lacking(hf_dir, missing):
    """The message for weights that lack the tensors `missing`."""
    more = " ..." if len(missing) > 5 else ""
    return f"{hf_dir}: the weights lack {', '.join(missing[:5])}{more}"


def _hf_shapes(table, config):
    """Hugging Face name -> shape, for a family's table."""
    ours = dict(parameter_shapes(config))
    shapes = {}
    for name, parts, transposed in table:
        for hf_name, width in parts:
            shape = ours[name]
            shapes[hf_name] = (width, shape[0]) if transposed else (*shape[:-1], width)
    return shapes


def _read_tensors(hf_dir, sources, family, shapes, tied):
    """Hugging Face name -> float32 array for every name of `shapes`, read from
    the directory's safetensors. A shard may hold only the tensors its index
    lists. With a tied head, a stored lm_head.weight must equal the embedding
    and is dropped."""
    embedding = family.EMBEDDING
    tensors, unexpected = {}, []
    for source, listed in sources:
        for key in source.names:
            if key.endswith(family.IGNORED_SUFFIXES):
                continue
            if listed is not None and key not in listed:
                raise DataError(f"{source.path}: holds {one_line(key, 100)}, which "
                                f"{WEIGHTS_INDEX} does not list in this shard")
            name = family.canonical(key)
            if name in shapes:
                shape = shapes[name]
            elif name == "lm_head.weight" and tied:
                shape = shapes[embedding]
            else:
                unexpected.append(one_line(key, 100))
                continue
            if name in tensors:
                raise DataError(f"{hf_dir}: {name} is stored twice (as {one_line(key, 100)} too)")
            if source.shape(key) != tuple(shape):
                raise DataError(f"{source.path}: {key} has shape {list(source.shape(key))}; "
                                f"config.json needs {list(shape)}")
            if source.dtype(key) not in FLOAT_DTYPES:
                raise UsageError(f"{source.path}: {key} is {source.dtype(key)}; xpmodel reads "
                                 f"float tensors ({', '.join(FLOAT_DTYPES)})")
            value = source.read(key).astype(numpy.float32)
            if not numpy.isfinite(value).all():
                raise DataError(f"{source.path}: {key} holds NaN or Inf")
            tensors[name] = value
    if unexpected:
        raise UsageError(f"{hf_dir}: tensors that {family.ARCHITECTURE} does not have: "
                         f"{', '.join(sorted(unexpected)[:5])}"
                         f"{' ...' if len(unexpected) > 5 else ''} (another head or architecture?)")
    missing = [name for name in shapes if name not in tensors]
    if missing:
        raise DataError(_lacking(hf_dir, missing))
    head = tensors.pop("lm_head.weight") if tied and "lm_head.weight" in tensors else None
    if head is not None and not numpy.array_equal(head, tensors[embedding]):
        raise UsageError(f"{hf_dir}: lm_head.weight differs from {embedding}, but config.json "
                         f"ties them (tie_word_embeddings true)")
    return tensors


def from_hf_tensors(table, tensors):
    """xpmodel name -> float32 array, from Hugging Face name -> array (consumed)."""
    arrays = {}
    for name, parts, transposed in table:
        pieces = [tensors.pop(hf_name) for hf_name, _ in parts]
        pieces = [piece.T for piece in pieces] if transposed else pieces
        arrays[name] = numpy.ascontiguousarray(
            numpy.concatenate(pieces, axis=-1) if len(pieces) > 1 else pieces[0])
    return arrays


def _weights_file(path):
    return SafetensorsFile(path, DataError, "safetensors file")


def _weight_paths(hf_dir):
    """[(safetensors path, the names the shard index lists in it, or None for
    the one model.safetensors)]."""
    if os.path.lexists(hf_dir / WEIGHTS_FILE):      # SafetensorsFile refuses a FIFO or dangling link
        return [(hf_dir / WEIGHTS_FILE, None)]
    if os.path.lexists(hf_dir / WEIGHTS_INDEX):
        weight_map = _read_json(hf_dir / WEIGHTS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise DataError(f"{hf_dir / WEIGHTS_INDEX}: no weight_map")
        shards = {}
        for key, file_name in weight_map.items():
            if not isinstance(file_name, str) or Path(file_name).name != file_name \
                    or file_name in ("", ".", ".."):
                raise DataError(f"{hf_dir / WEIGHTS_INDEX}: shard {quote(file_name, 100)} of "
                                f"{quote(key, 100)} is not a file name in the directory")
            shards.setdefault(file_name, set()).add(key)
        for file_name in shards:   # SafetensorsFile names what one that is no file is
            if not os.path.lexists(hf_dir / file_name):
                raise DataError(f"{hf_dir}: shard {file_name} listed in {WEIGHTS_INDEX} is missing")
        return [(hf_dir / name, keys) for name, keys in sorted(shards.items())]
    pickled = [name for name in _PICKLED if (hf_dir / name).exists()]
    if pickled:
        raise UsageError(
            f"{hf_dir}: the weights are in {pickled[0]}, a pickle, and xpmodel never unpickles "
            f"(loading a pickle can run arbitrary code). Convert it once, where you trust the "
            f"file: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
            f"safe_serialization=True) writes {WEIGHTS_FILE}")
    other = [name for name in _OTHER_FORMATS if (hf_dir / name).exists()]
    raise UsageError(f"{hf_dir}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX}"
                     + (f" ({other[0]} is not read; xpmodel reads safetensors)" if other else ""))


def _write_safetensors(path, tensors):
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={"format": "pt"}))


def _read_json(path):
    """config.json or the shard index: a JSON object in a regular file of at
    most MAX_JSON_BYTES (a FIFO would block the read forever)."""
    what = "shard index" if path.name == WEIGHTS_INDEX else "Hugging Face config"
    return read_json(path, MAX_JSON_BYTES, DataError, what)
