"""A dropout mask applied in one kernel: out = x * (keep ? scale : 0),
computed in float32 (float64 for float64) and rounded once to x's dtype, with
no wider copy of x (the attention probabilities' T x T path)."""
import numpy

from ..backend import import_cupy
from .compile import acc_type, c_type, half_of, raw_kernel, stride_grid

_SOURCE = r"""
extern "C" __global__ void apply_keep_mask(X_T* out, const X_T* x, const unsigned char* keep,
        double scale, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        store(out + i, (ACC)load(x + i) * (keep[i] ? (ACC)scale : (ACC)0));
}
"""


def apply_keep_mask(x, keep, scale):
    """x * keep * scale as dropout.apply_mask computes it; keep: bool, x's shape."""
    cupy = import_cupy()
    x = cupy.ascontiguousarray(x)
    keep = cupy.ascontiguousarray(keep, dtype=numpy.bool_)
    out = cupy.empty_like(x)
    kernel = raw_kernel(_SOURCE, "apply_keep_mask", half=half_of(x.dtype), X_T=c_type(x.dtype),
                        ACC=acc_type(x.dtype))
    kernel(*stride_grid(x.size), (out, x, keep, numpy.float64(scale), numpy.int64(x.size)))
    return out
