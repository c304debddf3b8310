"""`xpmodel doctor`: the guide's debugging steps for a model that will not
learn, as one command and one pass/fail report.

  config        settings that are legal but unlikely to be meant
  data          split sizes, tokens per parameter, the epochs the run makes
  tokenizer     text survives decode -> encode -> decode; how much of the vocabulary the data uses
  initial-loss  close to ln(V): a fresh model should be unsure of every token
  gradients     every parameter gets a finite, non-zero gradient from one batch
  finite-diff   a tiny float64 copy of the architecture (same options, small
                widths) matches central differences along random directions,
                one parameter at a time
  overfit       one batch is learned to near-zero loss within a few hundred steps

Each check says what to change when it fails. The model checks run the
config's own model on the chosen device; the finite-difference check runs on
the CPU in float64, where the layers' xp code is the code under test.
"""
import math
from dataclasses import dataclass, replace

import numpy

from ..backend import get_device, to_host
from ..data import RandomWindowSampler
from ..errors import DataError, UsageError, XpmodelError, counted
from ..model.gpt import GPT
from ..train.optim import clipped_step
from ..train.setup import count_steps, optimizer_for

PASS, WARN, FAIL = "pass", "warn", "fail"
# The checks in the order they run; `--skip NAME` takes these names.
CHECKS = ("config", "data", "tokenizer", "initial-loss", "gradients", "finite-diff", "overfit")

# A fresh model's loss may be this far (relative) from ln(V) and still pass.
INITIAL_LOSS_TOLERANCE = 0.1
# Worst relative error of <grad, d> against the central difference, in float64.
FINITE_DIFFERENCE_TOLERANCE = 1e-5
# One batch is "learned" once its loss is below this (nats per token).
OVERFIT_TARGET = 0.1
# Rows of the batch the overfit check memorises (more rows only take longer).
OVERFIT_ROWS = 8
# The overfit check calls the run diverged when the loss is NaN/Inf, or when at
# some step it stood more than OVERFIT_RISE_MARGIN (relative) above its first
# value and it ended above OVERFIT_DIVERGED_END of that value, the batch not
# learned: on one fixed batch with no noise, small enough steps only lower the
# loss. Adam at its peak rate without warmup often spikes once early and then
# learns (shakespeare-char-cpu at lr 3e-3: 5.60, 7.55 at step 7, 0.44 at step 60);
# a loss that came down to under half its start is learning, not diverging.
# Below the margin, a loss that ends where it began is flat.
OVERFIT_RISE_MARGIN = 0.1
OVERFIT_DIVERGED_END = 0.5
# A loss that ends more than this far (relative) above the lowest it reached rose
# again: the steps are too large for it to settle (tiny-run.yaml at lr 0.1: down
# to 0.583, ending at 1.643 after 60 steps). Where the loss fell steadily
# (tiny-run.yaml at lr 0.003..0.05, shakespeare-char-cpu at 0.001..0.003), the
# last loss of a run of any length up to 300 steps was within 8% of the lowest.
OVERFIT_REBOUND_MARGIN = 0.25
# The checks must repeat: no dropout and no embedding noise in their models.
NOISELESS = dict(dropout=0.0, embedding_noise=0.0)


@dataclass
class Check:
    name: str
    status: str          # pass, warn or fail
    detail: str          # what was measured
    advice: str = ""     # what to do about a warning or failure

    def lines(self):
        """The check as plain text lines of the report."""
        out = [f"  {self.status.upper():4}  {self.name:13} {self.detail}"]
        if self.advice and self.status != PASS:
            out.append(f"        {'':13} -> {self.advice}")
        return out


@dataclass
class Report:
    subject: str
    checks: list

    @property
    def failed(self):
        return [c for c in self.checks if c.status == FAIL]

    @property
    def ok(self):
        return not self.failed

    def title(self):
        return f"doctor: {self.subject}"

    def summary(self):
        failed, warned = len(self.failed), sum(c.status == WARN for c in self.checks)
        passed = len(self.checks) - failed - warned
        return f"{passed} passed, {counted(warned, 'warning')}, {failed} failed"


