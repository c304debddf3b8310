"""The run configuration: YAML files and `KEY=VALUE` overrides turned into typed dataclasses.

A run is described by three sections, each a dataclass: `data` (corpus and
tokenizer), `model` (the network's shape) and `train` (optimizer, schedule,
evaluation, checkpoints). `RunConfig` holds the three.

A config is built in layers, each replacing the keys it names:
  dataclass defaults < `base:` config (recursively) < the YAML file < overrides.
Every key is checked as it is read, so an error names the file or override it
came from; checks that relate several keys run once on the finished config.
The dataclasses also check themselves on construction, so a config built in
code is held to the same rules as one read from YAML.

Every problem raises `UsageError` with a one-line message that names the file
and the dotted key; an unknown key's message lists the section's valid keys.

This file does not know what the settings do; the trainer, the data pipeline
and the model read them.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .atomic import atomic_write_bytes
from .backend import KERNELS
from .checks import HALF_OPEN_UNIT, NON_NEGATIVE, OPEN_UNIT, POSITIVE, Range
from .errors import UsageError
from .files import read_bounded
from .ns_coefficients import NS_COEFFICIENTS, check_ns_coefficients, parse_ns_coefficients
from .options import ADJUST_LR, MLPS, NOISE_KINDS, NORMS, POSITIONS, SCHEDULES
from .tokenizer.bpe import MAX_VOCAB

TOKENIZERS = ("bpe", "byte")
BATCHINGS = ("random", "epochs")
TOKEN_DROPOUT_MODES = ("random", "mask")
PRECISIONS = ("fp32", "fp16", "bf16")
OPTIMIZERS = ("adamw", "muon")
LOG_TO = ("tensorboard", "wandb")      # train.log_to: mirrors of metrics.jsonl (train/mirrors.py)

DEFAULT_CONFIG = "default"
_YAML_SUFFIXES = (".yaml", ".yml")
_MAX_BASE_DEPTH = 16    # deeper `base:` chains are almost surely a mistake
# Bounds on a YAML document, checked from its parse events before anything is
# built: a config is a few kB, two levels deep, with short values. Aliases
# count at their expanded size, so an alias bomb is refused, not expanded.
MAX_CONFIG_BYTES = 1 << 20
_MAX_YAML_DEPTH = 16
_MAX_YAML_NODES = 10_000
_MAX_STRING_CHARS = 1 << 16
# String keys that mean nothing when empty.
_NON_EMPTY = {"data.source"}
# train.peak_flops is in FLOP/s; below this (0.1 TFLOP/s) it was surely meant in other units.
MIN_PEAK_FLOPS = 1e11
# Sequences per batch, and batches per evaluation, far beyond any machine's
# memory: refused here, naming the key, before anything is allocated (the
# trainer also measures the batch arrays against this machine's memory).
MAX_BATCH_SIZE = 1 << 24
MAX_EVAL_BATCHES = 1 << 24


# ---------------------------------------------------------------------------
# Per-key rules, attached to dataclass fields as metadata.

def _setting(default, within=None, choices=None):
    """A dataclass field whose value must lie `within` a range or be one of `choices`."""
    return field(default=default, metadata={"within": within, "choices": choices})


# ---------------------------------------------------------------------------
# The three sections.

@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens and batches."""
    # a file, folder, glob, or built-in corpus name
    source: str = "shakespeare"
    # "byte": the 256-symbol byte tokenizer
    tokenizer: str = _setting("bpe", choices=TOKENIZERS)
    # BPE vocabulary size; ignored for "byte"
    vocab_size: int = _setting(4096, within=Range(low=256))
    # share of the tokens held out for validation
    val_fraction: float = _setting(0.1, within=OPEN_UNIT)
    # "random": nanoGPT-style random windows; "epochs": every window once per epoch
    batching: str = _setting("random", choices=BATCHINGS)
    # epochs batching: cut each epoch's windows at a new random offset
    crop_augment: bool = False
    # chance an input token is replaced (augmentation); the target stays
    token_dropout: float = _setting(0.0, within=HALF_OPEN_UNIT)
    # "random": by a uniformly drawn id; "mask": by the tokenizer's reserved <|mask|> id
    token_dropout_mode: str = _setting("random", choices=TOKEN_DROPOUT_MODES)
    # where tokenized corpora are cached; None: the default cache directory
    cache_dir: str | None = None

    def __post_init__(self):
        _check_fields(self, "data")
        if self.vocab_size > MAX_VOCAB:     # refused here, before a tokenizer is trained
            raise UsageError(f"data.vocab_size={self.vocab_size} is more than the {MAX_VOCAB:,} ids "
                             f"an xpmodel BPE tokenizer has (its token files and model are sized "
                             f"by it)")
        if self.crop_augment and self.batching != "epochs":
            raise UsageError(
                f"data.crop_augment moves where data.batching=epochs cuts its windows; with "
                f"data.batching={self.batching} every window already starts at a random token, "
                f"so there is nothing to crop: set data.batching=epochs or data.crop_augment=false")


