"""Split a token stream into train/val and cut it into (x, y) batches.

B is the batch size, T the block size (context length). Every batch is a
pair of int64 arrays x, y of shape (B, T), where y is x shifted left by one
token: the model reads x[b, :t+1] and is scored on predicting y[b, t].

Two training samplers, both resumable bit for bit from `state_dict()`:

- `EpochSampler` cuts the stream into non-overlapping windows of T+1
  tokens, visits them in a fresh random order each epoch and drops the
  windows that do not fill a whole batch. The order (and the crop offset)
  of epoch e come from a generator seeded by (seed, e), so its state is just
  (seed, epoch, position).
- `RandomWindowSampler` draws B window starts uniformly at random per batch,
  as nanoGPT does. Batch k uses a generator seeded by (seed, k), so its state
  is just (seed, step).

Augmentation, off by default: `random_crop` (EpochSampler) shifts where the
windows are cut by a random offset in [0, T) each epoch, so window borders
move between epochs (random windows start anywhere already, so they have no
crop). `token_dropout` = p replaces a fraction p of the INPUT ids, leaving
the targets as they were, from a generator seeded by the batch's place in
the stream: by ids drawn uniformly from [0, vocab_size) (mode "random"), or
by `mask_id`, an id the tokenizer reserves for it (mode "mask"). The model
must then predict each next token from a context with holes in it.

`eval_batches` gives the same evenly spaced windows on every call, so that
validation losses of different steps are comparable.
"""

import math
from typing import Iterator

import numpy

from ..errors import DataError, UsageError, counted
from ..options import TOKEN_DROPOUT_MODES

# Generator streams of one epoch in EpochSampler, kept apart by this tag.
_ORDER_STREAM = 0
_DROPOUT_STREAM = 1

# What a state saved before a key existed meant by its absence.
_STATE_DEFAULTS = {"token_dropout_mode": "random"}


def split_tokens(tokens, val_fraction: float = 0.1, *, block_size: int, source: str = "corpus"):
    """(train, val): the stream's first part and its last `val_fraction`, both contiguous views."""
    _require_positive_int("block_size", block_size)
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")
    total, window = len(tokens), block_size + 1
    if total < window:
        raise DataError(f"{source}: corpus has {total} tokens, fewer than block_size + 1 = {window}")
    n_val = int(round(total * val_fraction))
    train, val = tokens[: total - n_val], tokens[total - n_val :]
    if val_fraction > 0 and (len(val) < window or len(train) < window):
        enough = _fraction_holding(window, total)
        if total - int(round(total * enough)) < window:
            raise DataError(
                f"{source}: corpus has {total} tokens, too few for a training and a validation "
                f"split of block_size + 1 = {window} each; lower model.block_size, or set "
                f"data.val_fraction=0 to train without validation"
            )
        split, count = ("validation", len(val)) if len(val) < window else ("training", len(train))
        change = "raise" if len(val) < window else "lower"
        raise DataError(
            f"{source}: {split} split has {count} tokens, fewer than block_size + 1 = {window}; "
            f"{change} data.val_fraction from {val_fraction} to {enough:g}"
        )
    return train, val


def _fraction_holding(window, total):
    """The least fraction, rounded up to 3 significant digits, whose share of
    `total` tokens is at least `window`."""
    exact = window / total
    scale = 10.0 ** (2 - math.floor(math.log10(exact)))
    return math.ceil(exact * scale) / scale


def eval_batches(tokens, batch_size: int, block_size: int,
                 n_batches: int) -> Iterator[tuple[numpy.ndarray, numpy.ndarray]]:
    """n_batches (x, y) batches of windows spread evenly from the start to the end of `tokens`."""
    for name, value in (("batch_size", batch_size), ("block_size", block_size), ("n_batches", n_batches)):
        _require_positive_int(name, value)
    last_start = len(tokens) - (block_size + 1)
    if last_start < 0:
        raise DataError(f"evaluation split has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}")
    starts = numpy.linspace(0, last_start, num=batch_size * n_batches).round().astype(numpy.int64)  # (n_batches * B,)
    for batch in range(n_batches):
        yield _gather_windows(tokens, starts[batch * batch_size : (batch + 1) * batch_size], block_size)


