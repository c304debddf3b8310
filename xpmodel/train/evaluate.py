"""Evaluation and reporting: validation loss (and early stopping), samples,
the data line, MFU, and the end-of-run summary; evaluate_tokens, a trained
model's loss and bits per byte over a token stream (xpmodel eval)."""
import math

import numpy

from ..backend import gpu_name, to_host
from ..data import eval_batches, resolve_source
from ..errors import XpmodelError, counted
from ..model.generate import generate
from .display import perplexity_text
from .peak_flops import mfu_peak


def batch_losses(model, batches):
    """model.loss of each (x, y) of `batches`, as float64 host values read at
    the end: on a GPU the batches run one after another without the host
    waiting for each loss."""
    losses = [model.loss(x, y) for x, y in batches]
    if not losses:
        return numpy.zeros(0)
    return to_host(model.xp.stack(losses)).astype(numpy.float64)


def evaluate_tokens(model, tokenizer, tokens, batch_size, max_batches=None):
    """Loss, perplexity and bits per byte of `model` over `tokens` (xpmodel
    eval): consecutive windows of block_size, so each target is predicted
    once, `batch_size` windows a batch; at most `max_batches` batches, spread
    evenly from the first to the last."""
    T = model.config.block_size
    specials = set(tokenizer.special_tokens.values())   # e.g. <|endoftext|>: no bytes of text
    byte_lengths = numpy.array([len(tokenizer.token_bytes(i))
                                if i < tokenizer.vocab_size and i not in specials else 0
                                for i in range(model.config.vocab_size)])
    starts = list(range(0, len(tokens) - 1, T))
    batches = [starts[i:i + batch_size] for i in range(0, len(starts), batch_size)]
    if max_batches is not None and max_batches < len(batches):
        picks = numpy.linspace(0, len(batches) - 1, num=max_batches).round().astype(int)
        batches = [batches[i] for i in picks]
    sizes = []   # (targets, bytes of text) of each batch, as it is made

    def windows():
        for batch in batches:
            x = numpy.full((len(batch), T), 0, dtype=numpy.int64)
            y = numpy.full((len(batch), T), -1, dtype=numpy.int64)
            for row, start in enumerate(batch):
                window = numpy.asarray(tokens[start:start + T + 1], dtype=numpy.int64)
                x[row, :len(window) - 1] = window[:-1]
                y[row, :len(window) - 1] = window[1:]
            sizes.append((int((y >= 0).sum()), int(byte_lengths[y[y >= 0]].sum())))
            yield x, y

    total_nats = 0.0
    for loss, (count, _) in zip(batch_losses(model, windows()), sizes):
        total_nats += float(loss) * count
    total_tokens, total_bytes = (sum(column) for column in zip(*sizes))
    loss = total_nats / total_tokens
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": total_tokens,
            "bits_per_byte": total_nats / math.log(2) / max(total_bytes, 1)}


def perplexity(loss):
    """exp(loss), held at exp(700) where a diverged loss would overflow a float."""
    return math.exp(min(loss, 700))


