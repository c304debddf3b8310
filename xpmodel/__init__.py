"""xpmodel: GPT language models (GPT-2, and Llama-style blocks) with hand-written
forward and backward passes, on NumPy (CPU) or CuPy (CUDA).

The names below are imported when first used, so that the `xpmodel` command
starts without NumPy and the model code, and a Ctrl-C in its first instant
meets its own handling rather than an import."""
import importlib

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {"get_device": "backend", "GPT": "model.gpt", "GPTConfig": "model.gpt",
            "BPETokenizer": "tokenizer.bpe", "LossScaler": "train.loss_scale",
            "Muon": "train.muon", "SGD": "train.optim", "AdamW": "train.optim",
            "clip_grad_norm": "train.optim", "grad_norm": "train.optim", "load": "train.runs",
            **dict.fromkeys(("ConstantSchedule", "CosineSchedule", "LinearSchedule",
                             "StepSchedule", "WSDSchedule"), "train.schedule")}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'xpmodel' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