def diagnose(subject, device="cpu", overfit_steps=300, say=None, skip=(), show=lambda line: None):
    """Run every check on a tune.common.Subject; returns a Report. `skip`
    names checks to leave out (e.g. "overfit" for a model too big for the CPU),
    as in CHECKS ("finite diff" is taken for "finite-diff"). `show(line)` gets
    the report's lines as they come: its title, each check's as soon as it
    ends, the summary. A device this machine lacks is refused before any check."""
    device = get_device(device)
    skip = checks_to_skip(skip)
    steps = [("config", lambda: check_config(subject)),
             ("data", lambda: check_data(subject)),
             ("tokenizer", lambda: check_tokenizer(subject)),
             ("initial-loss", lambda: check_initial_loss(subject, device)),
             ("gradients", lambda: check_gradients(subject, device)),
             ("finite-diff", lambda: check_finite_differences(subject.gpt_config)),
             ("overfit", lambda: check_overfit(subject, device, overfit_steps))]
    subject.tokens   # read first: data that cannot be read (not UTF-8, too short) is one error
    report = Report(f"{subject.name} ({subject.gpt_config.num_params():,} parameters, "
                    f"vocab {subject.gpt_config.vocab_size:,})", [])
    show(report.title())
    for name, run in steps:
        if name in skip:
            continue
        if say:
            say(f"checking {name} ...")
        try:
            check = run()
        except XpmodelError as exc:
            check = Check(name, FAIL, str(exc), "fix the error above first")
        report.checks.append(check)
        for line in check.lines():
            show(line)
    show(report.summary())
    return report


def checks_to_skip(names):
    """The set of CHECKS that --skip `names` leaves out ("finite diff" is taken
    for "finite-diff"); a UsageError for an unknown name, or for all of them (a
    report of no check would say "0 passed" and exit 0)."""
    skip = {name.replace(" ", "-") for name in names}
    unknown = sorted(skip - set(CHECKS))
    if unknown:
        raise UsageError(f"unknown check {unknown[0]!r} to skip; the checks are {', '.join(CHECKS)}")
    if skip == set(CHECKS):
        raise UsageError(f"--skip leaves out every check ({', '.join(CHECKS)}); keep at least one")
    return skip


# ---- config, data, tokenizer -------------------------------------------------------

def check_config(subject):
    """The run's settings; the run's length (a UsageError such as a warmup
    longer than an epoch run fails this check) unless the data cannot make
    the trainer's batches, which check_data reports."""
    t = subject.config.train
    try:
        steps, epochs = _run_length(subject)
    except DataError:
        steps = epochs = None
    notes, advice = [], []
    if t.optimizer == "adamw" and not 1e-5 <= t.lr <= 1e-2:
        notes.append(f"train.lr={t.lr:g} is outside AdamW's usual 1e-5..1e-2")
        advice.append("run `xpmodel lr-find` to choose train.lr")
    if steps is not None and t.warmup_iters > 0.3 * steps:
        notes.append(f"warmup ({t.warmup_iters} steps) is {t.warmup_iters / steps:.0%} of the run")
        advice.append("lower train.warmup_iters to a few percent of the run")
    if steps is not None and t.eval_interval > steps:
        notes.append(f"train.eval_interval={t.eval_interval} is longer than the run ({steps} "
                     f"steps): validation only at the end")
        advice.append("lower train.eval_interval to see the validation curve")
    if t.grad_clip == 0:
        notes.append("gradient clipping is off")
        advice.append("train.grad_clip=1.0 guards against loss spikes")
    if subject.config.model.dropout > 0 and epochs is not None and epochs < 1:
        notes.append(f"dropout {subject.config.model.dropout:g} in a run of under one epoch")
        advice.append("model.dropout=0 trains faster when no token is seen twice")
    length = f"{steps:,} steps" if steps is not None else "length unknown (see data)"
    detail = "; ".join(notes) if notes else (f"{length}, lr {t.lr:g}, warmup "
                                              f"{t.warmup_iters}, clip {t.grad_clip:g}")
    return Check("config", WARN if notes else PASS, detail, "; ".join(advice))


