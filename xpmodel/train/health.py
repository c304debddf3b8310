"""Training health: per-layer records, warnings, and where a NaN came from.

Every `train.health_interval` steps (0: off) the step's gradient norm and
update/weight ratio ||W_after - W_before|| / ||W_before|| of each group of
parameters (the embeddings, each block h.i, the head: ln_f and an untied
lm_head) go into metrics.jsonl as a "health" record:

  {"type": "health", "step": 100, "groups": ["embed", "h.0", ..., "head"],
   "grad_norm": [...], "update_ratio": [...], "weight_norm": [...]}

The norms are dot products over the parameters' views of the flat buffers,
taken on the device and read with the step's other results, so a GPU step
still does not wait; the cost is one copy of the weights per health step.
The gradient norms are those before clipping (unscaled in fp16).

Warnings, printed above the live bar (or as log lines) and kept in
metrics.jsonl as "warning" records, each once until the condition clears:
  exploding   the step's gradient norm is over 10x the median of recent steps
  vanishing   the gradient norm is under 1e-7 (nothing reaches the weights)
  flat        after 50 steps, the loss is within 2% of where the run started
  overfitting validation rose for 3 evaluations in a row while train fell;
              names the best checkpoint's step

When a step's loss or gradients are not finite (fp32 and bf16; fp16 skips
such steps), `explain_nonfinite` re-runs that step's batches on the current
weights with every layer's outputs checked, and names the first layer and
pass (forward or backward) that produced a NaN or Inf.
"""
import math
from collections import deque

import numpy

from ..backend import device_scalar, to_host
from .checkpoint import read_checkpoint_meta
from .nonfinite import NonFiniteFinder
from .setup import make_sampler

EXPLODE_FACTOR = 10.0
VANISH_NORM = 1e-7
FLAT_AFTER_STEPS = 50
FLAT_TOLERANCE = 0.02
OVERFIT_EVALS = 3


def parameter_groups(names):
    """[(group, [names])] in model order: embed, h.0 .. h.{L-1}, head."""
    groups = {}
    for name in names:
        if name.startswith("h."):
            key = ".".join(name.split(".")[:2])
        elif name.startswith(("wte.", "wpe.")):
            key = "embed"
        else:
            key = "head"
        groups.setdefault(key, []).append(name)
    order = ["embed"] + sorted((k for k in groups if k.startswith("h.")),
                               key=lambda k: int(k[2:])) + ["head"]
    return [(k, groups[k]) for k in order if k in groups]