@dataclass
class ModelConfig:
    """The network's shape and architecture options (GPT-2 by default; the
    vocabulary size comes from the tokenizer unless `vocab_size` pads it, e.g.
    to 50304, a multiple of 64). See model/config.py for what each option does."""
    # transformer blocks
    n_layer: int = _setting(6, within=POSITIVE)
    # attention heads per block
    n_head: int = _setting(8, within=POSITIVE)
    # C, the residual stream width
    n_embd: int = _setting(256, within=POSITIVE)
    # T, the longest context the model sees
    block_size: int = _setting(128, within=POSITIVE)
    # dropout on attention weights, residual branches and embeddings
    dropout: float = _setting(0.0, within=HALF_OPEN_UNIT)
    # embedding rows; None: the tokenizer's vocabulary size; larger pads it
    vocab_size: int | None = _setting(None, within=Range(low=256))
    # "rmsnorm": x / rms(x) * w, without the mean or a bias
    norm: str = _setting("layernorm", choices=NORMS)
    # the norms' denominator guard
    norm_eps: float = _setting(1e-5, within=POSITIVE)
    # "rope": rotary positions on q and k instead of a learned table
    position: str = _setting("learned", choices=POSITIONS)
    # rotary base: head dimension pair j turns at rope_theta^(-2j/D) per position
    rope_theta: float = _setting(10000.0, within=POSITIVE)
    # RMSNorm of every q and k head (before the rotation)
    qk_norm: bool = False
    # the MLP's activation: "swiglu" gates it, "relu2" squares a ReLU
    mlp: str = _setting("gelu", choices=MLPS)
    # MLP hidden width; None: 4 * n_embd, or for swiglu 8/3 * n_embd rounded up to 64
    mlp_hidden: int | None = _setting(None, within=POSITIVE)
    # key/value heads (grouped-query attention); None: n_head
    n_kv_head: int | None = _setting(None, within=POSITIVE)
    # biases on the projections and LayerNorms
    bias: bool = True
    # the output head shares the token embedding's weights
    tie_embeddings: bool = True

    def __post_init__(self):
        _check_fields(self, "model")
        if self.n_embd % self.n_head:
            raise UsageError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise UsageError(f"model.n_head ({self.n_head}) must be divisible by "
                             f"model.n_kv_head ({self.n_kv_head})")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise UsageError(f"model.position rope needs an even head size; n_embd / n_head = "
                             f"{self.n_embd // self.n_head}")


