"""Hugging Face interop: GPT-2 model directories out of and into xpmodel.

export_hf(model, tokenizer, out_dir)
    writes what `GPT2LMHeadModel.from_pretrained` and
    `AutoTokenizer.from_pretrained` read: config.json, model.safetensors
    (float32), generation_config.json and the tokenizer files.
import_hf(hf_dir) -> (GPTConfig, arrays, tokenizer)
    reads a local GPT-2 directory (one safetensors file or shards) into
    xpmodel's parameter names, ready for `GPT.load_state_arrays`.

xpmodel's parameter names are GPT2LMHeadModel's without "transformer.", and
its weights are (in, out) as Hugging Face's Conv1D stores them, so no tensor
is transposed. The LM head is wte, as in GPT-2: `save_pretrained` leaves the
tied lm_head.weight out of the file, and so does the export; an import
refuses a head that differs from wte.

Vocab padding: a model whose vocab is padded past its tokenizer's (50304 rows
for GPT-2's 50257 ids, as llm.c and nanoGPT train) is exported with every
row, and config.vocab_size is the padded size: Hugging Face needs it to equal
wte's rows, the tokenizer never produces a padding id, and the round trip is
exact. An import likewise keeps every row the file has, padded or not.

Token ids: Hugging Face's GPT-2 numbers its 256 byte tokens in the order of
its bytes-to-unicode table, xpmodel by byte value (see tokenizer_hf). An
import relabels the tokenizer to xpmodel's order and permutes wte's rows to
match, so the imported model scores every text exactly as the original did;
only the ids of byte tokens differ (and an export writes xpmodel's order).

Nothing is unpickled: a directory with only pytorch_model.bin is refused.
"""
import json
import math
import os
from pathlib import Path

import numpy
from safetensors.numpy import save_file

from .errors import DataError, UsageError
from .safetensors_header import read_safetensors_header
from .model import GPTConfig
from .params import parameter_shapes
from .tokenizer_hf import hf_vocab, read_hf_tokenizer

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Files an export writes; an existing directory holding anything else is refused.
EXPORT_FILES = frozenset({
    "config.json", WEIGHTS_FILE, "generation_config.json", "tokenizer.json", "vocab.json",
    "merges.txt", "tokenizer_config.json", "special_tokens_map.json"})
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")   # both are the tanh GELU xpmodel computes
LAYER_NORM_EPSILON = 1e-5
# GPT2Config's defaults, which Hugging Face applies to keys a config.json leaves out.
_HF_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
                "n_head": 12, "n_inner": None, "activation_function": "gelu_new",
                "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
                "layer_norm_epsilon": LAYER_NORM_EPSILON, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                "add_cross_attention": False}
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_OTHER_FORMATS = ("tf_model.h5", "flax_model.msgpack", "model.ckpt.index")
# Causal-mask buffers that older checkpoints saved; they hold no parameters.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_SAFETENSORS_DTYPES = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "BF16": "<u2"}


# ----- export ---------------------------------------------------------------


