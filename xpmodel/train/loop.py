"""The step loop.

A step is `grad_accum` micro-batches of forward/backward, a global-norm clip,
a finiteness check, and one update (AdamW, or Muon with AdamW) at the
schedule's learning rate. On a GPU steps are queued without waiting and the
host reads their results in batches (at logging, evaluation, sampling and
saving steps).

Faults: a non-finite loss or gradient in fp32 stops the run before the update,
and weights that are not finite are never saved, so the last checkpoint stays
good; in fp16 an overflow skips the step instead (see loss_scale.py). A Muon
update that is not finite from finite gradients stops the run too (muon.py).
A kill at any instant loses at most `save_interval` steps, since every file
is replaced atomically.
"""
import contextlib
import math
import signal
import sys
import time

import numpy

from ..backend import device_scalar, get_device, out_of_memory_errors, to_host
from ..config import config_to_dict
from ..data.corpus import load_tokens
from ..errors import UsageError, XpmodelError
from .display import TrainDisplay
from .evaluate import Evaluation
from .health import Health
from .loss_scale import LossScaler
from .metrics_file import appending
from .mirrors import Mirrors
from .muon import NON_FINITE_UPDATE
from .optim import clipped_step
from .schedule import schedule_from_config
from .setup import (RunSetup, build_model, count_steps, make_sampler, optimizer_for,
                    out_of_memory_creating)
from .signals import Interrupted, SignalHandling
from .state import CheckpointState


def _lighter_recompute(recompute):
    """The out-of-memory advice's train.recompute part: the modes that keep less than `recompute`."""
    lighter = {"none": "mlp or block", "mlp": "block"}.get(recompute)
    return f"set train.recompute={lighter}, or " if lighter else ""