@dataclass
class TrainConfig:
    """Optimizer, learning-rate schedule, evaluation, sampling and checkpoints."""
    # B, sequences per micro-batch
    batch_size: int = _setting(16, within=Range(0, MAX_BATCH_SIZE, low_inclusive=False))
    # micro-batches summed into one optimizer step
    grad_accum: int = _setting(1, within=POSITIVE)
    # optimizer steps to run (set this or epochs)
    max_iters: int | None = _setting(5000, within=POSITIVE)
    # passes over the training tokens (set this or max_iters)
    epochs: int | None = _setting(None, within=POSITIVE)
    # peak learning rate
    lr: float = _setting(3e-4, within=POSITIVE)
    # learning rate at the end of the decay
    min_lr: float = _setting(3e-5, within=NON_NEGATIVE)
    # steps of linear warmup from 0 to lr
    warmup_iters: int = _setting(100, within=NON_NEGATIVE)
    # step at which the decay reaches min_lr; None: the run's length
    lr_decay_iters: int | None = _setting(None, within=POSITIVE)
    # learning-rate shape after warmup: cosine, linear, step, wsd (warmup-stable-decay) or constant
    schedule: str = _setting("cosine", choices=SCHEDULES)
    # step: steps between drops of the rate by gamma; None: a third of the steps after warmup
    step_size: int | None = _setting(None, within=POSITIVE)
    # step: the factor each drop multiplies the rate by
    gamma: float = _setting(0.1, within=Range(0, 1, low_inclusive=False))
    # wsd: the share of the run (of lr_decay_iters) spent decaying at its end
    decay_fraction: float = _setting(0.2, within=Range(0, 1, low_inclusive=False))
    # AdamW decoupled weight decay (applied to matrices only); lr * weight_decay must be below 1
    weight_decay: float = _setting(0.1, within=NON_NEGATIVE)
    # AdamW first-moment decay
    beta1: float = _setting(0.9, within=HALF_OPEN_UNIT)
    # AdamW second-moment decay
    beta2: float = _setting(0.95, within=HALF_OPEN_UNIT)
    # AdamW denominator guard
    eps: float = _setting(1e-8, within=POSITIVE)
    # "muon": Muon for the blocks' attention and MLP matrices, AdamW at lr for the rest
    optimizer: str = _setting("adamw", choices=OPTIMIZERS)
    # Muon's peak learning rate; the schedule scales it as it scales lr
    muon_lr: float = _setting(0.02, within=POSITIVE)
    # Muon's momentum (a running average of gradients)
    muon_momentum: float = _setting(0.95, within=HALF_OPEN_UNIT)
    # Nesterov momentum: orthogonalise G + mu (M - G) instead of M
    muon_nesterov: bool = True
    # Newton-Schulz iterations per step
    muon_ns_steps: int = _setting(5, within=Range(1, 99))
    # Newton-Schulz coefficients: jordan, cubic, or three numbers "a,b,c" that keep every
    # singular value in (0, 2] through muon_ns_steps iterations (ns_coefficients.py)
    muon_ns_coefficients: str = "jordan"
    # Muon's decoupled weight decay; muon_lr * muon_weight_decay must be below 1
    muon_weight_decay: float = _setting(0.0, within=NON_NEGATIVE)
    # Muon's per-shape rate: original sqrt(max(1, out/in)) | match_rms_adamw 0.2 sqrt(max(in, out))
    muon_adjust_lr: str = _setting("original", choices=ADJUST_LR)
    # global gradient-norm limit; 0 = off
    grad_clip: float = _setting(1.0, within=NON_NEGATIVE)
    # NEFTune alpha: noise of size alpha / sqrt(T * C) on the input embeddings in training; 0 = off
    embedding_noise: float = _setting(0.0, within=NON_NEGATIVE)
    # that noise's distribution: uniform in [-1, 1] (NEFTune's) or gaussian, times the size
    embedding_noise_kind: str = _setting("uniform", choices=NOISE_KINDS)
    # steps between validation-loss estimates
    eval_interval: int = _setting(500, within=POSITIVE)
    # batches averaged per loss estimate
    eval_batches: int = _setting(20, within=Range(0, MAX_EVAL_BATCHES, low_inclusive=False))
    # steps between printed samples; 0 = off
    sample_interval: int = _setting(500, within=NON_NEGATIVE)
    # text the samples continue
    sample_prompt: str = "\n"
    # tokens generated per sample
    sample_tokens: int = _setting(200, within=POSITIVE)
    # softmax temperature of those samples; 0 = greedy (always the likeliest token)
    sample_temperature: float = _setting(0.8, within=NON_NEGATIVE)
    # draw only among the k likeliest tokens; None: all of them
    sample_top_k: int | None = _setting(200, within=POSITIVE)
    # nucleus sampling: the fewest likeliest tokens whose probability reaches p; None: off
    sample_top_p: float | None = _setting(None, within=Range(0, 1, low_inclusive=False))
    # steps between checkpoints
    save_interval: int = _setting(1000, within=POSITIVE)
    # periodic checkpoints kept on disk
    keep_last: int = _setting(3, within=POSITIVE)
    # steps between log lines
    log_interval: int = _setting(10, within=POSITIVE)
    # evaluations without a better val loss before stopping; 0 = off
    early_stop_patience: int = _setting(0, within=NON_NEGATIVE)
    # steps between per-layer health records (gradient norm, update/weight ratio); 0 = off
    health_interval: int = _setting(100, within=NON_NEGATIVE)
    # "fp16": float16 compute with loss scaling; "bf16": bfloat16 compute, no loss
    # scaling (float32 master weights and statistics in both)
    precision: str = _setting("fp32", choices=PRECISIONS)
    # CUDA: "fused" kernels, or "xp": every layer's own xp code on CuPy
    kernels: str = _setting("fused", choices=KERNELS)
    # FLOP/s (not TFLOP/s; at least MIN_PEAK_FLOPS) that MFU is measured against; None: the
    # GPU's dense fp16/bf16 tensor-core peak from xpmodel/train/peak_flops.py (no MFU for
    # GPUs it lacks, or fp32)
    peak_flops: float | None = _setting(None, within=POSITIVE)
    # activation memory for compute: "mlp" recomputes the MLP's hidden activations
    # in backward, "block" each whole block (about one more forward pass)
    recompute: str = _setting("none", choices=("none", "mlp", "block"))
    # where metrics.jsonl's records, samples and the config are mirrored: tensorboard, wandb
    log_to: list[str] = field(default_factory=list, metadata={"choices": LOG_TO})
    # seeds weight init, batching and dropout
    seed: int = _setting(1337, within=NON_NEGATIVE)
    # checkpoint or run directory to start from; None: fresh weights
    init_from: str | None = None

    def __post_init__(self):
        _check_fields(self, "train")
        if (self.max_iters is None) == (self.epochs is None):
            state = "both set" if self.max_iters is not None else "both unset"
            raise UsageError(
                f"train.max_iters and train.epochs are {state}; set exactly one "
                f"(the other to null) to say how long to train")
        if self.min_lr > self.lr:
            raise UsageError(f"train.min_lr ({self.min_lr:g}) must not exceed train.lr ({self.lr:g})")
        if self.max_iters is not None and self.warmup_iters > self.max_iters:
            raise UsageError(
                f"train.warmup_iters ({self.warmup_iters}) is longer than the run "
                f"(train.max_iters = {self.max_iters})")
        if self.lr_decay_iters is not None and self.warmup_iters > self.lr_decay_iters:
            raise UsageError(
                f"train.warmup_iters ({self.warmup_iters}) must not exceed "
                f"train.lr_decay_iters ({self.lr_decay_iters})")
        self._check_ns_coefficients()
        self._check_weight_decay()
        if self.peak_flops is not None and self.peak_flops < MIN_PEAK_FLOPS:
            raise UsageError(f"train.peak_flops={self.peak_flops:g} is too small: it is in FLOP/s, "
                             f"not TFLOP/s (e.g. 989e12 for an H100), and at least {MIN_PEAK_FLOPS:g}")

    def _check_ns_coefficients(self):
        try:
            coefficients = parse_ns_coefficients(self.muon_ns_coefficients)
        except ValueError:
            raise UsageError(f"train.muon_ns_coefficients must be {', '.join(NS_COEFFICIENTS)} or "
                             f"three numbers a,b,c with a > 0; got {_show(self.muon_ns_coefficients)}") from None
        try:
            check_ns_coefficients(coefficients, self.muon_ns_steps)
        except ValueError as exc:
            raise UsageError(f"train.muon_ns_coefficients={_show(self.muon_ns_coefficients)} cannot "
                             f"work with train.muon_ns_steps={self.muon_ns_steps}: {exc}") from None

    def _check_weight_decay(self):
        """Decoupled decay multiplies the matrices by 1 - rate * decay each step, at
        most at the peak rates lr and muon_lr: at 1 or more it zeroes or flips them."""
        if self.lr * self.weight_decay >= 1.0:
            raise UsageError(f"train.lr * train.weight_decay = {self.lr * self.weight_decay:g} must be "
                             f"below 1 (AdamW's decay W <- (1 - lr wd) W would zero or flip the "
                             f"weights): lower train.weight_decay below {1.0 / self.lr:g}")
        muon_decay = self.muon_lr * self.muon_weight_decay
        if self.optimizer == "muon" and muon_decay >= 1.0:
            raise UsageError(f"train.muon_lr * train.muon_weight_decay = {muon_decay:g} must be below "
                             f"1 (Muon's decay W <- (1 - muon_lr wd) W would zero or flip the weights): "
                             f"lower train.muon_weight_decay below {1.0 / self.muon_lr:g}")


