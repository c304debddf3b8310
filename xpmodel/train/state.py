"""What a checkpoint holds: the weights, the optimizer's state, and everything
else that decides the next step's result (dropout pass count, sampler
position, loss scale, counters), so a resumed run repeats an uninterrupted
one exactly on CPU. Weights that are not finite are never saved.

A checkpoint also records a fingerprint of the tokens the run trains and
validates on, so a resume on a corpus that changed since is refused instead
of continuing on other data; checkpoints from before the fingerprint existed
are compared by their token count alone.

best.safetensors is replaced only by a model with a lower validation loss
than the one it holds: after a resume that fell back to an older checkpoint
(whose best_val predates the file), the file is not overwritten by a worse
model. The run's own best_val, which decides what counts as an improvement,
stays the checkpoint's, so a resumed run repeats an uninterrupted one."""
import hashlib
import math

import numpy

from ..backend import to_device, to_host
from ..config import config_to_dict
from ..errors import CheckpointError, DataError, XpmodelError, counted, quote
from .checkpoint import save_checkpoint
from .rundir import saved_optimizer

# Token streams up to this many bytes are hashed whole; larger ones by their
# length and _SAMPLED_BLOCKS evenly spaced blocks, which reads at most 64 MiB.
_FULL_HASH_BYTES = 256 * 2**20
_SAMPLED_BLOCKS = 1024
_BLOCK_BYTES = 64 * 2**10
_HASH_CHUNK_BYTES = 16 * 2**20


