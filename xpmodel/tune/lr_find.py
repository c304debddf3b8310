"""`xpmodel lr-find`: the learning-rate range test.

From a copy of the run's initial weights, train with a learning rate that
grows exponentially from `start_lr` to `end_lr` over `steps` steps (the
config's batch, optimizer, clipping and weight decay; no warmup or decay),
recording the loss at each. The test stops early once the loss has clearly
diverged (a running average above 4x its lowest, or not finite).

Rule for the suggestion: the learning rate where the smoothed loss is
lowest, divided by 10. At the minimum the rate is already at the edge of
instability; a tenth of it is still fast and leaves room for the noise of
longer runs. The loss is smoothed by a centred moving average (no lag, so
the minimum is not pushed to higher rates).

With Muon, the sweep sets lr and Muon's rate follows it in proportion: at
each step Muon runs at muon_lr * lr / (the config's lr). The suggestion is
then a pair: train.lr as above, and train.muon_lr scaled by the same factor
(suggested lr / the config's lr), the rate Muon had at that point of the sweep.
"""
import math
import os
from dataclasses import MISSING, asdict, dataclass, fields, replace

import numpy

from ..atomic import atomic_write_json, json_bytes
from ..errors import UsageError
from ..file_pairs import MAX_JSON_BYTES, remove_last_file, stamp, write_pair
from ..files import read_json
from ..train.optim import clipped_step
from ..train.outputs import check_output
from ..train.setup import make_sampler, optimizer_for
from .plot import check_png_output, is_png, png_bytes, pyplot

DIVERGENCE_FACTOR = 4.0
SUGGESTION_DIVISOR = 10.0
MIN_STEPS = 10   # fewer leave too few points to smooth and find a minimum in
MAX_STEPS = 100_000   # far more points than a plot shows; more would run for days
# The lowest --start-lr: far below any useful rate, and far enough above the
# smallest float that a tenth of any rate of the ramp is a normal positive
# number (train.lr takes it, and it prints as one).
MIN_START_LR = 1e-100


@dataclass
class RangeTest:
    lrs: list            # the rate of each step taken
    losses: list         # its training loss (None where not finite)
    smoothed: list       # the centred moving average of the losses
    min_lr: float        # the rate of the lowest smoothed loss
    steepest_lr: float   # where the smoothed loss fell fastest against log(lr)
    suggested_lr: float  # min_lr / 10
    stopped_early: bool  # the loss diverged before end_lr
    suggested_muon_lr: float | None = None   # with Muon: muon_lr scaled as lr was; None: AdamW

    @property
    def rule(self):
        rule = (f"the learning rate of the lowest smoothed loss ({self.min_lr:.2e}) divided by "
                f"{SUGGESTION_DIVISOR:g}; the loss fell fastest at {self.steepest_lr:.2e}")
        if self.suggested_muon_lr is not None:
            rule += (f"; with it train.muon_lr={self.suggested_muon_lr:.2e} (Muon's rate follows lr "
                     f"in the sweep, so muon_lr scales by the same factor)")
        return rule


def lr_range_test(subject, device="cpu", start_lr=1e-7, end_lr=1.0, steps=200):
    """Run the range test on a tune.common.Subject; returns a RangeTest.
    Its batches are random windows, whatever data.batching the config chose."""
    check_ramp(start_lr, end_lr, steps)
    t, config = subject.config.train, subject.config
    model = subject.model(device)
    optimizer = optimizer_for(model, t)
    train, _ = subject.tokens
    sampler = make_sampler(replace(config, data=replace(config.data, batching="random",
                                                         crop_augment=False)),
                           subject.tokenizer, train)
    lrs, losses = [], []
    average, lowest = None, math.inf
    stopped_early = False
    with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for i in range(steps):
            lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
            optimizer.lr = lr
            model.zero_grad()
            loss = 0.0
            for _ in range(t.grad_accum):
                x, y = sampler.next_batch()
                loss += float(model.forward_backward(x, y, scale=1.0 / t.grad_accum)) / t.grad_accum
            lrs.append(lr)
            losses.append(loss if math.isfinite(loss) else None)
            if not math.isfinite(loss):
                stopped_early = True
                break
            average = loss if average is None else 0.9 * average + 0.1 * loss
            lowest = min(lowest, average)
            if i > steps // 10 and average > DIVERGENCE_FACTOR * lowest:
                stopped_early = True
                break
            clipped_step(optimizer, t.grad_clip)
    return _analyse(lrs, losses, stopped_early, t.muon_lr / t.lr if t.optimizer == "muon" else None)


def check_ramp(start_lr, end_lr, steps):
    """UsageError unless MIN_START_LR <= start_lr < end_lr, end_lr / start_lr
    is finite, and MIN_STEPS <= steps <= MAX_STEPS. The suggestion, a tenth of a rate of
    the ramp, must be a positive number that train.lr takes (a tenth of
    5e-324 is 0)."""
    if not (0 < start_lr < end_lr and math.isfinite(end_lr)):
        raise UsageError(f"need 0 < --start-lr < --end-lr, finite, got {start_lr:g} and {end_lr:g}")
    if start_lr < MIN_START_LR:
        raise UsageError(f"--start-lr must be at least {MIN_START_LR:g}, got {start_lr:g}")
    if not math.isfinite(end_lr / start_lr):
        raise UsageError(f"--end-lr {end_lr:g} is too many times --start-lr {start_lr:g} (the ramp's "
                         f"ratio is not a finite number)")
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise UsageError(f"--steps must be from {MIN_STEPS} to {MAX_STEPS:,}, got {steps}")


