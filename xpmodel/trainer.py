"""The training loop: a run's config, data, model and optimizer, driven step by
step with evaluation, sampling, checkpoints and exact resume.

A step is `grad_accum` micro-batches of forward/backward, a global-norm clip,
a finiteness check, and one update (AdamW, or Muon with AdamW) at the
schedule's learning rate.
Everything that decides a step's result (weights, moments, optimizer step
count, dropout pass count, sampler position, loss scale) is in the
checkpoint, so a resumed run repeats an uninterrupted one exactly on CPU.

Faults: a non-finite loss or gradient in fp32 stops the run before the update,
and weights that are not finite are never saved, so the last checkpoint stays
good; in fp16 an overflow skips the step instead (see loss_scale.py). SIGINT
or SIGTERM finishes the current step, saves, and raises `Interrupted` (exit
130 / 143); a second one leaves at once. A kill at any other instant loses
at most `save_interval` steps, since every file is replaced atomically.
"""
import math
import os
import signal
import sys
import time

import numpy

from .backend import get_device, gpu_name, out_of_memory_errors, to_device, to_host
from .atomic import abandon_partial_writes
from .checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from .config import config_to_dict
from .corpus import build_tokenizer, load_tokens
from .data import EpochSampler, RandomWindowSampler, eval_batches, resolve_source
from .data.tokenfile import MAX_VOCAB_SIZE
from .display import TrainDisplay
from .errors import CheckpointError, UsageError, XpmodelError
from .generate import generate
from .loss_scale import LossScaler
from .model import GPT
from .model_config import OPTION_KEYS, gpt_config
from .optim import clipped_step, optimizer_for
from .rundir import RunDir, default_run_path
from .runs import adopt_pretrained, load_pretrained
from .schedule import schedule_from_config

_SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
# Dense fp16 tensor-core peaks (FLOP/s) for MFU, by GPU name.
_GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