class _Sampler:
    """What both samplers share: argument checks, window gathering, token dropout, state checks."""

    kind = ""

    def __init__(self, tokens, batch_size, block_size, seed, token_dropout, vocab_size,
                 token_dropout_mode="random", mask_id=None):
        _require_positive_int("batch_size", batch_size)
        _require_positive_int("block_size", block_size)
        if not isinstance(seed, (int, numpy.integer)) or seed < 0:
            raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
        if not 0.0 <= token_dropout < 1.0:
            raise UsageError(f"token_dropout must be in [0, 1), got {token_dropout}")
        if token_dropout_mode not in TOKEN_DROPOUT_MODES:
            raise UsageError(f"token_dropout_mode must be one of {', '.join(TOKEN_DROPOUT_MODES)}, "
                             f"got {token_dropout_mode!r}")
        if token_dropout > 0 and token_dropout_mode == "random" and not vocab_size:
            raise UsageError("token_dropout needs vocab_size to draw replacement ids from")
        if token_dropout > 0 and token_dropout_mode == "mask" and (
                not isinstance(mask_id, (int, numpy.integer)) or mask_id < 0
                or (vocab_size and mask_id >= vocab_size)):
            raise UsageError(f"token_dropout_mode mask needs the mask id, an id below vocab_size "
                             f"({vocab_size}); got {mask_id!r}")
        self.tokens = tokens  # (N,) ids, e.g. a memmap of a token file
        self.batch_size = int(batch_size)
        self.block_size = int(block_size)
        self.seed = int(seed)
        self.token_dropout = float(token_dropout)
        self.vocab_size = int(vocab_size) if vocab_size else None
        self.token_dropout_mode = token_dropout_mode
        self.mask_id = None if mask_id is None else int(mask_id)

    def _config(self) -> dict:
        return {
            "sampler": self.kind,
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "tokens": len(self.tokens),
            "token_dropout": self.token_dropout,
            "token_dropout_mode": self.token_dropout_mode,
        }

    def _check_state(self, state: dict) -> None:
        check_sampler_state(state)
        for key, value in self._config().items():
            saved = state.get(key, _STATE_DEFAULTS.get(key))
            if saved == value:
                continue
            if key == "tokens":
                raise UsageError(
                    f"the training data changed since the checkpoint: it was saved after training "
                    f"on {saved:,} tokens, and the corpus now gives {value:,}"
                )
            raise UsageError(
                f"sampler state was saved with {key}={saved!r}, but this run has {key}={value!r}"
            )

    def _batch(self, starts: numpy.ndarray, dropout_rng: numpy.random.Generator):
        x, y = _gather_windows(self.tokens, starts, self.block_size)
        if self.token_dropout > 0:
            dropped = dropout_rng.random(x.shape) < self.token_dropout  # (B, T)
            if self.token_dropout_mode == "mask":
                x[dropped] = self.mask_id
            else:
                x[dropped] = dropout_rng.integers(0, self.vocab_size, size=int(dropped.sum()))
        return x, y


