"""Fused CUDA kernels and direct cuBLAS calls for the CuPy backend.

The layers in xpmodel.layers call into this package only for CuPy arrays, at
the hot spots where plain CuPy array expressions would launch many kernels
or move the same bytes several times: LayerNorm, GELU, the causal softmax,
cross-entropy, AdamW, and the matrix products (2-D and strided-batched
cuBLAS calls with float32 accumulation, so float16 and bfloat16 operands
use the tensor cores). Every kernel computes what the NumPy code beside it computes, with
statistics in float32 (float64 for float64 arrays).

Nothing here is imported unless a CUDA array reaches a layer.
"""