class Evaluation:
    """The Trainer's evaluation, sampling and summaries."""

    def _evaluate(self, display, metrics):
        """Validation loss on `eval_batches` batches; True when early stopping triggers."""
        t = self.config.train
        val_loss = self.evaluate_loss(self.val_tokens, t.eval_batches)
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
                  "val_loss": val_loss, "val_perplexity": perplexity(val_loss)}
        if train_loss is not None:
            record.update(train_loss=train_loss, train_perplexity=perplexity(train_loss),
                          gap=val_loss - train_loss)
        if metrics:
            self.log_record(record, metrics)
        display.validation(record, best)
        if best:
            self.save(self.run_dir.best_path)
        self.health.on_eval(record, display, metrics)
        return self._stopped_early()

    def _stopped_early(self):
        """Whether the last train.early_stop_patience evaluations brought no improvement."""
        patience = self.config.train.early_stop_patience
        return bool(patience) and self.evals_without_improvement >= patience

    def data_summary(self):
        """One line on the data: the corpus and its size, tokens, the split, tokens per
        parameter, and the passes over the training tokens the run makes."""
        t = self.config.train
        n_train, n_val = len(self.train_tokens), len(self.val_tokens)
        try:
            size = f" ({resolve_source(self.config.data.source).size_text()})"
        except XpmodelError:
            size = ""
        epochs = self.sampler.epochs_after(self.total_steps * t.grad_accum)
        length = (f"train.epochs={t.epochs}: {self.total_steps:,} steps" if t.epochs else
                  f"{self.total_steps:,} steps x {self.tokens_per_step:,} tokens = {epochs:.2f} epochs")
        return (f"data: {self.config.data.source}{size} -> {n_train + n_val:,} tokens "
                f"({n_train:,} train, {n_val:,} val), {n_train / self.gpt_config.num_params():.2g} "
                f"train tokens per parameter; {length}")

    def evaluate_loss(self, tokens, n_batches):
        T = self.config.model.block_size
        with self.model.evaluating():
            losses = batch_losses(self.model, eval_batches(tokens, self.config.train.batch_size, T,
                                                            n_batches))
        return float(numpy.mean(losses))

    def sample_text(self):
        t = self.config.train
        context = self.tokenizer.encode(t.sample_prompt, allowed_special="all")
        ids = list(generate(self.model, context or [self.tokenizer.eot_id or 0], t.sample_tokens,
                            temperature=t.sample_temperature, top_k=t.sample_top_k,
                            top_p=t.sample_top_p, seed=t.seed + self.step,
                            stop_id=self.tokenizer.eot_id, vocab_limit=self.tokenizer.vocab_size))
        # text the last tokens may still change (a character's first bytes) is left out, not shown
        # as U+FFFD (see IncrementalDecoder)
        return t.sample_prompt + self.tokenizer.incremental_decoder(context).decode(ids)

    def mfu_peak(self):
        """(FLOP/s or None, what it is): the peak MFU is measured against on this
        run's GPU (xpmodel/train/peak_flops.py, or train.peak_flops); (None, None) on CPU."""
        if not self.device.is_cuda:
            return None, None
        t = self.config.train
        return mfu_peak(gpu_name(self.device), t.precision, t.peak_flops)

    def _mfu(self, tokens_per_s):
        """Model FLOPs utilisation of each GPU against mfu_peak(); None on CPU or
        where no peak is known. tokens_per_s counts the tokens of every rank."""
        if self._peak_flops is None:
            return None
        gpus = 1 if self.dist is None else self.dist.world_size
        return self._flops_per_token * tokens_per_s / (self._peak_flops * gpus)

    def _summary(self, last_loss, stop_reason):
        wall = self.elapsed_before + self._elapsed()
        summary = {"stop_reason": stop_reason, "steps": self.step, "train_loss": last_loss,
                   "val_loss": self.last_val, "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
                   "val_perplexity": perplexity(self.last_val) if self.last_val is not None else None,
                   "tokens_seen": self.tokens_seen, "wall_time_s": wall,
                   "tokens_per_s": self.tokens_seen / wall if wall > 0 else 0.0,
                   "mfu_peak": self.mfu_peak()[1], "run_dir": str(self.run_dir.path)}
        return summary

    def _print_summary(self, s):
        val = f"{s['val_loss']:.4f} (perplexity {perplexity_text(s['val_perplexity'])})" if s["val_loss"] is not None else "-"
        train = "-" if s["train_loss"] is None else f"{s['train_loss']:.4f}"
        print(f"done ({s['stop_reason']}): {counted(s['steps'], 'step')}, train loss {train}, "
              f"val loss {val}, {s['tokens_seen']:,} tokens in {s['wall_time_s']:.1f} s "
              f"({s['tokens_per_s']:,.0f} tokens/s); run saved in {s['run_dir']}", flush=True)