def _run_length(subject):
    """(steps, epochs) of the run, counted as the trainer counts them: a
    DataError where the data cannot make its batches, a UsageError where the
    settings do not fit the run's length."""
    t = subject.config.train
    steps = count_steps(t, subject.sampler)
    return steps, subject.sampler.epochs_after(steps * t.grad_accum)


def check_data(subject):
    t, T = subject.config.train, subject.config.model.block_size
    train, val = subject.tokens
    n_params = subject.gpt_config.num_params()
    try:
        steps, epochs = _run_length(subject)
    except UsageError:      # a setting that does not fit the run: check_config's to report
        steps = epochs = None
    per_param = len(train) / n_params
    detail = (f"{subject.corpus.size_text()} -> {len(train):,} train + {len(val):,} val tokens; "
              f"{per_param:.2g} train tokens per parameter")
    if steps is not None:
        tokens_per_step = t.batch_size * t.grad_accum * T
        detail += f"; {steps:,} steps x {tokens_per_step:,} tokens = {epochs:.2f} epochs"
    problems, advice = [], []
    if len(val) < t.batch_size * (T + 1):
        problems.append("the validation split holds fewer than one batch of windows")
        advice.append("raise data.val_fraction so validation is more than a few windows")
    if epochs is not None and epochs > 20:
        problems.append(f"{epochs:.0f} epochs will memorise the training data")
        advice.append("use more data, a smaller model, fewer steps, or train.early_stop_patience")
    if per_param < 0.5 and epochs is not None and epochs > 3:
        problems.append(f"only {per_param:.2g} tokens per parameter")
        advice.append("a smaller model (model.n_embd, model.n_layer) or more data; "
                      "about 20 tokens per parameter is compute-optimal")
    if problems:
        detail += "; " + "; ".join(problems)
    return Check("data", WARN if problems else PASS, detail, "; ".join(advice))


def check_tokenizer(subject):
    tokenizer = subject.tokenizer
    train, _ = subject.tokens
    ids = [int(i) for i in train[:2000]]
    text = tokenizer.decode(ids)
    again = tokenizer.decode(tokenizer.encode(text, allowed_special="all"))
    if again != text:
        where = next((i for i, (a, b) in enumerate(zip(text, again)) if a != b), min(len(text), len(again)))
        return Check("tokenizer", FAIL, f"decode -> encode -> decode changes the text at "
                                        f"character {where}: {text[max(0, where - 20):where + 20]!r}",
                     "the token file was made with another tokenizer: delete the token cache "
                     "(data.cache_dir) or check data.tokenizer")
    used = len(numpy.unique(numpy.asarray(train[:1_000_000])))
    V = subject.gpt_config.vocab_size
    detail = (f"round trip ok; the data uses {used:,} of {V:,} ids"
              + (f" (tokenizer {tokenizer.vocab_size:,})" if tokenizer.vocab_size != V else ""))
    if used < 0.25 * tokenizer.vocab_size and tokenizer.vocab_size > 512:
        return Check("tokenizer", WARN, detail + " (most ids never appear: their embeddings "
                                                 "only decay)",
                     "lower data.vocab_size to fit the corpus")
    return Check("tokenizer", PASS, detail)


# ---- the model -----------------------------------------------------------------------

def _batches(subject, rows=None, count=1):
    t, T = subject.config.train, subject.config.model.block_size
    train, _ = subject.tokens
    sampler = RandomWindowSampler(train, rows or t.batch_size, T, t.seed, token_dropout=0.0,
                                  vocab_size=subject.tokenizer.vocab_size)
    return [sampler.next_batch() for _ in range(count)]