@dataclass
class RunConfig:
    """Everything one training run needs to know."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
_TOP_LEVEL_KEYS = ("base", *SECTIONS)
# Alternative ways to say how long to train: a layer that sets one clears the
# other, so `epochs: 3` over a base that sets max_iters means what it says.
_RUN_LENGTH_KEYS = ("max_iters", "epochs")


# ---------------------------------------------------------------------------
# Checking one value against its field.

def _check_fields(config, section):
    """Type-check, convert and range-check every field of one section in place."""
    for spec in dataclasses.fields(config):
        value = check_value(section, spec.name, getattr(config, spec.name))
        object.__setattr__(config, spec.name, value)


def check_value(section, key, value):
    """Return `value` converted to the type of `section.key`, or raise UsageError."""
    spec = _fields_by_name(section)[key]
    dotted = f"{section}.{key}"
    value = _convert(dotted, value, _field_types(section)[key])
    if value is None:
        return None
    within, choices = spec.metadata.get("within"), spec.metadata.get("choices")
    if within is not None and not within.contains(value):
        raise UsageError(f"{dotted} must be {within.describe()}, got {_show(value)}")
    for item in value if isinstance(value, list) else [value]:
        if choices is not None and item not in choices:
            raise UsageError(f"{dotted} must be one of {', '.join(choices)}; got {_show(item)}")
    return value


@functools.cache
def _fields_by_name(section):
    return {spec.name: spec for spec in dataclasses.fields(SECTIONS[section])}


@functools.cache
def _field_types(section):
    # Annotations are strings under `from __future__ import annotations`.
    return typing.get_type_hints(SECTIONS[section])


def _convert(dotted, value, annotation):
    """Check `value` against a field type such as `int` or `int | None`, converting where lossless."""
    if typing.get_origin(annotation) is list:
        return _convert_list(dotted, value, typing.get_args(annotation)[0])
    kinds = typing.get_args(annotation) or (annotation,)
    optional = type(None) in kinds
    kind = next(k for k in kinds if k is not type(None))
    if value is None:
        if optional:
            return None
        raise UsageError(f"{dotted} must be {_DESCRIPTIONS[kind]}, not null")
    if kind is bool and isinstance(value, bool):
        return value
    # bool is a subclass of int, but `n_layer: true` is a mistake, not a 1.
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float:
        number = _as_float(value)
        if number is not None:
            if not math.isfinite(number):
                raise UsageError(f"{dotted} must be a finite number, got {value!r}")
            return number
    if kind is str and isinstance(value, str):
        if len(value) > _MAX_STRING_CHARS:
            raise UsageError(f"{dotted} is {len(value):,} characters long, more than the "
                             f"{_MAX_STRING_CHARS:,} a setting may be")
        if dotted in _NON_EMPTY and not value.strip():
            raise UsageError(f"{dotted} must not be empty")
        return value
    expected = _DESCRIPTIONS[kind] + (" or null" if optional else "")
    raise UsageError(f"{dotted} must be {expected}, got {_show(value)} ({type(value).__name__})")


_DESCRIPTIONS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _convert_list(dotted, value, kind):
    """A list of `kind` from a YAML list, a comma-separated string (`a,b`, as an
    override gives it) or null / an empty string (the empty list); no repeats."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, str):
        value = [item.strip() for item in value.split(",")]
    if not isinstance(value, (list, tuple)):
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}[kind]
        raise UsageError(f"{dotted} must be a list of {plural}, got {_show(value)} "
                         f"({type(value).__name__})")
    items = [_convert(f"{dotted}[{i}]", item, kind) for i, item in enumerate(value)]
    repeated = sorted({str(item) for item in items if items.count(item) > 1})
    if repeated:
        raise UsageError(f"{dotted} names {', '.join(repeated)} more than once")
    return items