class Interrupted(Exception):
    """A signal asked the run to stop; raised once the checkpoint is saved."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name
        self.exit_code = _SIGNAL_EXIT[signum]
        self.step = None
        self.checkpoint = None
        self.run_dir = None

    def __str__(self):
        if self.checkpoint is None:
            return f"stopped by {self.signal_name}"
        return (f"stopped by {self.signal_name} at step {self.step}; checkpoint saved to "
                f"{self.checkpoint}; continue with: xpmodel train --resume {self.run_dir}")


def model_config(config, tokenizer):
    vocab = config.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise UsageError(f"model.vocab_size={vocab} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} ids")
    return gpt_config(config.model, tokenizer.vocab_size)


def check_fits_in_memory(gpt_config, device):
    """Refuse, before allocating, a model whose training state cannot fit in
    host memory: weights, gradients and two AdamW moments in float32, one
    scratch buffer, and the float64 buffer the weights are drawn in."""
    if device.is_cuda:
        return   # CuPy reports its own out-of-memory, caught where it happens
    try:
        available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    n = gpt_config.num_params()
    needed = n * (5 * 4 + 8)
    if needed > available:
        raise UsageError(f"a model of {n:,} parameters needs about {needed / 2**30:,.1f} GiB to "
                         f"train, more than this machine's {available / 2**30:,.1f} GiB; lower "
                         f"model.n_layer, model.n_embd or model.vocab_size")


def make_schedule(train_config, total_steps):
    return schedule_from_config(train_config, total_steps)


class Trainer:
    """One run. `Trainer.start(...)` or `Trainer.resume(...)`, then `run()`."""

    def __init__(self, config, run, tokenizer, device, quiet=False, dist=None, show=True):
        self.config, self.run_dir, self.tokenizer = config, run, tokenizer
        self.device = get_device(device)
        self.dist = dist
        self.is_main = dist is None or dist.is_main
        t = config.train
        self.display_enabled = show and self.is_main
        self.quiet = quiet
        self._say = (lambda text: print(text, flush=True)) if self.display_enabled else (lambda text: None)

        self.gpt_config = model_config(config, tokenizer)
        check_fits_in_memory(self.gpt_config, self.device)
        self.train_tokens, self.val_tokens = load_tokens(
            config.data, tokenizer, config.model.block_size,
            show_progress=self.display_enabled and not quiet and sys.stdout.isatty())
        try:
            self.model = GPT(self.gpt_config, device=self.device, seed=t.seed, precision=t.precision,
                             kernels=t.kernels, recompute=t.recompute)
            self.optimizer = optimizer_for(self.model, t)   # AdamW, or Muon with AdamW
        except out_of_memory_errors() as exc:
            raise XpmodelError(f"out of {'GPU ' if self.device.is_cuda else ''}memory creating a "
                               f"model of {self.gpt_config.num_params():,} parameters "
                               f"({exc.__class__.__name__}): lower model.n_layer, model.n_embd "
                               f"or model.vocab_size") from None
        if dist is not None:
            if not dist.agree(config_to_dict(config)):
                raise UsageError("the ranks were started with different configs; launch every "
                                 "rank with the same command line")
            dist.broadcast_(self.model.flat_params)
            self.model.dropout_stream = dist.rank
        self.model.embedding_noise = (t.embedding_noise, t.embedding_noise_kind)
        self.scaler = LossScaler(xp=self.model.xp) if t.precision == "fp16" else None
        # GPU steps are queued without waiting; the host reads their results in batches
        self.defer_reads = self.device.is_cuda
        self.sampler = self._make_sampler()
        self.total_steps = self._count_steps()
        self.schedule = make_schedule(t, self.total_steps)
        self.step = 0
        self.tokens_seen = 0
        self.best_val = math.inf
        self.evals_without_improvement = 0
        self.elapsed_before = 0.0      # training seconds spent before this process
        self.last_val = None
        self.last_val_step = None
        self.last_train_loss = None    # the latest step's loss, kept in checkpoints
        self.interval_loss = [0.0, 0]  # [sum, count] of train losses since the last evaluation
        self._display = None           # run()'s display, which save() reports to
        self._stop_signal = None

    # ---- construction -----------------------------------------------------------
    @classmethod
    def start(cls, config, device="cpu", out=None, overwrite=False, quiet=False, dist=None,
              config_name="default", show=True):
        """A new run in `out`. Everything that can fail on bad input (device,
        data, model size) is checked before the run directory is written;
        the directory gets run.json only after its step-0 checkpoint."""
        is_main = dist is None or dist.is_main
        device = get_device(device)
        if dist is not None:
            dist.shard(config.train.batch_size)   # refuses a batch the ranks cannot split
        run = RunDir(out or default_run_path(config_name))
        if is_main:
            run.check_can_create(overwrite)
        if config.data.tokenizer == "bpe" and config.data.vocab_size > MAX_VOCAB_SIZE:
            raise UsageError(f"data.vocab_size={config.data.vocab_size} is more ids than a token "
                             f"file holds ({MAX_VOCAB_SIZE:,})")
        pretrained = None
        if config.train.init_from:
            pretrained = load_pretrained(config.train.init_from)
            source_config, _, tokenizer = pretrained
            taken = {k: getattr(source_config, k) for k in ("n_layer", "n_head", "n_embd", "block_size",
                                                            *OPTION_KEYS)}
            ignored = [f"model.{k}={getattr(config.model, k)}" for k, v in taken.items()
                       if getattr(config.model, k) not in (None, v)]
            if ignored and show and is_main:
                print(f"--init-from {config.train.init_from}: the model shape comes from the "
                      f"source; ignoring {', '.join(ignored)}")
            config = adopt_pretrained(config, source_config, tokenizer)
        else:
            tokenizer = build_tokenizer(config.data, say=print if (show and is_main) else (lambda s: None))
        trainer = cls(config, run, tokenizer, device, quiet=quiet, dist=dist, show=show)
        if pretrained is not None:
            trainer.model.load_state_arrays(pretrained[1])
        if is_main:
            run.create(config, tokenizer, overwrite=overwrite, first_checkpoint=trainer.save)
        if dist is not None:
            dist.barrier()
        if pretrained is not None:
            trainer._say(f"initialised weights from {config.train.init_from}")
        return trainer

    @classmethod
    def resume(cls, path, device="cpu", overrides_config=None, quiet=False, dist=None, show=True):
        run = RunDir(path)
        run.require_run("--resume")
        config = overrides_config or run.load_config()
        tokenizer = run.load_tokenizer()
        trainer = cls(config, run, tokenizer, device, quiet=quiet, dist=dist, show=show)
        checkpoint = None
        problems = []
        for candidate, problem in run.checkpoints_newest_first():
            if problem is None:
                try:
                    trainer._load(candidate)
                    checkpoint = candidate
                    break
                except CheckpointError as exc:
                    problem = str(exc)
            problems.append(problem)
            trainer._say(f"skipping checkpoint: {problem}")
        if checkpoint is None:
            if problems:
                raise CheckpointError(f"--resume {path}: no usable checkpoint; the newest: "
                                      f"{problems[0]}")
            raise CheckpointError(f"--resume {path}: the run has no checkpoint to resume from; "
                                  f"start it again with --out {path} --overwrite")
        if trainer.is_main:
            run.remove_stale_temporaries()
            run.truncate_metrics(trainer.step)
        trainer._say(f"resumed {path} at step {trainer.step} from {checkpoint.name}")
        return trainer

    def _make_sampler(self):
        d, t, T = self.config.data, self.config.train, self.config.model.block_size
        mask_id = self.tokenizer.mask_id
        if d.token_dropout_mode == "mask" and mask_id is None:
            raise UsageError("data.token_dropout_mode=mask needs a tokenizer that reserves "
                             "<|mask|>; this run's tokenizer (from --init-from or an earlier "
                             "run) has none: use data.token_dropout_mode=random, or start from "
                             "fresh weights so the tokenizer is built with it")
        common = dict(token_dropout=d.token_dropout, vocab_size=self.tokenizer.vocab_size,
                      token_dropout_mode=d.token_dropout_mode, mask_id=mask_id)
        if d.batching == "epochs":
            return EpochSampler(self.train_tokens, t.batch_size, T, t.seed,
                                random_crop=d.crop_augment, **common)
        return RandomWindowSampler(self.train_tokens, t.batch_size, T, t.seed, **common)

    def _count_steps(self):
        t = self.config.train
        if t.max_iters is not None:
            return t.max_iters
        steps = t.epochs * self.sampler.batches_per_epoch // t.grad_accum
        if steps == 0:
            raise UsageError(f"train.epochs={t.epochs}: one epoch has only "
                             f"{self.sampler.batches_per_epoch} batches, fewer than "
                             f"train.grad_accum={t.grad_accum}")
        return steps

    # ---- checkpoints -------------------------------------------------------------
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

    # ---- the loop ----------------------------------------------------------------
    def _elapsed(self):
        return time.perf_counter() - self._started if hasattr(self, "_started") else 0.0

    def run(self):
        """Train to the end (or a signal or early stop); returns the summary dict."""
        t = self.config.train
        self._started = time.perf_counter()
        self._install_signal_handlers()
        metrics = open(self.run_dir.metrics_path, "a") if self.is_main else None
        display = TrainDisplay(self.total_steps, self.step, quiet=self.quiet,
                               enabled=self.display_enabled, last_val=self.last_val,
                               total_epochs=t.epochs)
        self._say(self.data_summary())
        last_loss = None
        smoothed = None
        window_start, window_tokens = time.perf_counter(), 0
        pending = []   # (step, device values, lr) of steps the host has not read yet
        epochs = {}    # step -> passes over the training data after it
        stop_reason = "finished"
        if self.step >= self.total_steps:
            stop_reason = "already complete"
            self._say(f"the run already reached step {self.total_steps}; to train further, "
                      f"resume with a larger train.max_iters (or train.epochs)")
        try:
            with display:
                self._display = display
                while self.step < self.total_steps:
                    values, lr = self._train_step()
                    pending.append((self.step + 1, values, lr))
                    epochs[self.step + 1] = self.sampler.epochs_done
                    tokens = t.batch_size * t.grad_accum * self.config.model.block_size
                    self.tokens_seen += tokens
                    window_tokens += tokens
                    if not self._host_needed(self.step + 1):
                        self.step += 1
                        continue
                    # the results of the pending steps, in one read from the device
                    now = time.perf_counter()
                    tokens_per_s = window_tokens / max(now - window_start, 1e-9)
                    for step, loss, norm, lr, scale in self._read_back(pending):
                        last_loss = self.last_train_loss = loss
                        self.interval_loss[0] += loss
                        self.interval_loss[1] += 1
                        smoothed = loss if smoothed is None else 0.9 * smoothed + 0.1 * loss
                        epoch = epochs.pop(step)
                        record = {"type": "train", "step": step, "epoch": round(epoch, 6),
                                  "loss": loss, "lr": lr,
                                  "grad_norm": norm, "tokens_per_s": tokens_per_s,
                                  "skipped": not math.isfinite(norm),
                                  "time": round(self.elapsed_before + self._elapsed(), 3)}
                        if self.scaler:
                            record["loss_scale"] = scale
                        if metrics:
                            self.run_dir.append_metrics(record, metrics)
                        display.step(step, smoothed, lr, norm, tokens_per_s,
                                     self._mfu(tokens_per_s), log_line=step % t.log_interval == 0,
                                     epoch=epoch)
                    pending = []
                    self.step += 1
                    if self.step % t.log_interval == 0:
                        window_start, window_tokens = now, 0

                    if self.step % t.eval_interval == 0 or self.step == self.total_steps:
                        if self._evaluate(display, metrics):
                            stop_reason = "early stop"
                    if t.sample_interval and self.step % t.sample_interval == 0 and self.is_main:
                        display.sample(self.step, self.sample_text())
                    if self.step % t.save_interval == 0 or self.step == self.total_steps:
                        if self.dist is not None and not self.dist.in_sync(self.model.flat_params):
                            raise XpmodelError(f"step {self.step}: the ranks' weights differ; "
                                               f"not saving")
                        self.save()
                    if self._stop_signal is not None:
                        raise Interrupted(self._stop_signal)
                    if stop_reason == "early stop":
                        display.print(f"early stop: no val improvement in {t.early_stop_patience} evaluations")
                        if not self.run_dir.step_path(self.step).exists():
                            self.save()
                        break
        except Interrupted as interrupt:
            path = self.run_dir.step_path(self.step)
            if self.is_main and not path.exists():
                path = self.save()
            interrupt.step, interrupt.checkpoint, interrupt.run_dir = self.step, path, self.run_dir.path
            raise
        finally:
            self._display = None
            if metrics:
                metrics.close()
            self._restore_signal_handlers()
        summary = self._summary(last_loss, stop_reason)
        if self.display_enabled:
            self._print_summary(summary)
        return summary

    def _host_needed(self, step):
        """Whether the host must read the results of steps up to `step` now:
        always on the CPU (it costs nothing); with deferred reads (a GPU) at
        logging, evaluation, sampling and saving steps, at the end, on a
        signal, and when ranks exchange results. In between, GPU steps queue
        without waiting."""
        t = self.config.train
        return (not self.defer_reads or self.dist is not None or self._stop_signal is not None
                or step == self.total_steps
                or any(step % every == 0 for every in (t.log_interval, t.eval_interval, t.save_interval))
                or bool(t.sample_interval and step % t.sample_interval == 0))

    def _train_step(self):
        """One optimizer step, decided on the model's device; returns its results
        there ([loss, unscaled grad norm, grads finite, loss scale]) and the lr."""
        # NaN and Inf are looked for and reported when the host reads the step,
        # so NumPy's own warnings about them would only repeat that on stderr.
        with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return self._optimizer_step()

    def _optimizer_step(self):
        t, model, xp = self.config.train, self.model, self.model.xp
        lr = self.schedule(self.step)
        self.optimizer.lr = lr
        model.zero_grad()
        scale = self.scaler.device_scale if self.scaler else 1.0
        total = 0.0
        for _ in range(t.grad_accum):
            x, y = self.sampler.next_batch()
            if self.dist is not None:
                start, stop = self.dist.shard(x.shape[0])
                x, y = x[start:stop], y[start:stop]
            try:
                total = total + model.forward_backward(x, y, scale=scale / t.grad_accum)
            except out_of_memory_errors() as exc:
                raise XpmodelError(f"out of {'GPU ' if self.device.is_cuda else ''}memory ({exc.__class__.__name__}): "
                                   f"lower train.batch_size (raise train.grad_accum to keep the batch), "
                                   f"set train.recompute=mlp or block, or lower model.block_size, "
                                   f"model.n_embd or model.n_layer") from None
        if self.dist is not None:
            self.dist.allreduce_mean_(model.flat_grads)
            total = float(self.dist.allreduce_mean_(numpy.array([float(total)]))[0])
        loss = xp.asarray(total / t.grad_accum, dtype=numpy.float64)
        norm, grads_finite = clipped_step(self.optimizer, t.grad_clip, scale, loss)
        if self.scaler:
            self.scaler.record(grads_finite)
        values = xp.stack([loss, norm, grads_finite.astype(numpy.float64),
                           xp.asarray(self.scaler.device_scale if self.scaler else 1.0,
                                      dtype=numpy.float64)])
        return values, lr

    def _read_back(self, pending):
        """[(step, loss, grad norm or inf when skipped, lr, loss scale)] of the
        pending steps, read from the device at once; raises at the first
        diverged step."""
        if not pending:
            return []
        values = to_host(self.model.xp.stack([v for _, v, _ in pending]))
        results = []
        for (step, _, lr), (loss, norm, grads_finite, scale) in zip(pending, values):
            if not math.isfinite(loss) or not (grads_finite or self.scaler):
                latest = self.run_dir.checkpoint_steps()
                where = f"; the last good checkpoint is step {latest[-1]}" if latest else ""
                raise XpmodelError(f"step {step}: loss is {loss}, gradient norm {norm}: "
                                   f"training diverged, weights not updated{where}; "
                                   f"lower train.lr or raise train.warmup_iters")
            results.append((step, float(loss), float(norm) if grads_finite else float("inf"), lr,
                            float(scale)))
        if self.scaler:
            self.scaler.check(pending[-1][0])
        return results

    def _evaluate(self, display, metrics):
        """Validation loss on `eval_batches` batches; True when early stopping triggers."""
        t = self.config.train
        val_loss = self.evaluate_loss(self.val_tokens, t.eval_batches)
        perplexity = math.exp(min(val_loss, 700))
        total, count = self.interval_loss
        train_loss = total / count if count else None   # the steps since the last evaluation
        self.interval_loss = [0.0, 0]
        self.last_val, self.last_val_step = val_loss, self.step
        best = val_loss < self.best_val
        if best:
            self.best_val = val_loss
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        record = {"type": "eval", "step": self.step, "epoch": round(self.sampler.epochs_done, 6),
                  "val_loss": val_loss, "val_perplexity": perplexity}
        if train_loss is not None:
            record.update(train_loss=train_loss, train_perplexity=math.exp(min(train_loss, 700)),
                          gap=val_loss - train_loss)
        if metrics:
            self.run_dir.append_metrics(record, metrics)
        display.validation(self.step, val_loss, perplexity, best, train_loss)
        if best:
            self.save(self.run_dir.best_path)
        return bool(t.early_stop_patience) and self.evals_without_improvement >= t.early_stop_patience

    def data_summary(self):
        """One line on the data: corpus bytes, tokens, the split, tokens per
        parameter, and the passes over the training tokens the run makes."""
        t = self.config.train
        n_train, n_val = len(self.train_tokens), len(self.val_tokens)
        try:
            corpus = f"{resolve_source(self.config.data.source).total_bytes():,} bytes of "
        except XpmodelError:
            corpus = ""
        tokens_per_step = t.batch_size * t.grad_accum * self.config.model.block_size
        epochs = self.sampler.epochs_after(self.total_steps * t.grad_accum)
        length = (f"train.epochs={t.epochs}: {self.total_steps:,} steps" if t.epochs else
                  f"{self.total_steps:,} steps x {tokens_per_step:,} tokens = {epochs:.2f} epochs")
        return (f"data: {corpus}{self.config.data.source} -> {n_train + n_val:,} tokens "
                f"({n_train:,} train, {n_val:,} val), {n_train / self.gpt_config.num_params():.2g} "
                f"train tokens per parameter; {length}")

    def evaluate_loss(self, tokens, n_batches):
        was_training = self.model.training
        self.model.eval()
        T = self.config.model.block_size
        losses = [float(self.model.loss(x, y)) for x, y in
                  eval_batches(tokens, self.config.train.batch_size, T, n_batches)]
        if was_training:
            self.model.train()
        return float(numpy.mean(losses))

    def sample_text(self):
        t = self.config.train
        prompt = self.tokenizer.encode(t.sample_prompt, allowed_special="all") or [self.tokenizer.eot_id or 0]
        ids = list(generate(self.model, prompt, t.sample_tokens, temperature=t.sample_temperature,
                            top_k=t.sample_top_k, top_p=t.sample_top_p,
                            seed=t.seed + self.step, stop_id=self.tokenizer.eot_id))
        return t.sample_prompt + self.tokenizer.decode(ids)

    def _mfu(self, tokens_per_s):
        """Model FLOPs utilisation against the GPU's dense fp16 peak; None on CPU
        or an unknown GPU."""
        if not self.device.is_cuda:
            return None
        if not hasattr(self, "_peak_flops"):
            name = gpu_name(self.device)
            self._peak_flops = next((f for key, f in _GPU_PEAK_FLOPS.items() if key in name), None)
            self._flops_per_token = self.gpt_config.flops_per_token()
        if self._peak_flops is None:
            return None
        return self._flops_per_token * tokens_per_s / self._peak_flops

    def _summary(self, last_loss, stop_reason):
        wall = self.elapsed_before + self._elapsed()
        summary = {"stop_reason": stop_reason, "steps": self.step, "train_loss": last_loss,
                   "val_loss": self.last_val, "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
                   "val_perplexity": math.exp(self.last_val) if self.last_val is not None else None,
                   "tokens_seen": self.tokens_seen, "wall_time_s": wall,
                   "tokens_per_s": self.tokens_seen / wall if wall > 0 else 0.0,
                   "run_dir": str(self.run_dir.path)}
        return summary

    def _print_summary(self, s):
        val = f"{s['val_loss']:.4f} (perplexity {s['val_perplexity']:.2f})" if s["val_loss"] is not None else "-"
        train = "-" if s["train_loss"] is None else f"{s['train_loss']:.4f}"
        print(f"done ({s['stop_reason']}): {s['steps']} steps, train loss {train}, "
              f"val loss {val}, {s['tokens_seen']:,} tokens in {s['wall_time_s']:.1f} s "
              f"({s['tokens_per_s']:,.0f} tokens/s); run saved in {s['run_dir']}", flush=True)

    # ---- signals -------------------------------------------------------------------
    def _install_signal_handlers(self):
        self._previous_handlers = {}
        owner = os.getpid()

        def handler(signum, frame):
            if os.getpid() != owner:   # a forked child inherited this handler
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            if self._stop_signal is not None:
                # A second signal: leave now. Every file is written atomically, so
                # only the temporary file of a save in progress needs removing.
                abandon_partial_writes()
                _show_cursor()   # the live display hid it
                os._exit(_SIGNAL_EXIT.get(signum, 130))
            self._stop_signal = signum

        for signum in _SIGNAL_EXIT:
            try:
                self._previous_handlers[signum] = signal.signal(signum, handler)
            except ValueError:
                pass   # not the main thread: leave signals alone

    def _restore_signal_handlers(self):
        for signum, previous in self._previous_handlers.items():
            signal.signal(signum, previous)


def _saved_optimizer(document):
    """train.optimizer of the config a checkpoint was saved with (adamw before Muon existed)."""
    config = document.get("config")
    train = config.get("train") if isinstance(config, dict) else None
    return train.get("optimizer", "adamw") if isinstance(train, dict) else "adamw"


def _show_cursor():
    try:
        if sys.stdout.isatty():
            os.write(sys.stdout.fileno(), b"\x1b[?25h\n")
    except (OSError, ValueError):
        pass
