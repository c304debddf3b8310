"""Learning-rate schedules: a function of the optimizer step (0-based).

Every schedule but `constant` starts with the same linear warmup, from
lr / (warmup_iters + 1) up to lr, and never goes below min_lr once it decays:

    cosine    half a cosine from lr down to min_lr at decay_iters
    linear    a straight line from lr down to min_lr at decay_iters
    step      lr * gamma ** k after k more blocks of step_size steps (the
              guide's StepLR), floored at min_lr
    wsd       warmup-stable-decay: lr held flat, then a straight line to
              min_lr over the last decay_fraction of decay_iters
    constant  lr after the warmup

`schedule_from_config` builds the one a run's train section names. The
arguments are checked as the optimizers' are (checks.py): rates are finite
numbers, step counts integers.
"""
import math

from ..checks import NON_NEGATIVE, POSITIVE, POSITIVE_FRACTION, check_integer, check_number
from ..options import SCHEDULES


def _warmup(lr, warmup_iters, step):
    return lr * (step + 1) / (warmup_iters + 1)


def _check_rates(lr, min_lr):
    """(lr, min_lr) as floats, with 0 <= min_lr <= lr; ValueError otherwise."""
    lr = check_number("lr", lr, NON_NEGATIVE)
    min_lr = check_number("min_lr", min_lr, NON_NEGATIVE)
    if min_lr > lr:
        raise ValueError(f"min_lr ({min_lr:g}) must be in [0, lr={lr:g}]")
    return lr, min_lr


def _check_decay(warmup_iters, decay_iters):
    """(warmup_iters, decay_iters) as ints, with 0 <= warmup_iters <= decay_iters."""
    warmup_iters = check_integer("warmup_iters", warmup_iters)
    decay_iters = check_integer("decay_iters", decay_iters)
    if decay_iters < warmup_iters:
        raise ValueError(f"need 0 <= warmup_iters ({warmup_iters}) <= decay_iters "
                         f"({decay_iters})")
    return warmup_iters, decay_iters


class _WarmupDecay:
    """Linear warmup to `lr` over `warmup_iters`, a decay shaped by `weight`
    (1 at the start of the decay, 0 at its end) to `min_lr` at `decay_iters`,
    then `min_lr`."""

    def __init__(self, lr, min_lr, warmup_iters, decay_iters):
        self.lr, self.min_lr = _check_rates(lr, min_lr)
        self.warmup_iters, self.decay_iters = _check_decay(warmup_iters, decay_iters)

    def __call__(self, step):
        step = check_integer("step", step)
        if step < self.warmup_iters:
            return _warmup(self.lr, self.warmup_iters, step)
        if step >= self.decay_iters:
            return self.min_lr
        progress = (step - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters)
        return self.min_lr + self.weight(progress) * (self.lr - self.min_lr)


class CosineSchedule(_WarmupDecay):
    """Warmup, then a cosine decay to `min_lr` at `decay_iters`, then `min_lr`."""

    @staticmethod
    def weight(progress):
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class LinearSchedule(_WarmupDecay):
    """Warmup, then a straight line down to `min_lr` at `decay_iters`, then `min_lr`."""

    @staticmethod
    def weight(progress):
        return 1.0 - progress


class StepSchedule:
    """Linear warmup to `lr`, then `lr * gamma ** k` for the k-th block of
    `step_size` steps after the warmup, never below `min_lr` (min_lr = 0 is
    PyTorch's StepLR after a warmup)."""

    def __init__(self, lr, min_lr, warmup_iters, step_size, gamma):
        self.lr, self.min_lr = _check_rates(lr, min_lr)
        self.warmup_iters = check_integer("warmup_iters", warmup_iters)
        self.step_size = check_integer("step_size", step_size, POSITIVE)
        self.gamma = check_number("gamma", gamma, POSITIVE_FRACTION)

    def __call__(self, step):
        step = check_integer("step", step)
        if step < self.warmup_iters:
            return _warmup(self.lr, self.warmup_iters, step)
        drops = (step - self.warmup_iters) // self.step_size
        return max(self.min_lr, self.lr * self.gamma ** drops)


class WSDSchedule:
    """Warmup-stable-decay: linear warmup to `lr`, `lr` held until the last
    `decay_fraction` of `decay_iters` steps, a straight line down to `min_lr`
    at `decay_iters`, then `min_lr`. The decay never starts inside the warmup."""

    def __init__(self, lr, min_lr, warmup_iters, decay_iters, decay_fraction=0.2):
        self.lr, self.min_lr = _check_rates(lr, min_lr)
        warmup_iters, decay_iters = _check_decay(warmup_iters, decay_iters)
        decay_fraction = check_number("decay_fraction", decay_fraction, POSITIVE_FRACTION)
        self.warmup_iters, self.decay_iters = warmup_iters, decay_iters
        self.decay_start = max(warmup_iters, decay_iters - round(decay_fraction * decay_iters))

    def __call__(self, step):
        step = check_integer("step", step)
        if step < self.warmup_iters:
            return _warmup(self.lr, self.warmup_iters, step)
        if step >= self.decay_iters:
            return self.min_lr
        if step < self.decay_start:
            return self.lr
        progress = (step - self.decay_start) / max(1, self.decay_iters - self.decay_start)
        return self.lr + progress * (self.min_lr - self.lr)


class ConstantSchedule:
    """`lr` at every step, after an optional linear warmup."""

    def __init__(self, lr, warmup_iters=0):
        self.lr = check_number("lr", lr, NON_NEGATIVE)
        self.warmup_iters = check_integer("warmup_iters", warmup_iters)

    def __call__(self, step):
        step = check_integer("step", step)
        if step < self.warmup_iters:
            return _warmup(self.lr, self.warmup_iters, step)
        return self.lr


def schedule_from_config(train, total_steps):
    """The schedule `train.schedule` names, for a run of `total_steps` steps.

    train.lr_decay_iters None means the run's length (the config and
    setup.count_steps hold the warmup within both). step decay's step_size
    None means a third of the steps after the warmup, so the rate drops three
    times in the run.
    """
    if train.schedule == "constant":
        return ConstantSchedule(train.lr, train.warmup_iters)
    decay, warmup = train.lr_decay_iters or total_steps, train.warmup_iters
    if train.schedule == "cosine":
        return CosineSchedule(train.lr, train.min_lr, warmup, decay)
    if train.schedule == "linear":
        return LinearSchedule(train.lr, train.min_lr, warmup, decay)
    if train.schedule == "wsd":
        return WSDSchedule(train.lr, train.min_lr, warmup, decay, train.decay_fraction)
    if train.schedule == "step":
        step_size = train.step_size or max(1, (decay - warmup) // 3)
        return StepSchedule(train.lr, train.min_lr, warmup, step_size, train.gamma)
    raise ValueError(f"unknown schedule {train.schedule!r}; expected one of {', '.join(SCHEDULES)}")