class EpochSampler(_Sampler):
    """Every non-overlapping (T+1)-token window once per epoch, in a seeded random order."""

    kind = "epoch"

    def __init__(
        self,
        tokens,
        batch_size: int,
        block_size: int,
        seed: int = 0,
        *,
        random_crop: bool = False,
        token_dropout: float = 0.0,
        vocab_size: int | None = None,
        token_dropout_mode: str = "random",
        mask_id: int | None = None,
        source: str = "corpus",
    ):
        super().__init__(tokens, batch_size, block_size, seed, token_dropout, vocab_size,
                         token_dropout_mode, mask_id)
        self.random_crop = bool(random_crop)
        window = self.block_size + 1
        largest_offset = self.block_size - 1 if self.random_crop else 0
        fewest_windows = max(len(tokens) - largest_offset, 0) // window
        if fewest_windows < self.batch_size:
            cropped = " (with data.crop_augment's offsets)" if self.random_crop else ""
            raise DataError(
                f"{source}: the training split's {len(tokens):,} tokens make "
                f"{counted(fewest_windows, 'window')} of block_size + 1 = {window}{cropped}, fewer "
                f"than one batch of {self.batch_size} for data.batching=epochs; lower "
                f"train.batch_size or data.val_fraction, or use data.batching=random"
            )
        self.epoch = 0
        self.position = 0  # batches already served in this epoch
        self._layout_epoch = -1
        self._offset = 0
        self._order = numpy.empty(0, dtype=numpy.int64)  # (windows this epoch,) window indices in visiting order

    @property
    def batches_per_epoch(self) -> int:
        """Batches in the current epoch (random_crop can make it one window shorter)."""
        self._lay_out_epoch()
        return len(self._order) // self.batch_size

    @property
    def epochs_done(self) -> float:
        """Passes over the data so far: whole epochs plus the served share of this one."""
        return self.epoch + self.position / self.batches_per_epoch

    def epochs_after(self, batches: int) -> float:
        """The passes that `batches` batches from the start make (a crop's shorter
        epochs aside)."""
        return batches / self.batches_per_epoch

    def next_batch(self) -> tuple[numpy.ndarray, numpy.ndarray]:
        """The next (x, y), each (B, T) int64, moving on to a new epoch when this one is used up."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self._lay_out_epoch()
        B = self.batch_size
        windows = self._order[self.position * B : (self.position + 1) * B]  # (B,)
        starts = self._offset + windows * (self.block_size + 1)
        dropout_rng = numpy.random.default_rng([self.seed, self.epoch, _DROPOUT_STREAM, self.position])
        self.position += 1
        return self._batch(starts, dropout_rng)

    def state_dict(self) -> dict:
        """Where the sampler stands, as plain JSON-serialisable values."""
        return {**self._config(), "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the sampler that saved `state` stopped (its seed included)."""
        self._check_state(state)
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._layout_epoch = -1

    def _config(self) -> dict:
        return {**super()._config(), "random_crop": self.random_crop}

    def _lay_out_epoch(self) -> None:
        if self._layout_epoch == self.epoch:
            return
        rng = numpy.random.default_rng([self.seed, self.epoch, _ORDER_STREAM])
        self._offset = int(rng.integers(0, self.block_size)) if self.random_crop else 0
        n_windows = (len(self.tokens) - self._offset) // (self.block_size + 1)
        self._order = rng.permutation(n_windows)
        self._layout_epoch = self.epoch


