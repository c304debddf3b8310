"""The peak FLOP/s that model FLOPs utilisation (MFU) is measured against.

MFU = FLOPs per token (6 N + 12 L C T, GPTConfig.flops_per_token) x tokens/s
/ peak. For fp16 and bf16 runs the peak is the GPU's dense tensor-core rate for
16-bit operands with float32 accumulation (what xpmodel's matrix products
use), without 2:4 structured sparsity, from the table below; `train.peak_flops`
replaces it for a GPU the table lacks, or for fp32 runs (xpmodel's float32
products do not use the tensor cores, so no table figure applies to them).

Sources: NVIDIA's datasheets, which give the sparse rate as well; the dense
rate is half of it (H100 SXM: 1,979 sparse, 989 dense). GeForce cards
accumulate in float32 at half their float16-accumulate rate; their figures
are the float32-accumulate ones of the architecture whitepapers (Ampere
GA102: RTX 3090 71 TFLOP/s; Ada: RTX 4090 165.2). V100 and T4 have float16
tensor cores only (bf16 runs need compute capability 8.0).
"""
import re

# (name as it appears in the device name, dense FLOP/s); the first entry whose
# name appears as whole words wins, so variants come before their family (None:
# a variant without a published figure, left to train.peak_flops)
GPU_PEAKS = [
    ("B200", 2250e12),         # HGX B200 datasheet: 4.5 PFLOP/s sparse
    ("H200 NVL", 835e12),      # H200 datasheet: 1,671 sparse
    ("H200", 989e12),          # H200 SXM: 1,979 sparse
    ("GH200", 989e12),         # the H100 / H200 chip
    ("H100 NVL", 835e12),      # H100 datasheet: 1,671 sparse
    ("H100 PCIe", 756e12),     # H100 datasheet: 1,513 sparse
    ("H100", 989e12),          # H100 SXM ("H100 80GB HBM3"): 1,979 sparse
    ("H800", 989e12),          # the H100 SXM's tensor cores
    ("A100", 312e12),          # A100 datasheet (SXM and PCIe): 624 sparse
    ("A800", 312e12),          # the A100's tensor cores
    ("A40", 149.7e12),         # A40 datasheet: 299.4 sparse
    ("RTX A6000", 154.8e12),   # RTX A6000 datasheet, float32 accumulate: 309.7 sparse
    ("A30", 165e12),           # A30 datasheet: 330 sparse
    ("A10", 125e12),           # A10 datasheet: 250 sparse
    ("L40S", 362e12),          # L40S datasheet: 733 sparse
    ("L40", 181e12),           # L40 datasheet: 362 sparse
    ("L4", 121e12),            # L4 datasheet: 242 sparse
    ("RTX 4090 Laptop", None),
    ("RTX 4090 D", None),
    ("RTX 4090", 165.2e12),    # Ada whitepaper, float32 accumulate
    ("RTX 3090 Ti", None),
    ("RTX 3090", 71e12),       # GA102 whitepaper, float32 accumulate
    ("A10G", None),
    ("V100-PCIE", 112e12),     # V100 datasheet, float16
    ("V100", 125e12),          # V100 SXM2, float16
    ("T4", 65e12),             # T4 datasheet, float16
]
_LOW_PRECISIONS = ("fp16", "bf16")
FLOAT16_ONLY = ("V100-PCIE", "V100", "T4")   # tensor cores without bfloat16


def table_peak(gpu_name):
    """(table name, dense 16-bit FLOP/s) for a device name such as
    "NVIDIA H100 80GB HBM3", or None when the table has no entry for it."""
    for name, flops in GPU_PEAKS:
        # whole words: "A10" is not the A100 or the A10G, "L40" not the L40S
        if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", gpu_name or ""):
            return (name, flops) if flops else None
    return None


def mfu_peak(gpu_name, precision, peak_flops=None):
    """(FLOP/s or None, a phrase saying what it is) for MFU on this GPU: the
    given peak_flops (train.peak_flops) when set, else the table's figure for
    fp16 and bf16, else None with the reason."""
    if peak_flops:
        return float(peak_flops), f"train.peak_flops, {peak_flops / 1e12:g} TFLOP/s"
    if precision not in _LOW_PRECISIONS:
        return None, (f"no MFU for {precision} without train.peak_flops (the table holds 16-bit "
                      f"tensor-core peaks); train.precision=bf16, or fp16 before Ampere, runs the "
                      f"matrix products on the tensor cores, several times faster")
    entry = table_peak(gpu_name)
    if entry is None:
        return None, f"no MFU: {gpu_name or 'this GPU'} is not in xpmodel's peak table; set train.peak_flops"
    name, flops = entry
    if precision == "bf16" and name in FLOAT16_ONLY:
        return None, f"no MFU: the {name} has no bf16 tensor cores; set train.peak_flops"
    return flops, f"the {name}'s dense {precision} tensor-core peak, {flops / 1e12:g} TFLOP/s"
