"""The `shakespeare-char-cpu` run in PyTorch eager on this machine: the
same-machine baseline for xpmodel's quality goal (val loss and wall time).

Same model, data (Tiny Shakespeare as bytes, last 10% for validation), random
windows, AdamW, warmup + cosine schedule, clipping, and evaluation (20
batches every 250 steps) as `xpmodel train --config shakespeare-char-cpu`.

    python tools/torch_char_baseline.py [--data ../shared/data/tinyshakespeare.txt] [--iters 2000]
"""
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import ArgumentParser, DocstringFormatter, positive_int, text_file  # noqa: E402
from torch_gpt import torch_adamw, torch_loss, torch_params  # noqa: E402

L, H, C, T, B = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP = 1e-3, 1e-4, 100


def lr_at(step, iters):
    if step < WARMUP:
        return LR * (step + 1) / (WARMUP + 1)
    progress = (step - WARMUP) / max(1, iters - WARMUP)
    return MIN_LR + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (LR - MIN_LR)


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=DocstringFormatter)
    default_data = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
    parser.add_argument("--data", type=text_file, default=str(default_data), help="the corpus, read as bytes")
    parser.add_argument("--iters", type=positive_int, default=2000, help="training steps")
    parser.add_argument("--threads", type=positive_int, default=2, help="PyTorch's threads")
    args = parser.parse_args()
    if round(args.data.stat().st_size * 0.1) < T + 2:
        parser.error(f"--data {args.data}: too short; its last 10% (validation) must hold "
                     f"more than {T + 1} bytes")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = np.frombuffer(args.data.read_bytes(), dtype=np.uint8).astype(np.int64)
    n_val = int(round(len(data) * 0.1))
    train, val = torch.from_numpy(data[:-n_val]), torch.from_numpy(data[-n_val:])
    import xpmodel
    config = xpmodel.GPTConfig(vocab_size=257, block_size=T, n_layer=L, n_head=H, n_embd=C)
    params = torch_params(xpmodel.GPT(config, seed=1337).state_arrays())
    opt = torch_adamw(params, LR, (0.9, 0.99), 1e-8, 0.1)
    g = torch.Generator().manual_seed(1337)

    def batch(split):
        starts = torch.randint(0, len(split) - T - 1, (B,), generator=g)
        x = torch.stack([split[s:s + T] for s in starts])
        return x, torch.stack([split[s + 1:s + T + 1] for s in starts])

    def evaluate():
        with torch.no_grad():
            return float(np.mean([torch_loss(params, *batch(val), L, H, fused_attention=True).item()
                                  for _ in range(20)]))

    for step in range(args.iters):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.iters)
        x, y = batch(train)
        loss = torch_loss(params, x, y, L, H, fused_attention=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        if (step + 1) % 250 == 0 or step + 1 == args.iters:
            print(f"step {step + 1}: train loss {loss.item():.4f}, val loss {evaluate():.4f}, "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
    print(f"PyTorch {torch.__version__} eager, {args.threads} threads: {args.iters} steps in "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