def _as_float(value):
    """A float for an int, float or numeric string; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    # YAML 1.1 reads `3e-4` (no dot) as a string, so numeric strings are accepted.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _show(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _unknown_key_message(section, key):
    valid = list(_fields_by_name(section))
    guesses = _key_guesses(section, key)
    hint = f" (did you mean {' or '.join(guesses)}?)" if guesses else ""
    return f"unknown key {section}.{key}{hint}; valid {section} keys: {', '.join(valid)}"


def _key_guesses(section, key):
    """What an unknown `section.key` most likely meant: the key itself in other
    sections (as section.key), else the closest key of its own section, else
    the closest key of another section (as section.key)."""
    others = [name for name in SECTIONS if name != section]
    if any(key in _fields_by_name(name) for name in others):
        return [f"{name}.{key}" for name in others if key in _fields_by_name(name)]
    close = difflib.get_close_matches(key, list(_fields_by_name(section)), n=1)
    if close:
        return close
    close = difflib.get_close_matches(key, [field for name in others for field in _fields_by_name(name)], n=1)
    return [f"{name}.{close[0]}" for name in others if close and close[0] in _fields_by_name(name)]


def _unknown_section_message(section):
    return f"unknown section {section!r}; valid top-level keys: {', '.join(_TOP_LEVEL_KEYS)}"


# ---------------------------------------------------------------------------
# Finding and reading YAML files.

def _shipped_dir():
    """The directory of shipped configs: the installed package, else the source tree."""
    try:
        return importlib.resources.files("xpmodel.configs")
    except (ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parent.parent / "configs"


def shipped_configs():
    """Names of the configs that ship with xpmodel, sorted."""
    names = []
    for entry in _shipped_dir().iterdir():
        stem, dot, suffix = entry.name.rpartition(".")
        if entry.is_file() and dot and "." + suffix in _YAML_SUFFIXES:
            names.append(stem)
    return sorted(names)


def _looks_like_path(text):
    return "/" in text or os.sep in text or text.endswith(_YAML_SUFFIXES)


def _locate(name_or_path, relative_to=None):
    """Return (label, text) for a shipped config name or a YAML file path."""
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(str(name_or_path)):
        path = Path(name_or_path)
        if relative_to is not None and not path.is_absolute():
            path = relative_to / path
        return str(path), _read_text(path, str(path))
    name = str(name_or_path)
    if name in shipped_configs():
        entry = _shipped_dir().joinpath(name + ".yaml")
        return str(entry), _read_text(entry, str(entry))
    path = Path(name) if relative_to is None else relative_to / name
    if path.is_file():
        return str(path), _read_text(path, str(path))
    raise UsageError(
        f"unknown config {_show(name, 200)}: not a file and not a shipped config; "
        f"shipped configs: {', '.join(shipped_configs())}")


def _read_text(path, label):
    """The text of a config file: a regular file (not a FIFO or /dev/zero) of at most 1 MiB."""
    if not isinstance(path, Path):   # a shipped config inside an installed package
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"{label}: cannot read config file ({exc.strerror})") from None
    else:
        try:
            data = read_bounded(path, MAX_CONFIG_BYTES, UsageError, "config file")
        except UsageError as exc:
            raise UsageError(str(exc).replace(str(path), label, 1)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


class _StrictLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects a key repeated within one mapping."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue    # the base loader reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_yaml_bounds(text, label):
    """Refuse YAML nested deeper than _MAX_YAML_DEPTH, with more than
    _MAX_YAML_NODES nodes once aliases are expanded, or with an alias inside
    the node it names. Parse events come from a loop, not recursion, and are
    counted without building anything, so this is quick for any input."""
    if len(text) > MAX_CONFIG_BYTES:
        raise UsageError(f"{label}: {len(text):,} characters of YAML, more than the "
                         f"{MAX_CONFIG_BYTES:,} a config may be")
    open_nodes = []     # [expanded size, anchor] of each collection being read
    sizes = {}          # anchor -> expanded size of the node it names
    total = 0
    for event in yaml.parse(text, Loader=_StrictLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            open_nodes.append([1, event.anchor])
            if len(open_nodes) > _MAX_YAML_DEPTH:
                raise UsageError(f"{label}: YAML nested more than {_MAX_YAML_DEPTH} levels deep")
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            size, anchor = open_nodes.pop()
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in sizes:
                raise UsageError(f"{label}: YAML alias *{_show(event.anchor, 40)} refers to a node "
                                 f"that is not complete where it is used")
            size, anchor = sizes[event.anchor], None
        elif isinstance(event, yaml.ScalarEvent):
            size, anchor = 1, event.anchor
        else:
            continue
        if anchor is not None:
            sizes[anchor] = size
        if open_nodes:
            open_nodes[-1][0] += size
        total += size
        if total > _MAX_YAML_NODES or (open_nodes and open_nodes[0][0] > _MAX_YAML_NODES):
            raise UsageError(f"{label}: YAML with more than {_MAX_YAML_NODES:,} values (aliases "
                             f"expanded); a config is a few sections of settings")


def _yaml_error(exc, label):
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return UsageError(f"{label}: {where}invalid YAML: {' '.join(problem.split())[:200]}")


def _parse_yaml(text, label):
    try:
        _check_yaml_bounds(text, label)
        document = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, label) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        if isinstance(exc, UsageError):
            raise
        # e.g. a date that does not exist (2024-13-45)
        raise UsageError(f"{label}: invalid YAML value: {' '.join(str(exc).split())[:200]}") from None
    if document is None:    # an empty file: all defaults
        return {}
    if not isinstance(document, dict):
        raise UsageError(
            f"{label}: the top level must be a mapping of sections "
            f"({', '.join(_TOP_LEVEL_KEYS)}), got {type(document).__name__}")
    return document


# ---------------------------------------------------------------------------
# Layering: each layer is a {section: {key: value}} mapping checked key by key.

def _read_layers(name_or_path, relative_to=None, chain=()):
    """Return [(label, document)] for a config and its `base:` ancestors, oldest first."""
    label, text = _locate(name_or_path, relative_to)
    if label in chain:
        raise UsageError(f"{label}: `base:` chain loops back on itself ({' -> '.join((*chain, label))})")
    if len(chain) >= _MAX_BASE_DEPTH:
        raise UsageError(f"{label}: `base:` chain deeper than {_MAX_BASE_DEPTH} configs")
    document = _parse_yaml(text, label)
    base = document.get("base")
    if base is None:
        return [(label, document)]
    if not isinstance(base, str) or not base:
        raise UsageError(f"{label}: base must be a config name or path, got {_show(base)}")
    # A relative base path is read next to the file that names it.
    return _read_layers(base, Path(label).parent, (*chain, label)) + [(label, document)]


def _apply_document(merged, document, label):
    """Check a parsed YAML document's sections and keys and lay them over `merged`."""
    for section, values in document.items():
        if section == "base":
            continue
        if section not in SECTIONS:
            raise UsageError(f"{label}: {_unknown_section_message(section)}")
        if values is None:      # `model:` with nothing under it
            continue
        if not isinstance(values, dict):
            raise UsageError(
                f"{label}: section {section} must be a mapping of keys, got {_show(values)}")
        _apply_values(merged, section, values, {key: label for key in values})


