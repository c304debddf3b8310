"""What a checkpoint holds: the weights, the optimizer's state, and everything
else that decides the next step's result (dropout pass count, sampler
position, loss scale, counters), so a resumed run repeats an uninterrupted
one exactly on CPU. Weights that are not finite are never saved."""
import math

import numpy

from ..backend import to_device, to_host
from ..config import config_to_dict
from ..errors import CheckpointError, XpmodelError
from .checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint


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
            "train_loss": self.last_train_loss,
            "val_loss": self.last_val, "val_loss_step": self.last_val_step,
            "interval_train_loss_sum": self.interval_loss[0],
            "interval_train_steps": self.interval_loss[1],
            "world_size": 1 if self.dist is None else self.dist.world_size,
            "config": config_to_dict(self.config),
            "vocab_size": self.gpt_config.vocab_size,
            "tokenizer_fingerprint": self.tokenizer.fingerprint(),
        }

    def save(self, path=None):
        """Write a checkpoint (rank 0 only), refusing to save non-finite weights."""
        if not self.is_main:
            return None
        xp = self.model.xp
        if not bool(xp.isfinite(xp.dot(self.model.flat_params, self.model.flat_params))):
            raise XpmodelError(f"step {self.step}: weights hold NaN or Inf; not saving over the "
                               f"last good checkpoint")
        path = path or self.run_dir.step_path(self.step)
        optim = {name: to_host(state) for name, state in self.optimizer.state_arrays().items()}
        try:
            save_checkpoint(path, self.model.state_arrays(), optim, self._meta())
        except OSError as exc:
            raise XpmodelError(f"could not write checkpoint {path}: {exc.strerror or exc}; "
                               f"the previous checkpoint is intact") from None
        if path != self.run_dir.best_path:
            self.run_dir.prune_checkpoints(self.config.train.keep_last)
        if self._display is not None:
            self._display.print(f"checkpoint saved at step {self.step}: {path}")
        return path

    def _load(self, path):
        document = read_checkpoint_meta(path)
        if document.get("kind") == "imported":
            _, params, _ = load_checkpoint(path, self.model.layout.shapes, {})
            self.model.load_state_arrays(params)   # weights only: a fresh start from them
            return
        saved, wanted = _saved_optimizer(document), self.config.train.optimizer
        if saved != wanted:
            raise CheckpointError(f"{path}: saved with train.optimizer={saved}, resumed with "
                                  f"{wanted}; resume with train.optimizer={saved}")
        meta, params, optim = load_checkpoint(path, self.model.layout.shapes,
                                              self.optimizer.state_sizes())
        if meta.get("tokenizer_fingerprint") != self.tokenizer.fingerprint():
            raise CheckpointError(f"{path}: saved with a different tokenizer than {self.run_dir.tokenizer_path}")
        world = 1 if self.dist is None else self.dist.world_size
        if meta.get("world_size", 1) != world:
            raise CheckpointError(f"{path}: saved by {meta.get('world_size')} ranks, resumed with "
                                  f"{world}; resume with mpirun -n {meta.get('world_size')}")
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


def _saved_optimizer(document):
    """train.optimizer of the config a checkpoint was saved with (adamw before Muon existed)."""
    config = document.get("config")
    train = config.get("train") if isinstance(config, dict) else None
    return train.get("optimizer", "adamw") if isinstance(train, dict) else "adamw"
