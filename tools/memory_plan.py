"""The largest micro-batch that fits one GPU, computed from what xpmodel keeps.

For GPT-2 sizes at T = 1024 in fp16 mixed precision (flash attention), per
train.recompute mode, on an 80 GB H100 and a 141 GB H200 (their memory as
nvidia-smi reports it: 81,559 and 143,771 MiB). Nothing is allocated: the
bytes come from the arrays the model holds, counted below, and the model is
checked against one measurement (gpt2-small, B = 16: a 7.83 GiB peak on an
H200, tools/GPU_NOTES.md).

    python tools/memory_plan.py [--seq 1024] [--headroom 0.9]

Counted per parameter: float32 master weights, gradients and AdamW's two
moments, and the float16 working copy (18 bytes). Per token and block (C
channels, float16 = 2 bytes, float32 = 4), what backward reads:
  norm_1 output 2C + its float32 xhat 4C, the (3, H, D) heads 6C, the
  attention output 2C, norm_2 output 2C + xhat 4C, the MLP's c_fc output and
  GELU output 8C + 8C                                       = 36C
  recompute "mlp": the two MLP arrays go                    = 20C
  recompute "block": the float32 block input alone          =  4C
plus, once, the block being recomputed in backward (recompute "block": its
36C per token; "mlp": the MLP's two arrays, 16C) and the largest transients
of the head: a chunk of 2^27 logits in float16 and the float32 hidden-state
gradient.
"""
from cli_args import ArgumentParser, DocstringFormatter, fraction, positive_int

SIZES = {"124M": (12, 768), "350M": (24, 1024), "774M": (36, 1280), "1.5B": (48, 1600)}
PER_TOKEN_LAYER = {"none": 36, "mlp": 20, "block": 4}   # bytes per channel
RECOMPUTED = {"none": 0, "mlp": 16, "block": 36}          # one block's, in backward
GPUS = {"H100 80 GB": 81559 * 2**20, "H200 141 GB": 143771 * 2**20}
V = 50304
GIB = 2 ** 30


def n_params(L, C, T):
    return V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C


def peak_bytes(L, C, T, B, recompute):
    N = B * T
    state = 18 * n_params(L, C, T)
    activations = PER_TOKEN_LAYER[recompute] * C * N * L
    working = RECOMPUTED[recompute] * C * N + 2 * (1 << 27) + 4 * N * C * 2
    return state + activations + working


def largest_batch(L, C, T, capacity, recompute):
    B = 0
    while peak_bytes(L, C, T, B + 1, recompute) <= capacity:
        B += 1
    return B


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=DocstringFormatter)
    parser.add_argument("--seq", type=positive_int, default=1024, help="sequence length T")
    parser.add_argument("--headroom", type=fraction, default=0.9,
                        help="share of the GPU's memory the plan may use, above 0 and at most 1 "
                             "(the rest: CUDA context, cuBLAS workspace, the allocator's slack)")
    args = parser.parse_args()
    T = args.seq
    print(f"check: gpt2-small B=16 T=1024 -> {peak_bytes(12, 768, 1024, 16, 'none') / GIB:.2f} GiB "
          f"computed (7.83 GiB measured on an H200)")
    print(f"largest micro-batch at T={T}, fp16, by train.recompute (none / mlp / block):")
    print(f"{'model':6s} {'params':>8s} | " + " | ".join(f"{gpu:^20s}" for gpu in GPUS))
    for name, (L, C) in SIZES.items():
        cells = []
        for capacity in GPUS.values():
            batches = [largest_batch(L, C, T, args.headroom * capacity, mode)
                       for mode in ("none", "mlp", "block")]
            cells.append(" / ".join(f"{b:4d}" for b in batches))
        print(f"{name:6s} {n_params(L, C, T) / 1e6:7.0f}M | " + " | ".join(f"{c:^20s}" for c in cells))


if __name__ == "__main__":
    main()