class RandomWindowSampler(_Sampler):
    """B windows of T+1 tokens starting anywhere, drawn afresh for every batch."""

    kind = "random_window"

    def __init__(
        self,
        tokens,
        batch_size: int,
        block_size: int,
        seed: int = 0,
        *,
        token_dropout: float = 0.0,
        vocab_size: int | None = None,
        token_dropout_mode: str = "random",
        mask_id: int | None = None,
    ):
        super().__init__(tokens, batch_size, block_size, seed, token_dropout, vocab_size,
                         token_dropout_mode, mask_id)
        if len(tokens) < self.block_size + 1:
            raise DataError(f"{len(tokens)} tokens are fewer than block_size + 1 = {self.block_size + 1}")
        self.step = 0  # batches served so far

    @property
    def batches_per_epoch(self) -> int:
        """Random windows have no passes; an epoch is as many batches as hold the stream's tokens once."""
        return max(1, (len(self.tokens) - 1) // (self.batch_size * self.block_size))

    @property
    def epochs_done(self) -> float:
        """Passes over the data so far, counted as input tokens served / tokens in the stream."""
        return self.epochs_after(self.step)

    def epochs_after(self, batches: int) -> float:
        """The passes that `batches` batches of B*T input tokens make."""
        return batches * self.batch_size * self.block_size / len(self.tokens)

    def next_batch(self) -> tuple[numpy.ndarray, numpy.ndarray]:
        """The next (x, y), each (B, T) int64."""
        rng = numpy.random.default_rng([self.seed, self.step])
        # A window [s, s + T] must end inside the stream: s <= N - T - 1.
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)  # (B,)
        self.step += 1
        return self._batch(starts, rng)

    def state_dict(self) -> dict:
        """Where the sampler stands, as plain JSON-serialisable values."""
        return {**self._config(), "seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the sampler that saved `state` stopped (its seed included)."""
        self._check_state(state)
        self.seed, self.step = int(state["seed"]), int(state["step"])


class SamplerStateError(ValueError):
    """A saved sampler state that no sampler could have written: `key` is the
    field, `why` what it must be, `value` what it holds."""

    def __init__(self, key, why, value):
        super().__init__(f"sampler state: {key} {why}, got {value!r}")
        self.key, self.why, self.value = key, why, value


_STATE_COUNTS = {"epoch": ("seed", "epoch", "position"), "random_window": ("seed", "step")}
_COUNT_LIMIT = 2**63   # far beyond any real run; a bigger count is damage


def check_sampler_state(state) -> None:
    """Raise SamplerStateError unless `state` is one a sampler's state_dict()
    could have returned: known kind, sizes and counts of the right types and
    ranges, and an epoch position no further than the saved token count allows."""
    if not isinstance(state, dict):
        raise SamplerStateError("state", "must be a JSON object", state)
    kind = state.get("sampler")
    if kind not in _STATE_COUNTS:
        raise SamplerStateError("sampler", f"must be one of {', '.join(_STATE_COUNTS)}", kind)

    def count(key, least=0):
        value = state.get(key)
        if type(value) is not int or not least <= value < _COUNT_LIMIT:
            raise SamplerStateError(key, f"must be an integer from {least} to 2**63 - 1", value)
        return value

    batch_size, block_size = count("batch_size", 1), count("block_size", 1)
    tokens = count("tokens")
    if tokens < block_size + 1:
        raise SamplerStateError("tokens", f"must be at least block_size + 1 = {block_size + 1}", tokens)
    dropout = state.get("token_dropout")
    if type(dropout) not in (int, float) or not 0.0 <= dropout < 1.0:
        raise SamplerStateError("token_dropout", "must be a number in [0, 1)", dropout)
    if "token_dropout_mode" in state and state["token_dropout_mode"] not in TOKEN_DROPOUT_MODES:
        raise SamplerStateError("token_dropout_mode", f"must be one of {', '.join(TOKEN_DROPOUT_MODES)}",
                                state["token_dropout_mode"])
    if "random_crop" in state and type(state["random_crop"]) is not bool:
        raise SamplerStateError("random_crop", "must be true or false", state["random_crop"])
    for key in _STATE_COUNTS[kind]:
        count(key)
    if kind == "epoch":
        most = tokens // (block_size + 1) // batch_size   # batches in the longest epoch
        if state["position"] > most:
            raise SamplerStateError("position", f"must be at most {most}, the batches in an epoch of "
                                    f"{tokens} tokens", state["position"])


def _gather_windows(tokens, starts: numpy.ndarray, block_size: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    # One contiguous slice per row reads a memmap sequentially.
    windows = numpy.stack([numpy.asarray(tokens[start : start + block_size + 1]) for start in starts.tolist()])
    windows = windows.astype(numpy.int64, copy=False)  # (B, T+1)
    return numpy.ascontiguousarray(windows[:, :-1]), numpy.ascontiguousarray(windows[:, 1:])  # x, y: (B, T)


def _require_positive_int(name: str, value) -> None:
    if not isinstance(value, (int, numpy.integer)) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