class Trainer(RunSetup, CheckpointState, Evaluation, SignalHandling):
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

        # the model first: one that cannot fit is refused before the corpus is read
        self.model = build_model(config, tokenizer, self.device,
                                 ranks=1 if dist is None else dist.world_size)
        self.gpt_config = self.model.config
        try:
            self.optimizer = optimizer_for(self.model, t)   # AdamW, or Muon with AdamW
        except out_of_memory_errors() as exc:
            raise out_of_memory_creating(self.gpt_config, self.device, exc) from None
        self.train_tokens, self.val_tokens = load_tokens(
            config.data, tokenizer, config.model.block_size,
            show_progress=self.display_enabled and not quiet and sys.stdout.isatty())
        if dist is not None:
            if not dist.agree(config_to_dict(config)):
                raise UsageError("the ranks were started with different configs; launch every "
                                 "rank with the same command line")
            dist.broadcast_(self.model.flat_params)
            self.model.dropout_stream = dist.rank
        self.scaler = LossScaler(xp=self.model.xp) if t.precision == "fp16" else None
        # GPU steps are queued without waiting; the host reads their results in batches
        self.defer_reads = self.device.is_cuda
        self.sampler = make_sampler(config, tokenizer, self.train_tokens)
        self.total_steps = count_steps(config.train, self.sampler)
        self.schedule = schedule_from_config(t, self.total_steps)
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
        self.saved_step = None         # the step of the checkpoint this process saved or resumed from last
        self.resumed_from = None       # the checkpoint resumed from
        self.best_file_val = None      # the validation loss best.safetensors holds, when known
        self._data_fingerprint = None
        self._stop_signal = None
        self._stop_agreed = False
        self.health = Health(self)     # per-layer records, warnings, where a NaN came from
        self.mirrors = Mirrors.off()   # train.log_to, while run() runs
        self.checkpoints_read = ()     # a resume's (path, header, problem), which pruning reuses
        self._started = None           # run()'s start, on the performance counter
        # MFU's peak FLOP/s (None on CPU or where no peak is known) and the model's FLOPs a token
        self._peak_flops = self.mfu_peak()[0]
        self._flops_per_token = self.gpt_config.flops_per_token()

    # ---- the loop ----------------------------------------------------------------
    def _elapsed(self):
        return 0.0 if self._started is None else time.perf_counter() - self._started

    def run(self):
        """Train to the end (or a signal or early stop); returns the summary dict."""
        t = self.config.train
        self._started = time.perf_counter()
        self._install_signal_handlers()
        log = appending(self.run_dir.metrics_path) if self.is_main else contextlib.nullcontext()
        with log as metrics:
            if metrics and t.log_to:
                self.mirrors = Mirrors(self.run_dir, self.config, self.step, self._warn)
            display = TrainDisplay(self.total_steps, self.step, quiet=self.quiet,
                                   enabled=self.display_enabled, last_val=self.last_val,
                                   total_epochs=t.epochs)
            self._say(self.data_summary())
            stop_reason = "finished" if self.step < self.total_steps and not self._stopped_early() \
                else self._already_complete()
            window = _StepWindow()
            try:
                with display:
                    self._display = display
                    while self.step < self.total_steps and stop_reason == "finished":
                        values, lr = self._train_step()
                        window.queue(self.step + 1, values, lr, self.sampler.epochs_done,
                                     self.tokens_per_step)
                        self.tokens_seen += self.tokens_per_step
                        read = self._host_needed(self.step + 1)   # else the GPU queues on
                        if read:
                            self._report_steps(window, display, metrics)
                        self.step += 1
                        if read:
                            stop_reason = self._after_step(display, metrics)
            except Interrupted as interrupt:
                path = self.run_dir.step_path(self.step)
                if self.is_main and not self._saved_this_step():
                    path = self.save()
                if self.dist is not None:
                    # rank 0's checkpoint is on disk before any rank ends the job
                    self.dist.barrier()
                interrupt.step, interrupt.checkpoint = self.step, path
                interrupt.run_dir = self.run_dir.path
                raise
            finally:
                self._display = None
                self.mirrors.close()
                self._restore_signal_handlers()
        summary = self._summary(self.last_train_loss, stop_reason)
        if self.display_enabled:
            self._print_summary(summary)
        return summary

    def log_record(self, record, metrics):
        """One record into metrics.jsonl, then into the train.log_to mirrors."""
        self.run_dir.append_metrics(record, metrics)
        self.mirrors.record(record)

    def _warn(self, text):
        if self._display is not None:
            self._display.print(text)
        else:
            self._say(text)

    @property
    def tokens_per_step(self):
        t = self.config.train
        return t.batch_size * t.grad_accum * self.config.model.block_size

    def _already_complete(self):
        """A resumed run with nothing left to train: says why, and prunes the
        checkpoints its last process may have been killed before pruning."""
        t = self.config.train
        if self._stopped_early():
            self._say(f"the run stopped early at step {self.step} (no val improvement in "
                      f"{t.early_stop_patience} evaluations); to train further, resume with a "
                      f"larger train.early_stop_patience (or 0 to turn it off)")
        else:
            beyond = f" (this config trains {self.total_steps})" if self.step > self.total_steps else ""
            self._say(f"the run already reached step {self.step}{beyond}; to train further, "
                      f"resume with a larger train.max_iters (or train.epochs)")
        if self.is_main and self.resumed_from is not None:
            self.prune_checkpoints()
        return "already complete"

    def _report_steps(self, window, display, metrics):
        """The results of the queued steps, read from the device at once: each
        step's metrics record and display line."""
        t = self.config.train
        now = time.perf_counter()
        tokens_per_s = window.tokens_per_s(now)
        for step, loss, norm, lr, scale in self._read_back(window.pending):
            smoothed = window.add_loss(loss)
            self.last_train_loss = loss
            self.interval_loss[0] += loss
            self.interval_loss[1] += 1
            epoch = window.epochs.pop(step)
            record = {"type": "train", "step": step, "epoch": round(epoch, 6), "loss": loss,
                      "lr": lr, "grad_norm": norm, "tokens_per_s": tokens_per_s,
                      "skipped": not math.isfinite(norm),
                      "time": round(self.elapsed_before + self._elapsed(), 3)}
            if self.scaler:
                record["loss_scale"] = scale
            if metrics:
                self.log_record(record, metrics)
            self.health.on_train(record, display, metrics)
            display.step(step, smoothed, lr, norm, tokens_per_s, self._mfu(tokens_per_s),
                         log_line=step % t.log_interval == 0, epoch=epoch)
        window.pending = []
        if (self.step + 1) % t.log_interval == 0:
            window.restart(now)

    def _after_step(self, display, metrics):
        """The evaluation, sample and checkpoint due after this step; a signal
        raises Interrupted here. Returns "finished" or "early stop"."""
        t, step = self.config.train, self.step
        early_stop = False
        if step % t.eval_interval == 0 or step == self.total_steps:
            early_stop = self._evaluate(display, metrics)
        if t.sample_interval and step % t.sample_interval == 0 and self.is_main:
            text = self.sample_text()
            display.sample(step, text)
            self.mirrors.sample(step, text)
        if step % t.save_interval == 0 or step == self.total_steps:
            if self.dist is not None and not self.dist.in_sync(self.model.flat_params):
                raise XpmodelError(f"step {step}: the ranks' weights differ; not saving")
            self.save()
        if self._stopping():
            raise Interrupted(self._stop_signal or signal.SIGTERM)   # SIGTERM: another rank's signal
        if not early_stop:
            return "finished"
        display.print(f"early stop: no val improvement in {t.early_stop_patience} evaluations")
        if not self._saved_this_step():
            self.save()
        return "early stop"

    def _stopping(self):
        """Whether a signal ends the run after this step. With several ranks, only
        when this step's all-reduce told every rank of it, so all stop at the same
        step and rank 0's checkpoint is the one each names."""
        return self._stop_signal is not None if self.dist is None else self._stop_agreed

    def _saved_this_step(self):
        """Whether this process saved (or resumed from) a checkpoint of this very
        step; a file of that name left from before (damaged, say) does not count."""
        return self.saved_step == self.step

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
        there ([loss, unscaled grad norm, grads finite, loss scale, update finite])
        and the lr."""
        # NaN and Inf are looked for and reported when the host reads the step,
        # so NumPy's own warnings about them would only repeat that on stderr.
        with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return self._optimizer_step()

    def _optimizer_step(self):
        t, model, xp = self.config.train, self.model, self.model.xp
        lr = self.schedule(self.step)
        self.optimizer.lr = lr
        self.health.step_starts(self.step)
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
                                   f"{_lighter_recompute(t.recompute)}lower model.block_size, "
                                   f"model.n_embd or model.n_layer") from None
        if self.dist is not None:
            self.dist.allreduce_mean_(model.flat_grads)
            # the loss, and whether a signal reached any rank: then every rank stops after this step
            shared = self.dist.allreduce_mean_(numpy.array([float(total), float(self._stop_signal is not None)]))
            total, self._stop_agreed = float(shared[0]), bool(shared[1] > 0)
        loss = device_scalar(xp, total / t.grad_accum)
        self.health.before_update(self.step)
        norm, grads_finite = clipped_step(self.optimizer, t.grad_clip, scale, loss)
        self.health.after_update(self.step, scale)
        if self.scaler:
            self.scaler.record(grads_finite)
        # Muon's orthogonalised update, which a fused GPU step checks on the device
        # (AdamW's is finite with the gradients)
        update_finite = getattr(self.optimizer, "update_finite", True)
        values = xp.stack([loss, norm, grads_finite.astype(numpy.float64),
                           device_scalar(xp, self.scaler.device_scale if self.scaler else 1.0),
                           device_scalar(xp, update_finite)])
        return values, lr

    def _read_back(self, pending):
        """[(step, loss, grad norm or inf when skipped, lr, loss scale)] of the
        pending steps, read from the device at once; raises at the first
        diverged step."""
        if not pending:
            return []
        values = to_host(self.model.xp.stack([v for _, v, _ in pending]))
        results = []
        for (step, _, lr), (loss, norm, grads_finite, scale, update_finite) in zip(pending, values):
            if not math.isfinite(loss) or not (grads_finite or self.scaler):
                latest = self.run_dir.checkpoint_steps()
                where = f"; the last good checkpoint is step {latest[-1]}" if latest else ""
                raise XpmodelError(f"step {step}: loss is {loss}, gradient norm {norm}: "
                                   f"training diverged, weights not updated{where}; "
                                   f"lower train.lr or raise train.warmup_iters"
                                   f"{self.health.explain_nonfinite(step)}")
            if not update_finite:   # a fused GPU step skipped itself (muon.py)
                raise XpmodelError(f"step {step}: {NON_FINITE_UPDATE}")
            results.append((step, float(loss), float(norm) if grads_finite else float("inf"), lr,
                            float(scale)))
        if self.scaler:
            self.scaler.check(pending[-1][0])
        return results


class _StepWindow:
    """Steps queued on the device that the host has not read yet, the
    tokens/s window since the last log line, and the smoothed loss."""

    def __init__(self):
        self.pending = []   # (step, device values, lr)
        self.epochs = {}    # step -> passes over the training data after it
        self.restart(time.perf_counter())
        self.smoothed = None

    def queue(self, step, values, lr, epochs_done, tokens):
        self.pending.append((step, values, lr))
        self.epochs[step] = epochs_done
        self.tokens += tokens

    def tokens_per_s(self, now):
        return self.tokens / max(now - self.start, 1e-9)

    def restart(self, now):
        self.start, self.tokens = now, 0

    def add_loss(self, loss):
        """Record a step's loss; returns the smoothed loss (an exponential average)."""
        self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        return self.smoothed