def check_initial_loss(subject, device):
    model = subject.model(device, **NOISELESS).eval()
    losses = [float(model.loss(x, y)) for x, y in _batches(subject, count=2)]
    loss, expected = float(numpy.mean(losses)), math.log(model.config.vocab_size)
    detail = f"{loss:.4f} at step 0, ln(V) = {expected:.4f} for V = {model.config.vocab_size:,}"
    if subject.pretrained is not None:
        return Check("initial-loss", PASS, detail + " (pretrained weights: lower is expected)")
    if not math.isfinite(loss):
        return Check("initial-loss", FAIL, detail, "the forward pass overflows at "
                     "initialisation: check the init scale and the norms' eps")
    if abs(loss - expected) > INITIAL_LOSS_TOLERANCE * expected:
        return Check("initial-loss", FAIL, detail + f" (off by {loss / expected - 1:+.0%})",
                     "the initial logits are not near zero: the embedding or head init is too "
                     "large, or the loss is not the mean over tokens")
    return Check("initial-loss", PASS, detail)


def check_gradients(subject, device):
    """Every parameter's gradient from one training batch: finite and not all zero."""
    model = subject.model(device, **NOISELESS)
    model.zero_grad()
    (x, y), = _batches(subject)
    model.forward_backward(x, y)
    zero, broken = [], []
    for name in model.layout.names:
        g = to_host(model.grads[name])
        if not numpy.isfinite(g).all():
            broken.append(name)
        elif not numpy.any(g):
            zero.append(name)
    n = len(model.layout.names)
    if broken or zero:
        parts = []
        if broken:
            parts.append(f"{len(broken)} of {n} parameters have NaN/Inf gradients: {_names(broken)}")
        if zero:
            parts.append(f"{len(zero)} of {n} get no gradient: {_names(zero)}")
        return Check("gradients", FAIL, "; ".join(parts),
                     "those parameters' layers drop their gradient: check their backward adds "
                     "into the gradient views (and is wired in layers/block.py)")
    return Check("gradients", PASS, f"all {n} parameters get finite, non-zero gradients")


def _names(names, limit=4):
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def tiny_copy(config):
    """A float64-checkable GPTConfig with `config`'s options and small widths:
    at most 2 layers, 2 heads of 8 (sharing one key/value head under GQA),
    a 40-id vocabulary, 8 positions."""
    return replace(config, vocab_size=40, block_size=8, n_layer=min(config.n_layer, 2), n_head=2,
                   n_embd=16, n_kv_head=1 if config.kv_heads != config.n_head else None,
                   mlp_hidden=None if config.mlp_hidden is None else 24, dropout=0.0)


def finite_difference_errors(config, seed=0, eps=1e-6):
    """name -> relative error of the analytic directional derivative of the
    loss along a random direction in that parameter against the central
    difference, for `config`'s architecture in float64 on the CPU."""
    model = GPT(config, device="cpu", dtype="float64", seed=seed)
    rng = numpy.random.default_rng(seed)
    for view in model.params.values():   # off the init's symmetric points (zero biases, unit norms)
        view += rng.normal(0.0, 0.02, size=view.shape)
    B, T = 2, config.block_size
    x = rng.integers(0, config.vocab_size, size=(B, T))
    y = rng.integers(0, config.vocab_size, size=(B, T))
    model.zero_grad()
    model.forward_backward(x, y)
    errors = {}
    for name in model.layout.names:
        view, grad = model.params[name], model.grads[name]
        d = rng.standard_normal(view.shape)
        view += eps * d
        up = float(model.loss(x, y))
        view -= 2 * eps * d
        down = float(model.loss(x, y))
        view += eps * d
        numeric = (up - down) / (2 * eps)
        analytic = float(numpy.sum(grad * d))
        errors[name] = abs(numeric - analytic) / max(1e-12, abs(numeric) + abs(analytic))
    return errors


