"""xpmodel: GPT language models (GPT-2, and Llama-style blocks) with hand-written
forward and backward passes, on NumPy (CPU) or CuPy (CUDA)."""
from .backend import get_device
from .model.gpt import GPT, GPTConfig
from .tokenizer.bpe import BPETokenizer
from .train.loss_scale import LossScaler
from .train.muon import Muon
from .train.optim import SGD, AdamW, clip_grad_norm, grad_norm
from .train.runs import load
from .train.schedule import (ConstantSchedule, CosineSchedule, LinearSchedule, StepSchedule,
                             WSDSchedule)

__version__ = "0.1.0"

__all__ = ["GPT", "GPTConfig", "AdamW", "Muon", "SGD", "clip_grad_norm", "grad_norm", "CosineSchedule",
           "ConstantSchedule", "LinearSchedule", "StepSchedule", "WSDSchedule", "LossScaler",
           "BPETokenizer", "get_device", "load", "__version__"]