def _apply_values(merged, section, values, labels):
    """Check each key of one section and lay the values over `merged`."""
    valid = _fields_by_name(section)
    checked = {}
    for key, value in values.items():
        if key not in valid:
            raise UsageError(f"{labels[key]}: {_unknown_key_message(section, key)}")
        try:
            checked[key] = check_value(section, key, value)
        except UsageError as exc:
            raise UsageError(f"{labels[key]}: {exc}") from None
    target = merged.setdefault(section, {})
    if section == "train":
        named = [key for key in _RUN_LENGTH_KEYS if key in checked]
        if len(named) == 1:
            for other in _RUN_LENGTH_KEYS:
                target[other] = None
    target.update(checked)


def _build(merged, label):
    """Construct the dataclasses, blaming `label` for any rule that spans several keys."""
    try:
        return RunConfig(**{name: cls(**merged.get(name, {})) for name, cls in SECTIONS.items()})
    except UsageError as exc:
        raise UsageError(f"{label}: {exc}") from None


# ---------------------------------------------------------------------------
# Overrides: `section.key=value` strings from the command line.

def check_key(dotted):
    """(section, key) of a dotted `section.key` that names a setting, or a one-line
    UsageError: the sections when SECTION is not one, else the section's valid
    keys and a guess at the one meant. The caller adds where the key came from."""
    section, dot, key = str(dotted).strip().partition(".")
    if section not in SECTIONS:
        raise UsageError(f"the key must be SECTION.KEY with SECTION one of {', '.join(SECTIONS)}")
    if not dot or key not in _fields_by_name(section):
        raise UsageError(_unknown_key_message(section, key))
    return section, key