def export_hf(model, tokenizer, out_dir):
    """Write `model` (a GPT) and `tokenizer` (a BPETokenizer) as a Hugging Face
    GPT-2 directory. `out_dir` is created if needed; an existing one must be
    empty or hold only files an export writes (which are replaced)."""
    cfg = model.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab "
                         f"has only {cfg.vocab_size} rows")
    hf_vocab(tokenizer)   # refuses a tokenizer Hugging Face cannot hold, before writing
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UsageError(f"{out_dir} exists and is not a directory")
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES)
        if others:
            raise UsageError(f"{out_dir} already holds files an export does not write "
                             f"({', '.join(others[:5])}); export into a new or empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)

    arrays = model.state_arrays()
    tensors = {"transformer." + name: numpy.ascontiguousarray(arrays[name], dtype=numpy.float32)
               for name in model.layout.names}
    _write_safetensors(out_dir / WEIGHTS_FILE, tensors)
    eot = tokenizer.eot_id
    _write_json(out_dir / "config.json", hf_config(cfg, eot))
    _write_json(out_dir / "generation_config.json",
                {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot})
    tokenizer.export_hf(out_dir, model_max_length=cfg.block_size)


def hf_config(config, eot_id):
    """The config.json document of a GPT2LMHeadModel equal to `config` (a GPTConfig)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPSILON,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": "float32",
        "torch_dtype": "float32",
    }


# ----- import ---------------------------------------------------------------


def import_hf(hf_dir):
    """Read a local Hugging Face GPT-2 directory.

    Returns (config, arrays, tokenizer): a GPTConfig, name -> float32 NumPy
    array in xpmodel's names and shapes, and a BPETokenizer. wte keeps every
    row of the file (config.vocab_size may exceed tokenizer.vocab_size). Raises
    UsageError naming what is not supported (another architecture, a config
    feature xpmodel does not compute, pickled weights, an untied head) and
    DataError for unreadable or inconsistent files.
    """
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise UsageError(f"{hf_dir} is not a directory")
    if not (hf_dir / "config.json").is_file():
        raise UsageError(f"{hf_dir} has no config.json; it is not a Hugging Face model directory")
    hf_cfg = _read_json(hf_dir / "config.json")
    config = config_from_hf(hf_cfg, hf_dir / "config.json")
    tokenizer, hf_ids = read_hf_tokenizer(hf_dir)   # hf_ids: (tokenizer.vocab_size,)
    if tokenizer.vocab_size > config.vocab_size:
        raise DataError(f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} ids but the "
                        f"model's vocab has only {config.vocab_size} rows")
    arrays = _read_weights(hf_dir, config, hf_cfg.get("tie_word_embeddings", True))
    if not numpy.array_equal(hf_ids, numpy.arange(len(hf_ids))):
        wte = arrays["wte.weight"]          # (V, C); rows past the tokenizer's stay
        wte[:len(hf_ids)] = wte[hf_ids]     # row i now embeds xpmodel's token i
    return config, arrays, tokenizer


def config_from_hf(hf_cfg, where="config.json"):
    """A GPTConfig from a config.json document, refusing what xpmodel does not compute."""
    if not isinstance(hf_cfg, dict):
        raise DataError(f"{where}: not a JSON object")
    model_type = hf_cfg.get("model_type")
    architectures = hf_cfg.get("architectures") or []
    if not isinstance(architectures, list):
        raise DataError(f"{where}: architectures must be a list, got {architectures!r}")
    others = [a for a in architectures if a not in ARCHITECTURES]
    if others or model_type != "gpt2":
        name = others[0] if others else f"model_type {model_type!r}"
        raise UsageError(f"{where}: {name} is not supported; xpmodel imports GPT-2 "
                         f"(model_type \"gpt2\", {' or '.join(ARCHITECTURES)})")
    value = {key: hf_cfg.get(key, default) for key, default in _HF_DEFAULTS.items()}
    rates = [value[key] for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop")]
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rates):
        raise DataError(f"{where}: dropout rates must be numbers, got {rates}")
    try:
        # One rate for all three sites; when the file's differ, the largest.
        config = GPTConfig(vocab_size=value["vocab_size"], block_size=value["n_positions"],
                           n_layer=value["n_layer"], n_head=value["n_head"],
                           n_embd=value["n_embd"], dropout=float(max(rates)))
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from None
    refusals = [
        (value["n_inner"] not in (None, 4 * config.n_embd),
         f"n_inner {value['n_inner']} (xpmodel's MLP width is 4 * n_embd = {4 * config.n_embd})"),
        (value["activation_function"] not in ACTIVATIONS,
         f"activation_function {value['activation_function']!r} (xpmodel computes the tanh "
         f"GELU: {' or '.join(ACTIVATIONS)})"),
        (not value["scale_attn_weights"], "scale_attn_weights false"),
        (value["scale_attn_by_inverse_layer_idx"], "scale_attn_by_inverse_layer_idx"),
        (value["reorder_and_upcast_attn"], "reorder_and_upcast_attn"),
        (value["add_cross_attention"], "add_cross_attention"),
        (not _close(value["layer_norm_epsilon"], LAYER_NORM_EPSILON),
         f"layer_norm_epsilon {value['layer_norm_epsilon']} (xpmodel uses {LAYER_NORM_EPSILON})"),
    ]
    for refused, feature in refusals:
        if refused:
            raise UsageError(f"{where}: {feature} is not supported")
    return config


def _close(value, target):
    return isinstance(value, (int, float)) and abs(value - target) <= 1e-12


def _read_weights(hf_dir, config, tie_word_embeddings):
    """Every parameter of `config` from the directory's safetensors, as float32."""
    expected = dict(parameter_shapes(config))
    files = _weight_files(hf_dir)
    arrays, lm_head, unexpected = {}, None, []
    for path, wanted in files:
        tensors = _SafetensorsFile(path)
        for key in tensors.names:
            if wanted is not None and key not in wanted:
                continue
            name = key[len("transformer."):] if key.startswith("transformer.") else key
            if name.endswith(_BUFFER_SUFFIXES):
                continue
            if key == "lm_head.weight":
                shape = expected["wte.weight"]
            elif name in expected:
                shape = expected[name]
                if name in arrays:
                    raise DataError(f"{hf_dir}: {name} is stored twice (as {key} too)")
            else:
                unexpected.append(key)
                continue
            if tensors.shape(key) != tuple(shape):
                raise DataError(f"{path}: {key} has shape {list(tensors.shape(key))}; "
                                f"config.json needs {list(shape)}")
            value = tensors.read(key)
            if not numpy.isfinite(value).all():
                raise DataError(f"{path}: {key} holds NaN or Inf")
            if key == "lm_head.weight":
                lm_head = value
            else:
                arrays[name] = value
    if unexpected:
        raise UsageError(f"{hf_dir}: tensors that GPT-2 does not have: "
                         f"{', '.join(sorted(unexpected)[:5])}"
                         f"{' ...' if len(unexpected) > 5 else ''} (another head or architecture?)")
    missing = [name for name in expected if name not in arrays]
    if missing:
        raise DataError(f"{hf_dir}: the weights lack {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}")
    if lm_head is not None:
        if not numpy.array_equal(lm_head, arrays["wte.weight"]):
            raise UsageError(f"{hf_dir}: lm_head.weight differs from wte.weight; xpmodel's "
                             f"LM head is tied to the token embedding, as in GPT-2")
    elif not tie_word_embeddings:
        raise UsageError(f"{hf_dir}: config.json unties the LM head (tie_word_embeddings "
                         f"false) but the weights hold no lm_head.weight")
    return arrays


def _weight_files(hf_dir):
    """[(path, names to read from it, or None for all)]."""
    if (hf_dir / WEIGHTS_FILE).is_file():
        return [(hf_dir / WEIGHTS_FILE, None)]
    if (hf_dir / WEIGHTS_INDEX).is_file():
        index = _read_json(hf_dir / WEIGHTS_INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise DataError(f"{hf_dir / WEIGHTS_INDEX}: no weight_map")
        shards = {}
        for key, file_name in weight_map.items():
            if not isinstance(file_name, str) or Path(file_name).name != file_name \
                    or file_name in ("", ".", ".."):
                raise DataError(f"{hf_dir / WEIGHTS_INDEX}: shard {file_name!r} of {key} is "
                                f"not a file name in the directory")
            shards.setdefault(file_name, set()).add(key)
        for file_name in shards:
            if not (hf_dir / file_name).is_file():
                raise DataError(f"{hf_dir}: shard {file_name} listed in {WEIGHTS_INDEX} is missing")
        return [(hf_dir / name, keys) for name, keys in sorted(shards.items())]
    pickled = [name for name in _PICKLED if (hf_dir / name).exists()]
    if pickled:
        raise UsageError(
            f"{hf_dir}: the weights are in {pickled[0]}, a pickle, and xpmodel never unpickles "
            f"(loading a pickle can run arbitrary code). Convert it once, where you trust the "
            f"file: GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, "
            f"safe_serialization=True) writes {WEIGHTS_FILE}")
    other = [name for name in _OTHER_FORMATS if (hf_dir / name).exists()]
    raise UsageError(f"{hf_dir}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX}"
                     + (f" ({other[0]} is not read; xpmodel reads safetensors)" if other else ""))


class _SafetensorsFile:
    """One safetensors file: the header is checked when opened, tensors are read
    one at a time and converted to float32 (bfloat16 included, which NumPy lacks)."""

    def __init__(self, path):
        self.path = Path(path)
        header, self._data_start, data_len = read_safetensors_header(
            self.path, DataError, "safetensors file")
        self._entries = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
                shape = tuple(int(s) for s in shape)
                ok = (isinstance(start, int) and isinstance(end, int)
                      and 0 <= start <= end <= data_len)
            except (TypeError, KeyError, ValueError):
                ok = False
            if not ok or any(s < 0 for s in shape):
                raise DataError(f"{self.path}: corrupt safetensors entry for {key}")
            self._entries[key] = (dtype, shape, start, end)

    @property
    def names(self):
        return list(self._entries)

    def shape(self, key):
        return self._entries[key][1]

    def read(self, key):
        dtype, shape, start, end = self._entries[key]
        if dtype not in _SAFETENSORS_DTYPES:
            raise UsageError(f"{self.path}: {key} is {dtype}; xpmodel reads float tensors "
                             f"({', '.join(_SAFETENSORS_DTYPES)})")
        item = numpy.dtype(_SAFETENSORS_DTYPES[dtype])
        if end - start != math.prod(shape) * item.itemsize:
            raise DataError(f"{self.path}: {key} has {end - start} bytes for shape {list(shape)}")
        with open(self.path, "rb") as f:
            f.seek(self._data_start + start)
            raw = f.read(end - start)
        if len(raw) != end - start:
            raise DataError(f"{self.path}: truncated safetensors file")
        value = numpy.frombuffer(raw, dtype=item)
        if dtype == "BF16":   # the high half of a float32
            value = (value.astype(numpy.uint32) << 16).view(numpy.float32)
        return value.astype(numpy.float32).reshape(shape)


# ----- files ----------------------------------------------------------------


def _write_safetensors(path, tensors):
    """float32 tensors, written to a temporary name and renamed into place."""
    partial = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(partial), metadata={"format": "pt"})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _write_json(path, document):
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def _read_json(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
