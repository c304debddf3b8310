"""Learning-rate schedules: a function of the optimizer step."""
import math


class CosineSchedule:
    """Linear warmup to `lr` over `warmup_iters`, cosine decay to `min_lr` at
    `decay_iters`, then `min_lr`."""

    def __init__(self, lr, min_lr, warmup_iters, decay_iters):
        if not 0 <= min_lr <= lr:
            raise ValueError(f"min_lr ({min_lr}) must be in [0, lr={lr}]")
        if warmup_iters < 0 or decay_iters < warmup_iters:
            raise ValueError(f"need 0 <= warmup_iters ({warmup_iters}) <= decay_iters "
                             f"({decay_iters})")
        self.lr, self.min_lr = lr, min_lr
        self.warmup_iters, self.decay_iters = warmup_iters, decay_iters

    def __call__(self, step):
        if step < self.warmup_iters:
            return self.lr * (step + 1) / (self.warmup_iters + 1)
        if step >= self.decay_iters:
            return self.min_lr
        progress = (step - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters)
        weight = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + weight * (self.lr - self.min_lr)


class ConstantSchedule:
    """`lr` at every step, after an optional linear warmup."""

    def __init__(self, lr, warmup_iters=0):
        self.lr, self.warmup_iters = lr, warmup_iters

    def __call__(self, step):
        if step < self.warmup_iters:
            return self.lr * (step + 1) / (self.warmup_iters + 1)
        return self.lr
