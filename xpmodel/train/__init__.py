"""Training: a run's config, data, model and optimizer, driven step by step
with evaluation, sampling, checkpoints and exact resume.

  loop.py        Trainer: the step loop
  setup.py       starting and resuming a run (the init-from policy, the sampler, the
                 run's length, the optimizer and schedule its config asks for)
  state.py       what a checkpoint holds, saved and restored
  evaluate.py    validation loss, samples, MFU and the summary
  health.py      per-layer records, warnings, and where a NaN came from
  nonfinite.py   the model's passes re-run with every layer's result checked
  mirrors.py     TensorBoard and W&B copies of the metrics
  signals.py     SIGINT / SIGTERM: finish the step, save, stop
  optim.py       AdamW, SGD and global-norm clipping on the flat buffers
  muon.py        Muon for the blocks' matrices, AdamW for the rest
  schedule.py    learning-rate schedules
  loss_scale.py  dynamic loss scaling for fp16
  peak_flops.py  the GPUs' dense fp16/bf16 peaks that MFU is measured against
  checkpoint.py  checkpoint files (safetensors) written atomically, read with checks
  rundir.py      a run directory: its files, config, checkpoints and metrics
  runlock.py     the one-writer lock on a run directory
  runs.py        trained runs loaded (`xpmodel.load`) and weights for --init-from
  outputs.py     where a command may write (never an input or a run's own files)
  display.py     the live terminal display
"""
from .loop import Trainer
from .signals import Interrupted

__all__ = ["Trainer", "Interrupted"]