def check_finite_differences(config):
    tiny = tiny_copy(config)
    errors = finite_difference_errors(tiny)
    # backward order (head first): the first parameter listed is nearest the broken layer
    bad = [name for name, err in reversed(errors.items()) if not err <= FINITE_DIFFERENCE_TOLERANCE]
    worst = max(errors, key=lambda n: errors[n] if math.isfinite(errors[n]) else math.inf)
    shape = f"{tiny.n_layer} layers, C={tiny.n_embd}, V={tiny.vocab_size}, T={tiny.block_size}"
    if bad:
        return Check("finite-diff", FAIL,
                     f"{len(bad)} of {len(errors)} parameters' gradients disagree with finite "
                     f"differences ({shape}, float64): {_names(bad)}; worst {worst} "
                     f"(relative error {errors[worst]:.1e})",
                     "a backward pass is wrong: start at the first parameter listed (they are in "
                     "backward order, from the head down); tests/test_layers.py checks each layer")
    return Check("finite-diff", PASS, f"{len(errors)} parameters agree ({shape}, float64); worst "
                                      f"relative error {errors[worst]:.1e} ({worst})")


def check_overfit(subject, device, steps=300, target=OVERFIT_TARGET):
    """Train on one batch with the config's optimizer (dropout and weight decay
    off, its peak rates held constant) until the loss is below `target`, at
    most `steps` steps. A loss that turns NaN/Inf, or that climbs more than
    OVERFIT_RISE_MARGIN above its first value and ends above
    OVERFIT_DIVERGED_END of it, is reported as diverged, and one that ends
    more than OVERFIT_REBOUND_MARGIN above its lowest as rising again: both say
    to lower the rate, never that the loss barely moved or learns slowly."""
    t = replace(subject.config.train, weight_decay=0.0, muon_weight_decay=0.0)
    model = subject.model(device, **NOISELESS)
    optimizer = optimizer_for(model, t)
    (x, y), = _batches(subject, rows=min(t.batch_size, OVERFIT_ROWS))
    first = loss = None
    highest, highest_step = -math.inf, 0
    lowest, lowest_step = math.inf, 0
    with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for step in range(1, steps + 1):
            model.zero_grad()
            loss = float(model.forward_backward(x, y))
            first = loss if first is None else first
            if loss > highest:
                highest, highest_step = loss, step
            if loss < lowest:
                lowest, lowest_step = loss, step
            if loss < target or not math.isfinite(loss):
                break
            clipped_step(optimizer, t.grad_clip)
    muon = t.optimizer == "muon"
    rates = f"lr {t.lr:g}" + (f", muon_lr {t.muon_lr:g}" if muon else "")
    detail = (f"one batch of {x.shape[0]}x{x.shape[1]} tokens: loss {first:.3f} -> {loss:.4f} "
              f"in {step} steps with {t.optimizer} at {rates}")
    lower = (f"lower train.lr (now {t.lr:g})" + (f" and train.muon_lr (now {t.muon_lr:g})" if muon
                                                  else "") + "; `xpmodel lr-find` suggests one")
    if not math.isfinite(loss):
        return Check("overfit", FAIL, detail, f"the loss diverged on one batch: {lower}")
    if loss >= target:
        if highest > first * (1 + OVERFIT_RISE_MARGIN) and loss > first * OVERFIT_DIVERGED_END:
            return Check("overfit", FAIL, detail + f" (highest {highest:.4f} at step "
                                                   f"{highest_step}; target < {target})",
                         f"the loss diverged: it rose above where it started, so the steps are "
                         f"too large: {lower}")
        if loss > lowest * (1 + OVERFIT_REBOUND_MARGIN):
            return Check("overfit", FAIL, detail + f" (lowest {lowest:.4f} at step "
                                                   f"{lowest_step}; target < {target})",
                         f"the loss rose again after falling, so the steps are too large for it "
                         f"to settle: {lower}")
        fell = first - loss
        hint = ("the loss barely moved: gradients are not reaching the weights, or train.lr is "
                "far too small" if fell < 0.1 * first else
                "it learns but slowly: raise train.lr, or give more steps (--overfit-steps)")
        return Check("overfit", FAIL, detail + f" (target < {target})", hint)
    return Check("overfit", PASS, detail)