def parse_override_value(section, key, raw):
    """The value the text `raw` gives `section.key` in an override: read the way
    YAML would, within the YAML bounds, but kept literal where it names one of
    the key's choices (train.recompute=none is the mode, not null) or the key is
    a string. Not yet checked against the key: check_value does that. A
    UsageError (a value past the YAML bounds) names the key."""
    choices = _fields_by_name(section)[key].metadata.get("choices") or ()
    if raw.strip() in choices:
        return raw.strip()
    annotation = _field_types(section)[key]
    if raw.strip().lower() in ("none", "null", "~"):
        return None
    kinds = () if typing.get_origin(annotation) is list else \
        typing.get_args(annotation) or (annotation,)     # a list: `[a, b]` or `a,b`
    quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
    # `data.source=2024.txt` or `train.sample_prompt=yes` mean the text itself;
    # quoting (`'"\n"'`) opts into YAML escapes.
    if str in kinds and not quoted:
        return raw
    try:
        _check_yaml_bounds(raw, f"{section}.{key}")
        return yaml.safe_load(raw)
    except UsageError:
        raise
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError):
        return raw      # not YAML; the type check names it


def _parse_override(text):
    """Split `section.key=value` into (section, key, value, label) with the value
    typed by its field; a UsageError names the override."""
    label = f"override {_show(text, 200)}"
    if not isinstance(text, str) or "=" not in text:
        raise UsageError(f"{label}: expected KEY=VALUE, e.g. model.n_layer=4")
    dotted, _, raw = text.partition("=")
    try:
        section, key = check_key(dotted)
        return section, key, parse_override_value(section, key, raw), label
    except UsageError as exc:
        raise UsageError(f"{label}: {exc}") from None


def check_override(text):
    """(dotted key, value) of one `section.key=value` override, its value checked
    against that key alone (type, range, choices), or a one-line UsageError
    naming the key; rules that relate several keys wait for load_config."""
    section, key, value, _ = _parse_override(text)
    return f"{section}.{key}", check_value(section, key, value)


def _apply_overrides(merged, overrides):
    by_section = {}
    for text in overrides:
        section, key, value, label = _parse_override(text)
        values, labels = by_section.setdefault(section, ({}, {}))
        values[key], labels[key] = value, label
    for section, (values, labels) in by_section.items():
        _apply_values(merged, section, values, labels)


# ---------------------------------------------------------------------------
# Public entry points.

