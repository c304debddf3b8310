"""Training: a run's config, data, model and optimizer, driven step by step
with evaluation, sampling, checkpoints and exact resume.

  loop.py      Trainer: the step loop
  setup.py     starting and resuming a run (the init-from policy, the sampler, the run's length)
  state.py     what a checkpoint holds, saved and restored
  evaluate.py  validation loss, samples, MFU and the summary
  signals.py   SIGINT / SIGTERM: finish the step, save, stop
"""
from .loop import Trainer
from .setup import make_schedule
from .signals import Interrupted

__all__ = ["Trainer", "Interrupted", "make_schedule"]