def _analyse(lrs, losses, stopped_early, muon_per_lr=None):
    """The RangeTest of a sweep; muon_per_lr: Muon's rate per unit of lr (None: AdamW)."""
    finite = [(lr, loss) for lr, loss in zip(lrs, losses) if loss is not None]
    if len(finite) < 5:
        raise UsageError("the loss diverged within the first steps of the range test: lower "
                         "--start-lr")
    rates = numpy.array([lr for lr, _ in finite])
    values = numpy.array([loss for _, loss in finite])
    smoothed = _centred_average(values, max(3, len(values) // 20 * 2 + 1))
    lowest = int(numpy.argmin(smoothed))
    # the steepest fall before the minimum, in loss per decade of lr
    slopes = numpy.gradient(smoothed[:lowest + 1], numpy.log10(rates[:lowest + 1])) \
        if lowest >= 2 else numpy.zeros(1)
    steepest = int(numpy.argmin(slopes))
    smoothed_all = iter(smoothed.tolist())
    suggested = float(rates[lowest]) / SUGGESTION_DIVISOR
    return RangeTest(lrs=list(lrs), losses=list(losses),
                     smoothed=[next(smoothed_all) if loss is not None else None for loss in losses],
                     min_lr=float(rates[lowest]), steepest_lr=float(rates[steepest]),
                     suggested_lr=suggested, stopped_early=stopped_early,
                     suggested_muon_lr=None if muon_per_lr is None else suggested * muon_per_lr)


def _centred_average(values, window):
    """The mean over a window centred on each point (shrinking at the ends)."""
    half = window // 2
    sums = numpy.concatenate([[0.0], numpy.cumsum(values)])
    out = numpy.empty_like(values)
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out[i] = (sums[hi] - sums[lo]) / (hi - lo)
    return out


def check_outputs(png_path, inputs, overwrite):
    """Refuse, before the test runs, to write the plot `png_path` or its numbers
    beside it (same stem, .json) where check_output refuses them (given as
    --out: one of `inputs`, a run's own file, an existing file without
    `overwrite`), and, even with `overwrite`, to replace a file that lr-find
    could not have written there: the plot only replaces a PNG image, the
    numbers only an earlier lr-find's (a tokenizer tok.json beside
    --out tok.png stays). Numbers left by a write of this same pair that
    stopped before its plot (file_pairs.py) need no `overwrite`. Returns
    png_path as a Path."""
    png_path = check_png_output(png_path)
    for path, partner, is_lr_finds, what in (
            (png_path, None, is_png, "a PNG image"),
            (png_path.with_suffix(".json"), png_path, _is_result_json,
             "an earlier lr-find's numbers")):
        check_output(path, "--out", inputs, overwrite=True)   # an input, a run's file, a folder
        if os.path.lexists(path) and not is_lr_finds(path):
            raise UsageError(f"--out {png_path}: {path} exists and is not {what}; lr-find will "
                             f"not replace it, even with --overwrite; choose another --out")
        check_output(path, "--out", overwrite=overwrite, partner=partner)
    return png_path


def _is_result_json(path):
    """Whether `path` is a JSON object with every key write_results writes."""
    keys = {f.name for f in fields(RangeTest) if f.default is MISSING} | {"rule"}
    try:
        return keys <= read_json(path, MAX_JSON_BYTES, UsageError, "lr-find result").keys()
    except (UsageError, OSError):   # not a regular file, too large, not a JSON object
        return False


def write_results(result, png_path, title):
    """The test's numbers as JSON beside `png_path` (same stem, .json), and the
    plot when matplotlib is installed; returns the paths written. The two are
    a pair written in file_pairs.py's order: both written, then an existing
    plot is removed, the numbers land naming the plot, then the plot, so a
    plot is only ever beside the numbers it shows, and numbers left alone by
    a kill are replaced by the rerun. Without matplotlib the numbers name no
    plot and are whole alone."""
    png_path = check_png_output(png_path)
    json_path = png_path.with_suffix(".json")
    document = {**asdict(result), "rule": result.rule}
    try:
        plt = pyplot()
    except UsageError:   # without matplotlib, the JSON alone
        remove_last_file(png_path)   # an earlier test's plot, which these numbers are not
        atomic_write_json(json_path, document)
        return [json_path]
    plot = png_bytes(plt, draw_range_test(plt, result, title))
    numbers = json_bytes({**document, **stamp(png_path)})
    write_pair(json_path, png_path, lambda f: f.write(numbers), lambda f: f.write(plot))
    return [png_path, json_path]


def draw_range_test(plt, result, title):
    """A figure of the loss at each step and smoothed against the learning
    rate (log scale), with the lowest smoothed loss and the suggestion marked."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    points = [(lr, loss) for lr, loss in zip(result.lrs, result.losses) if loss is not None]
    ax.plot(*zip(*points), ".", ms=3, alpha=0.4, color="tab:blue", label="loss at each step")
    smooth = [(lr, s) for lr, s in zip(result.lrs, result.smoothed) if s is not None]
    ax.plot(*zip(*smooth), color="tab:blue", lw=1.6, label="smoothed")
    ax.axvline(result.min_lr, color="grey", ls=":", label=f"lowest smoothed loss {result.min_lr:.1e}")
    muon = "" if result.suggested_muon_lr is None else f" (train.muon_lr {result.suggested_muon_lr:.1e})"
    ax.axvline(result.suggested_lr, color="tab:red", ls="--",
               label=f"suggested train.lr {result.suggested_lr:.1e}{muon}")
    first = points[0][1]
    ax.set_ylim(min(p[1] for p in points) * 0.95, first * 1.4)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return fig