class Health:
    """The Trainer's health records and warnings; see the module's docstring."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.interval = trainer.config.train.health_interval
        model = trainer.model
        self.groups = parameter_groups(model.layout.names)
        self._before = None            # the weights before a health step's update
        self._grad_sq = None
        self._pending = {}             # step -> device array (3, groups)
        self._replay = {}              # step -> (sampler state, dropout passes) not yet read
        self._norms = deque(maxlen=50)
        self._first_losses = []
        self._recent = deque(maxlen=10)
        self._evals = []               # (step, train loss, val loss)
        self._active = set()           # warnings shown and not cleared since

    # ---- hooks in the step -------------------------------------------------------------
    def step_starts(self, step):
        """Before the step's batches are drawn: what re-running it needs (host values only)."""
        t = self.trainer
        self._replay[step + 1] = (t.sampler.state_dict(), t.model.dropout_calls)

    def before_update(self, step):
        """After backward, before clipping and the update."""
        if not self._due(step + 1):
            return
        model = self.trainer.model
        self._before = model.flat_params.copy()
        self._grad_sq = self._squared_norms(model.grads)

    def after_update(self, step, scale=1.0):
        if self._before is None:
            return
        model, xp = self.trainer.model, self.trainer.model.xp
        delta = model.flat_params - self._before
        weights = self._squared_norms(model.layout.views(self._before))
        updates = self._squared_norms(model.layout.views(delta))
        scale = device_scalar(xp, scale)
        self._pending[step + 1] = xp.stack([xp.sqrt(self._grad_sq) / scale, xp.sqrt(updates),
                                            xp.sqrt(weights)])
        self._before = self._grad_sq = None

    def _due(self, step):
        return bool(self.interval) and step % self.interval == 0

    def _squared_norms(self, views):
        xp = self.trainer.model.xp
        sums = []
        for _, names in self.groups:
            total = xp.zeros((), dtype=numpy.float64)
            for name in names:
                v = views[name].reshape(-1)
                total = total + xp.dot(v, v).astype(numpy.float64)
            sums.append(total)
        return xp.stack(sums)

    # ---- what the host reads -----------------------------------------------------------
    def on_train(self, record, display, metrics):
        """After a step's train record is written: its health record, if any, and warnings."""
        step = record["step"]
        self._replay = {s: v for s, v in self._replay.items() if s > step}
        values = self._pending.pop(step, None)
        if values is not None and metrics:
            grads, updates, weights = to_host(values).tolist()
            self.trainer.log_record({
                "type": "health", "step": step, "epoch": record.get("epoch"),
                "groups": [g for g, _ in self.groups],
                "grad_norm": _finite(grads),
                "update_ratio": _finite([u / w if w > 0 else None for u, w in zip(updates, weights)]),
                "weight_norm": _finite(weights)}, metrics)
        norm, loss = record.get("grad_norm"), record.get("loss")
        if norm is not None and math.isfinite(norm):
            median = float(numpy.median(self._norms)) if len(self._norms) >= 10 else None
            self._warn(median is not None and norm > EXPLODE_FACTOR * median, "exploding", record,
                       f"gradient norm {norm:.3g} is {norm / (median or 1):.0f}x the recent median "
                       f"{median or 0:.3g}: the loss may spike; lower train.lr, or keep "
                       f"train.grad_clip on", display, metrics)
            self._warn(norm < VANISH_NORM, "vanishing", record,
                       f"gradient norm {norm:.2g}: almost nothing reaches the weights; check "
                       f"with `xpmodel doctor`", display, metrics)
            self._norms.append(norm)
        if loss is not None and math.isfinite(loss):
            if len(self._first_losses) < 5 and step <= 5:   # a run's start, not a resume's
                self._first_losses.append(loss)
            if not self._first_losses:
                return
            start = sum(self._first_losses) / len(self._first_losses)
            self._recent.append(loss)
            recent = sum(self._recent) / len(self._recent)
            if step >= FLAT_AFTER_STEPS and "flat" not in self._active:   # once a run
                self._warn(abs(recent - start) <= FLAT_TOLERANCE * abs(start), "flat", record,
                           f"the loss has not moved from {start:.4f} in {step} steps: raise "
                           f"train.lr, or check with `xpmodel doctor`", display, metrics)

    def on_eval(self, record, display, metrics):
        """After an evaluation record: the overfitting warning."""
        if record.get("train_loss") is None:
            return
        self._evals.append((record["step"], record["train_loss"], record["val_loss"]))
        last = self._evals[-(OVERFIT_EVALS + 1):]
        rising = len(last) == OVERFIT_EVALS + 1 and all(
            b[2] > a[2] and b[1] < a[1] for a, b in zip(last, last[1:]))
        best = ""
        if rising:
            best = self._best_checkpoint()
        self._warn(rising, "overfitting", record,
                   f"validation loss rose for {OVERFIT_EVALS} evaluations ({last[0][2]:.4f} -> "
                   f"{last[-1][2]:.4f}) while the training loss fell: overfitting{best}; more "
                   f"data, model.dropout, train.weight_decay or train.early_stop_patience",
                   display, metrics)

    def _best_checkpoint(self):
        path = self.trainer.run_dir.best_path
        try:
            meta = read_checkpoint_meta(path)
            return (f"; the best checkpoint is step {meta['step']} (val {meta['val_loss']:.4f}), "
                    f"--checkpoint best in sample, eval and export-hf")
        except Exception:   # no best checkpoint yet, or unreadable: the warning stands without it
            return ""

    def _warn(self, condition, kind, record, text, display, metrics):
        """Show a warning when `condition` starts to hold; again only after it cleared."""
        if not condition:
            self._active.discard(kind)
            return
        if kind in self._active:
            return
        self._active.add(kind)
        display.print(f"warning: step {record['step']}: {text}")
        if metrics:
            self.trainer.log_record({"type": "warning", "step": record["step"],
                                     "epoch": record.get("epoch"), "kind": kind,
                                     "message": text}, metrics)

    # ---- NaN and Inf -------------------------------------------------------------------
    def explain_nonfinite(self, step):
        """'; re-running step N with checks: ...' naming where a NaN/Inf first
        appears, or '' when that cannot be found out."""
        t = self.trainer
        if t.dist is not None or step not in self._replay:
            return ""
        model = t.model
        bad = [n for n in model.layout.names if not bool(model.xp.isfinite(model.params[n]).all())]
        if bad:
            return f"; the weights of {bad[0]} already hold NaN/Inf"
        state, dropout_calls = self._replay[step]
        sampler = make_sampler(t.config, t.tokenizer, t.train_tokens)
        sampler.load_state_dict(state)
        saved = model.dropout_calls
        model.dropout_calls = dropout_calls
        finder = NonFiniteFinder(model)
        try:
            with numpy.errstate(all="ignore"), finder.installed(), model.shards_in_turn():
                for _ in range(t.config.train.grad_accum):
                    x, y = sampler.next_batch()
                    model.zero_grad()
                    model.forward_backward(x, y)
                    if finder.found:
                        break
        except Exception as exc:   # the explanation must never hide the real error
            return f"; re-running step {step} with checks failed ({exc.__class__.__name__})"
        finally:
            model.dropout_calls = saved
        if finder.found is None:
            return (f"; re-running step {step} with checks found every layer finite (the "
                    f"overflow is in the optimizer or depends on the GPU's rounding)")
        where, what = finder.found
        return f"; re-running step {step} with checks: the first NaN/Inf is in the {what} of {where}"


def _finite(values):
    """Numbers for JSON, to 4 significant digits; None where not finite."""
    return [None if v is None or not math.isfinite(v) else float(f"{v:.4g}") for v in values]
