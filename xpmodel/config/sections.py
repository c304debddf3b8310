"""The three sections of a run config, `data`, `model` and `train`, and
`RunConfig`, which holds them; their keys looked up by name.

Each field is a setting (fields.py) with a comment saying what it means. Each
dataclass checks itself on construction: every field alone, then the rules
that relate several keys of its section (the heads divide the width, the
warmup fits the run, weight decay neither zeroes nor flips the weights, the
Newton-Schulz coefficients keep every singular value bounded), so a config
built in code is held to the same rules as one read from YAML.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from ..backend import KERNELS
from ..checks import (HALF_OPEN_UNIT, NON_NEGATIVE, OPEN_UNIT, POSITIVE, POSITIVE_FRACTION,
                      ROPE_THETAS, Range)
from ..errors import UsageError, one_line, quote
from ..ns_coefficients import check_ns_coefficients, parse_ns_coefficients
from ..options import (ADJUST_LR, MAX_VOCAB, MLPS, NOISE_KINDS, NORMS, POSITIONS, SCHEDULES,
                       TOKEN_DROPOUT_MODES)
from .fields import check_field, check_fields, fields_of, setting, types_of

TOKENIZERS = ("bpe", "byte")
BATCHINGS = ("random", "epochs")
PRECISIONS = ("fp32", "fp16", "bf16")
OPTIMIZERS = ("adamw", "muon")
LOG_TO = ("tensorboard", "wandb")      # train.log_to: mirrors of metrics.jsonl (train/mirrors.py)

# train.peak_flops is in FLOP/s; below this (0.1 TFLOP/s) it was surely meant in other units.
MIN_PEAK_FLOPS = 1e11
# Sequences per batch, and batches per evaluation, far beyond any machine's
# memory: refused here, naming the key, before anything is allocated (the
# trainer also measures the batch arrays against this machine's memory).
MAX_BATCH_SIZE = 1 << 24
MAX_EVAL_BATCHES = 1 << 24
# Micro-batches per optimizer step, bounded as the batch size is: a step of more never ends.
MAX_GRAD_ACCUM = 1 << 24
# The largest train.embedding_noise: NEFTune's alpha is typically 5 to 15, so
# a bound 100 times that refuses only a value typed in error.
MAX_EMBEDDING_NOISE = 1000.0
# The largest train.seed: a checkpoint's sampler state holds it as a signed 64-bit count.
MAX_SEED = 2**63 - 1


def names_tokenizer_file(tokenizer):
    """Whether a data.tokenizer value is a tokenizer file's path rather than a kind
    (bpe, byte): one that holds a / or ends in .json, so a misspelt kind is refused
    as one, not looked for as a file."""
    return "/" in tokenizer or tokenizer.endswith(".json")


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens and batches."""
    # a file, folder, glob, or built-in corpus name
    source: str = "shakespeare"
    # "bpe": learned from the corpus (and cached); "byte": the 256-symbol byte tokenizer;
    # or a tokenizer file (a path holding a / or ending in .json), such as
    # `xpmodel tokenizer train --out` writes
    tokenizer: str = "bpe"
    # BPE vocabulary size; ignored for "byte" and a tokenizer file
    vocab_size: int = setting(4096, within=Range(low=256))
    # share of the tokens held out for validation
    val_fraction: float = setting(0.1, within=OPEN_UNIT)
    # "random": nanoGPT-style random windows; "epochs": every window once per epoch
    batching: str = setting("random", choices=BATCHINGS)
    # epochs batching: cut each epoch's windows at a new random offset
    crop_augment: bool = False
    # chance an input token is replaced (augmentation); the target stays
    token_dropout: float = setting(0.0, within=HALF_OPEN_UNIT)
    # "random": by a uniformly drawn id; "mask": by the tokenizer's reserved <|mask|> id
    token_dropout_mode: str = setting("random", choices=TOKEN_DROPOUT_MODES)
    # where tokenized corpora are cached; None: the default cache directory
    cache_dir: str | None = None

    def __post_init__(self):
        check_fields(self, "data")
        if self.tokenizer not in TOKENIZERS and not names_tokenizer_file(self.tokenizer):
            raise UsageError(f"data.tokenizer must be one of bpe, byte or a tokenizer file (a path holding "
                             f"a / or ending in .json, as `xpmodel tokenizer train --out` writes); "
                             f"got {quote(self.tokenizer, 60)}")
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
    n_layer: int = setting(6, within=POSITIVE)
    # attention heads per block
    n_head: int = setting(8, within=POSITIVE)
    # C, the residual stream width
    n_embd: int = setting(256, within=POSITIVE)
    # T, the longest context the model sees
    block_size: int = setting(128, within=POSITIVE)
    # dropout on attention weights, residual branches and embeddings
    dropout: float = setting(0.0, within=HALF_OPEN_UNIT)
    # embedding rows; None: the tokenizer's vocabulary size; larger pads it
    vocab_size: int | None = setting(None, within=Range(low=256))
    # "rmsnorm": x / rms(x) * w, without the mean or a bias
    norm: str = setting("layernorm", choices=NORMS)
    # the norms' denominator guard, at most 1 (more outweighs a unit-scale variance)
    norm_eps: float = setting(1e-5, within=POSITIVE_FRACTION)
    # "rope": rotary positions on q and k instead of a learned table
    position: str = setting("learned", choices=POSITIONS)
    # rotary base: head dimension pair j turns at rope_theta^(-2j/D) per position
    rope_theta: float = setting(10000.0, within=ROPE_THETAS)
    # RMSNorm of every q and k head (before the rotation)
    qk_norm: bool = False
    # the MLP's activation: "swiglu" gates it, "relu2" squares a ReLU
    mlp: str = setting("gelu", choices=MLPS)
    # MLP hidden width; None: 4 * n_embd, or for swiglu 8/3 * n_embd rounded up to 64
    mlp_hidden: int | None = setting(None, within=POSITIVE)
    # key/value heads (grouped-query attention); None: n_head
    n_kv_head: int | None = setting(None, within=POSITIVE)
    # biases on the projections and LayerNorms
    bias: bool = True
    # the output head shares the token embedding's weights
    tie_embeddings: bool = True

    def __post_init__(self):
        check_fields(self, "model")
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
    batch_size: int = setting(16, within=Range(0, MAX_BATCH_SIZE, low_inclusive=False))
    # micro-batches summed into one optimizer step
    grad_accum: int = setting(1, within=Range(0, MAX_GRAD_ACCUM, low_inclusive=False))
    # optimizer steps to run (set this or epochs)
    max_iters: int | None = setting(5000, within=POSITIVE)
    # passes over the training tokens (set this or max_iters)
    epochs: int | None = setting(None, within=POSITIVE)
    # peak learning rate
    lr: float = setting(3e-4, within=POSITIVE)
    # learning rate at the end of the decay
    min_lr: float = setting(3e-5, within=NON_NEGATIVE)
    # steps of linear warmup from 0 to lr
    warmup_iters: int = setting(100, within=NON_NEGATIVE)
    # step at which the decay reaches min_lr; None: the run's length
    lr_decay_iters: int | None = setting(None, within=POSITIVE)
    # learning-rate shape after warmup: cosine, linear, step, wsd (warmup-stable-decay) or constant
    schedule: str = setting("cosine", choices=SCHEDULES)
    # step: steps between drops of the rate by gamma; None: a third of the steps after warmup
    step_size: int | None = setting(None, within=POSITIVE)
    # step: the factor each drop multiplies the rate by
    gamma: float = setting(0.1, within=Range(0, 1, low_inclusive=False))
    # wsd: the share of the run (of lr_decay_iters) spent decaying at its end
    decay_fraction: float = setting(0.2, within=Range(0, 1, low_inclusive=False))
    # AdamW decoupled weight decay (applied to matrices only); lr * weight_decay must be below 1
    weight_decay: float = setting(0.1, within=NON_NEGATIVE)
    # AdamW first-moment decay
    beta1: float = setting(0.9, within=HALF_OPEN_UNIT)
    # AdamW second-moment decay
    beta2: float = setting(0.95, within=HALF_OPEN_UNIT)
    # AdamW denominator guard, at most 1 (more outweighs the gradients' scale)
    eps: float = setting(1e-8, within=POSITIVE_FRACTION)
    # "muon": Muon for the blocks' attention and MLP matrices, AdamW at lr for the rest
    optimizer: str = setting("adamw", choices=OPTIMIZERS)
    # Muon's peak learning rate; the schedule scales it as it scales lr
    muon_lr: float = setting(0.02, within=POSITIVE)
    # Muon's momentum (a running average of gradients)
    muon_momentum: float = setting(0.95, within=HALF_OPEN_UNIT)
    # Nesterov momentum: orthogonalise G + mu (M - G) instead of M
    muon_nesterov: bool = True
    # Newton-Schulz iterations per step
    muon_ns_steps: int = setting(5, within=Range(1, 99))
    # Newton-Schulz coefficients: jordan, cubic, or three numbers "a,b,c" that keep every
    # singular value in (0, 2] through muon_ns_steps iterations (ns_coefficients.py)
    muon_ns_coefficients: str = "jordan"
    # Muon's decoupled weight decay; muon_lr * muon_weight_decay must be below 1
    muon_weight_decay: float = setting(0.0, within=NON_NEGATIVE)
    # Muon's per-shape rate: original sqrt(max(1, out/in)) | match_rms_adamw 0.2 sqrt(max(in, out))
    muon_adjust_lr: str = setting("original", choices=ADJUST_LR)
    # global gradient-norm limit; 0 = off
    grad_clip: float = setting(1.0, within=NON_NEGATIVE)
    # NEFTune alpha: noise of size alpha / sqrt(T * C) on the input embeddings in training; 0 = off
    embedding_noise: float = setting(0.0, within=Range(0, MAX_EMBEDDING_NOISE))
    # that noise's distribution: uniform in [-1, 1] (NEFTune's) or gaussian, times the size
    embedding_noise_kind: str = setting("uniform", choices=NOISE_KINDS)
    # steps between validation-loss estimates
    eval_interval: int = setting(500, within=POSITIVE)
    # batches averaged per loss estimate
    eval_batches: int = setting(20, within=Range(0, MAX_EVAL_BATCHES, low_inclusive=False))
    # steps between printed samples; 0 = off
    sample_interval: int = setting(500, within=NON_NEGATIVE)
    # text the samples continue
    sample_prompt: str = "\n"
    # tokens generated per sample
    sample_tokens: int = setting(200, within=POSITIVE)
    # softmax temperature of those samples; 0 = greedy (always the likeliest token)
    sample_temperature: float = setting(0.8, within=NON_NEGATIVE)
    # draw only among the k likeliest tokens; None: all of them
    sample_top_k: int | None = setting(200, within=POSITIVE)
    # nucleus sampling: the fewest likeliest tokens whose probability reaches p; None: off
    sample_top_p: float | None = setting(None, within=Range(0, 1, low_inclusive=False))
    # steps between checkpoints
    save_interval: int = setting(1000, within=POSITIVE)
    # periodic checkpoints kept on disk
    keep_last: int = setting(3, within=POSITIVE)
    # steps between log lines
    log_interval: int = setting(10, within=POSITIVE)
    # evaluations without a better val loss before stopping; 0 = off
    early_stop_patience: int = setting(0, within=NON_NEGATIVE)
    # steps between per-layer health records (gradient norm, update/weight ratio); 0 = off
    health_interval: int = setting(100, within=NON_NEGATIVE)
    # "fp16": float16 compute with loss scaling; "bf16": bfloat16 compute, no loss
    # scaling (float32 master weights and statistics in both)
    precision: str = setting("fp32", choices=PRECISIONS)
    # CUDA: "fused" kernels, or "xp": every layer's own xp code on CuPy
    kernels: str = setting("fused", choices=KERNELS)
    # FLOP/s (not TFLOP/s; at least MIN_PEAK_FLOPS) that MFU is measured against; None: the
    # GPU's dense fp16/bf16 tensor-core peak from xpmodel/train/peak_flops.py (no MFU for
    # GPUs it lacks, or fp32)
    peak_flops: float | None = setting(None, within=POSITIVE)
    # activation memory for compute: "mlp" recomputes the MLP's hidden activations
    # in backward, "block" each whole block (about one more forward pass)
    recompute: str = setting("none", choices=("none", "mlp", "block"))
    # where metrics.jsonl's records, samples and the config are mirrored: tensorboard, wandb
    log_to: list[str] = field(default_factory=list, metadata={"choices": LOG_TO})
    # seeds weight init, batching and dropout
    seed: int = setting(1337, within=Range(0, MAX_SEED))
    # checkpoint or run directory to start from; None: fresh weights
    init_from: str | None = None

    def __post_init__(self):
        check_fields(self, "train")
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
            coefficients = parse_ns_coefficients(self.muon_ns_coefficients,
                                                 "train.muon_ns_coefficients")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        try:
            check_ns_coefficients(coefficients, self.muon_ns_steps)
        except ValueError as exc:
            raise UsageError(f"train.muon_ns_coefficients={quote(self.muon_ns_coefficients, 60)} cannot "
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
TOP_LEVEL_KEYS = ("base", *SECTIONS)


# ---------------------------------------------------------------------------
# Keys by name.

def check_value(section, key, value):
    """Return `value` converted to the type of `section.key`, or raise UsageError."""
    return check_field(SECTIONS[section], key, value, f"{section}.{key}")


def fields_by_name(section):
    return fields_of(SECTIONS[section])


def field_types(section):
    return types_of(SECTIONS[section])


def check_key(dotted):
    """(section, key) of a dotted `section.key` that names a setting, or a one-line
    UsageError: the sections when SECTION is not one, else the section's valid
    keys and a guess at the one meant. The caller adds where the key came from."""
    section, dot, key = str(dotted).strip().partition(".")
    if section not in SECTIONS:
        raise UsageError(f"the key must be SECTION.KEY with SECTION one of {', '.join(SECTIONS)}")
    if not dot or key not in fields_by_name(section):
        raise UsageError(unknown_key_message(section, key))
    return section, key


def unknown_key_message(section, key):
    valid = list(fields_by_name(section))
    if not isinstance(key, str):
        return (f"the key {_not_a_name(key)} under {section} is not a key name; valid {section} "
                f"keys: {', '.join(valid)}")
    guesses = _key_guesses(section, key)
    hint = f" (did you mean {' or '.join(guesses)}?)" if guesses else ""
    return f"unknown key {section}.{one_line(key, 60)}{hint}; valid {section} keys: {', '.join(valid)}"


def _key_guesses(section, key):
    """What an unknown `section.key` most likely meant: the key itself in other
    sections (as section.key), else the closest key of its own section, else
    the closest key of another section (as section.key)."""
    others = [name for name in SECTIONS if name != section]
    if any(key in fields_by_name(name) for name in others):
        return [f"{name}.{key}" for name in others if key in fields_by_name(name)]
    close = difflib.get_close_matches(key, list(fields_by_name(section)), n=1)
    if close:
        return close
    close = difflib.get_close_matches(key, [field for name in others for field in fields_by_name(name)], n=1)
    return [f"{name}.{close[0]}" for name in others if close and close[0] in fields_by_name(name)]


def unknown_section_message(section):
    shown = quote(section, 60) if isinstance(section, str) else _not_a_name(section)
    return f"unknown section {shown}; valid top-level keys: {', '.join(TOP_LEVEL_KEYS)}"


def _not_a_name(key):
    """A mapping key that YAML did not read as text (`1:`, `null:`, `true:`, a
    date), shown as written with what YAML made of it."""
    if key is None or isinstance(key, bool):
        written, kind = {None: "null", True: "true", False: "false"}[key], \
            "null" if key is None else "a boolean"
    else:
        written = quote(str(key), 60).strip("'\"")
        kind = {int: "a number", float: "a number"}.get(type(key), f"a {type(key).__name__}")
    return f"{written} (YAML reads it as {kind}, not text)"