def load_config(name_or_path=None, overrides=(), notify=None):
    """Read a shipped config by name (default: "default") or a YAML file, then apply overrides.

    A layer that shortens train.max_iters below the warmup_iters or
    lr_decay_iters of the layers under it, without setting those itself,
    has them scaled to fit (see `_fit_schedule`); notify(text) is told.
    """
    if isinstance(overrides, str):     # one override, not its characters
        overrides = (overrides,)
    merged = {}
    layers = _read_layers(DEFAULT_CONFIG if name_or_path is None else name_or_path)
    train_keys = []     # per layer, {train key it sets: label to blame}
    for label, document in layers:
        before = dict(merged.get("train", {}))
        _apply_document(merged, document, label)
        train = document.get("train")
        train_keys.append({key: label for key in train} if isinstance(train, dict) else {})
        _fit_schedule(merged, before, set(train_keys[-1]), notify)
    before = dict(merged.get("train", {}))
    _apply_overrides(merged, overrides)
    train_keys.append({str(text).partition("=")[0].strip().partition(".")[2]: f"override {_show(text, 200)}"
                       for text in overrides if str(text).strip().startswith("train.")})
    _fit_schedule(merged, before, set(train_keys[-1]), notify)
    label = layers[-1][0] + (" with overrides" if overrides else "")
    config = _build(merged, label)
    _check_muon_keys_apply(config.train.optimizer, train_keys)
    return config


def config_files(name_or_path=None):
    """The files a config is read from, as load_config reads them: its `base:`
    chain, oldest first, then the config itself (a shipped config is its file
    in the package). A command counts them all among its inputs, so that no
    output of it is written over one."""
    return [Path(label) for label, _ in
            _read_layers(DEFAULT_CONFIG if name_or_path is None else name_or_path)]


def _check_muon_keys_apply(optimizer, train_keys):
    """Refuse a Muon key (train.muon_*) that would be ignored: set by a layer (a
    file, or the overrides together) that does not choose train.optimizer
    itself, with no later layer choosing it, while the optimizer is adamw. A
    layer that chooses the optimizer keeps its Muon keys: a saved run config
    spells out every key, and `train.optimizer=adamw` over a Muon config
    switches optimizers on purpose."""
    if optimizer != "adamw":
        return
    for keys in reversed(train_keys):
        if "optimizer" in keys:
            return
        muon = [key for key in _fields_by_name("train") if key.startswith("muon_") and key in keys]
        if muon:
            raise UsageError(f"{keys[muon[0]]}: train.{muon[0]} is set but train.optimizer is adamw "
                             f"(Muon's keys apply with train.optimizer=muon)")


def _fit_schedule(merged, before, named, notify):
    """Scale warmup_iters and lr_decay_iters to a run that a layer made shorter.

    `xpmodel train train.max_iters=60` over a config with warmup_iters: 100
    means "the same run, shorter": a warmup or decay longer than the new run
    is scaled by its new length over its old (100 of 700 steps becomes 9 of
    60); one that fits is kept. A value the same layer sets is the user's and
    is never changed; a conflict then is an error.
    """
    if "max_iters" not in named:
        return
    train = merged.setdefault("train", {})
    steps = train.get("max_iters")
    if steps is None:
        return
    defaults = {spec.name: spec.default for spec in dataclasses.fields(TrainConfig)}
    old_steps = before.get("max_iters", defaults["max_iters"])
    scale = steps / old_steps if old_steps and old_steps > steps else None
    changed = []
    warmup = train.get("warmup_iters", defaults["warmup_iters"])
    if "warmup_iters" not in named and warmup > steps:
        warmup = min(steps, round(warmup * scale)) if scale else steps // 10
        train["warmup_iters"] = warmup
        changed.append(f"train.warmup_iters={warmup}")
    decay = train.get("lr_decay_iters", defaults["lr_decay_iters"])
    if "lr_decay_iters" not in named and decay is not None and decay > steps:
        decay = max(warmup, min(steps, round(decay * scale))) if scale else steps
        train["lr_decay_iters"] = decay
        changed.append(f"train.lr_decay_iters={decay}")
    if changed and notify is not None:
        notify(f"note: train.max_iters={steps} is shorter than the schedule it was given, so "
               f"{' and '.join(changed)} (the same share of the run; set them to choose)")


def config_to_dict(config):
    """The config as plain {section: {key: value}} data, in field order."""
    return {name: dataclasses.asdict(getattr(config, name)) for name in SECTIONS}


def config_to_yaml(config):
    """The config as YAML text, every key spelled out in field order, that
    load_config reads back equal: what save_config writes and the metric
    mirrors (train/mirrors.py) show."""
    return ("# xpmodel run config, complete: every key is spelled out.\n"
            + yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True))


def save_config(config, path):
    """Write config_to_yaml(config) to `path`, atomically."""
    atomic_write_bytes(Path(path), config_to_yaml(config).encode("utf-8"))