class CheckpointState:
    """The Trainer's checkpoint writing and reading."""

    def _meta(self):
        return {
            "step": self.step, "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed_before + self._elapsed(),
            "optimizer_steps": self.optimizer.step_count,
            "dropout_calls": self.model.dropout_calls,
            "sampler": self.sampler.state_dict(),
            "loss_scaler": self.scaler.state_dict() if self.scaler else None,
            "best_val": None if math.isinf(self.best_val) else self.best_val,
            "last_val": self.last_val,
            "evals_without_improvement": self.evals_without_improvement,
            "epoch": self.sampler.epochs_done,
            "total_steps": self.total_steps,
            "train_loss": self.last_train_loss,
            "val_loss": self.last_val, "val_loss_step": self.last_val_step,
            "interval_train_loss_sum": self.interval_loss[0],
            "interval_train_steps": self.interval_loss[1],
            "world_size": 1 if self.dist is None else self.dist.world_size,
            "shards": self._shard_count(),
            "config": config_to_dict(self.config),
            "vocab_size": self.gpt_config.vocab_size,
            "tokenizer_fingerprint": self.tokenizer.fingerprint(),
            "data_fingerprint": self.data_fingerprint(),
        }

    def data_fingerprint(self):
        """A hex sha256 of the train and validation tokens (computed once)."""
        if self._data_fingerprint is None:
            self._data_fingerprint = tokens_fingerprint(self.train_tokens, self.val_tokens)
        return self._data_fingerprint

    def save(self, path=None):
        """Write a checkpoint (rank 0 only), refusing to save non-finite weights."""
        if not self.is_main:
            return None
        path = path or self.run_dir.step_path(self.step)
        is_best = path == self.run_dir.best_path
        if is_best and self.best_file_val is not None and not self.best_val < self.best_file_val:
            return None   # the file holds a model at least as good (from before a fallback)
        foreign = self.run_dir.foreign_checkpoint_file(path)
        if foreign:
            raise XpmodelError(f"could not write checkpoint {path}: the entry of that name {foreign}; "
                               f"it is kept, and the previous checkpoint is intact: move it away, "
                               f"then xpmodel train --resume {self.run_dir.path}")
        try:
            self._write_checkpoint(path)
        except OSError as exc:
            raise XpmodelError(f"could not write checkpoint {path}: {exc.strerror or exc}; "
                               f"the previous checkpoint is intact") from None
        if is_best:
            self.best_file_val = self.best_val
        else:
            self.saved_step = self.step
            self.prune_checkpoints(written=path)
        if self._display is not None:
            self._display.print(f"checkpoint saved at step {self.step}: {path}")
        return path

    def save_first(self, path):
        """The step-0 checkpoint of the run being created (RunDir.create, which
        names a failure to write it)."""
        self._write_checkpoint(path)
        self.saved_step = self.step

    def _write_checkpoint(self, path):
        if not self._weights_finite():
            raise XpmodelError(f"step {self.step}: weights hold NaN or Inf; not saving over the "
                               f"last good checkpoint")
        optim = {name: to_host(state) for name, state in self.optimizer.state_arrays().items()}
        save_checkpoint(path, self.model.state_arrays(), optim, self._meta())

    def _weights_finite(self):
        """Whether every weight is finite: one dot product, and where that
        overflows (finite weights above about 1e19 in float32), a look at each."""
        xp, flat = self.model.xp, self.model.flat_params
        with numpy.errstate(over="ignore", invalid="ignore"):
            if bool(xp.isfinite(xp.dot(flat, flat))):
                return True
        return bool(xp.isfinite(flat).all())

    def prune_checkpoints(self, written=None):
        """RunDir.prune_checkpoints with the run's train.keep_last and config."""
        self.run_dir.prune_checkpoints(self.config.train.keep_last, written=written,
                                       resumed_from=self.resumed_from, config=self.config,
                                       already_read=self.checkpoints_read)

    def _load(self, header):
        """Continue from the checkpoint of `header` (a CheckpointHeader): its
        tensors are read once, after every check its metadata allows."""
        path, meta = header.path, header.meta
        if meta.get("kind") == "imported":
            _, params, _ = header.load(self.model.layout.shapes, {})
            self.model.load_state_arrays(params)   # weights only: a fresh start from them
            self.saved_step, self.resumed_from = 0, path
            return
        saved, wanted = saved_optimizer(meta), self.config.train.optimizer
        if saved != wanted:
            raise CheckpointError(f"{path}: saved with train.optimizer={saved}, resumed with "
                                  f"{wanted}; resume with train.optimizer={saved}")
        if meta.get("tokenizer_fingerprint") != self.tokenizer.fingerprint():
            raise CheckpointError(f"{path}: saved with a different tokenizer than {self.run_dir.tokenizer_path}")
        self._check_same_data(path, meta)
        world = 1 if self.dist is None else self.dist.world_size
        saved_by = meta.get("world_size", 1)
        if saved_by != world:
            how = "without mpirun" if saved_by == 1 else f"with mpirun -n {saved_by}"
            raise CheckpointError(f"{path}: saved by {counted(saved_by, 'rank')}, "
                                  f"resumed with {world}; resume {how}")
        _, params, optim = header.load(self.model.layout.shapes, self.optimizer.state_sizes())
        self._note_other_shard_count(meta)
        try:
            self.model.load_state_arrays(params)
            self.optimizer.load_state_arrays(
                {name: to_device(numpy.asarray(state, dtype=self.model.dtype), self.device)
                 for name, state in optim.items()}, meta["optimizer_steps"])
            self.model.dropout_calls = int(meta["dropout_calls"])
            self.sampler.load_state_dict(meta["sampler"])
            if self.scaler and meta.get("loss_scaler"):
                self.scaler.load_state_dict(meta["loss_scaler"])
            self.step = int(meta["step"])
            self.tokens_seen = int(meta["tokens_seen"])
            self.elapsed_before = float(meta["elapsed"])
            self.best_val = math.inf if meta.get("best_val") is None else float(meta["best_val"])
            self.last_val = None if meta.get("last_val") is None else float(meta["last_val"])
            self.evals_without_improvement = int(meta["evals_without_improvement"])
            self.last_val_step = meta.get("val_loss_step")
            self.last_train_loss = meta.get("train_loss")
            self.interval_loss = [float(meta.get("interval_train_loss_sum", 0.0)),
                                  int(meta.get("interval_train_steps", 0))]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: incompatible checkpoint ({exc})") from None
        self.saved_step = self.step   # the file holds exactly this state
        self.resumed_from = path
        self.best_file_val = self._best_file_val()

    def _shard_count(self):
        """The CPU shards this rank splits its part of each batch into."""
        batch = self.config.train.batch_size
        start, stop = (0, batch) if self.dist is None else self.dist.shard(batch)
        return self.model.shard_count(stop - start)

    def _note_other_shard_count(self, meta):
        """Say so when this process splits a batch into another number of CPU
        shards than the checkpoint's did: the run goes on, but its float sums
        (so its losses, in their last bits) differ from an uninterrupted run's."""
        saved, now = meta.get("shards"), self._shard_count()
        if saved is not None and saved != now:
            self._say(f"note: this run split each batch into {saved} CPU shards (one per thread) "
                      f"and now splits it into {now}; it resumes, but not bit for bit: set "
                      f"XPMODEL_NUM_THREADS={saved} for that")

    def _check_same_data(self, path, meta):
        """Refuse to continue a run on tokens other than those it trained on."""
        saved = meta.get("data_fingerprint")
        sampler = meta.get("sampler") or {}
        if saved is not None:
            changed = saved != self.data_fingerprint()
        else:   # saved before the fingerprint existed: the token count is all there is
            changed = sampler.get("tokens", len(self.train_tokens)) != len(self.train_tokens)
        if changed:
            source = quote(self.config.data.source, 80)
            raise DataError(f"{path}: the training data changed since this checkpoint was saved "
                            f"(data.source {source} now gives other tokens); put the old corpus "
                            f"back to resume, or train on the new data from this run's weights "
                            f"with --init-from {self.run_dir.path} --out NEW_RUN")

    def _best_file_val(self):
        """The validation loss best.safetensors holds, or None when it does not read cleanly."""
        header, _ = self.run_dir.read_checkpoint(self.run_dir.best_path)
        value = None if header is None else header.meta.get("best_val")
        return value if type(value) in (int, float) else None


def tokens_fingerprint(train_tokens, val_tokens):
    """A hex sha256 of a run's train and validation tokens, as its checkpoints
    record it ("data_fingerprint")."""
    digest = hashlib.sha256(b"xpmodel-data-v1")
    for name, tokens in (("train", train_tokens), ("val", val_tokens)):
        _hash_tokens(digest, name, tokens)
    return digest.hexdigest()


def _hash_tokens(digest, name, tokens):
    """Add a token stream to `digest`: whole when small, else sampled blocks."""
    data = numpy.ascontiguousarray(tokens).reshape(-1)   # a view of a contiguous memmap
    raw = data.view(numpy.uint8)   # (bytes,) hashed in place, a chunk at a time
    digest.update(f"\0{name}\0{data.dtype.str}\0{len(data)}\0".encode())
    if raw.size <= _FULL_HASH_BYTES:
        for start in range(0, raw.size, _HASH_CHUNK_BYTES):
            digest.update(raw[start:start + _HASH_CHUNK_BYTES])
        return
    for start in numpy.linspace(0, raw.size - _BLOCK_BYTES, _SAMPLED_BLOCKS).astype(numpy.int64):
        digest.update(raw[start:start + _BLOCK_BYTES])
