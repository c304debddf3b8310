"""The residual add with the branch's bias and dropout mask, in one kernel."""
import numpy

from ..backend import _import_cupy
from .compile import acc_type, c_type, half_of, optional, raw_kernel, stride_grid

_THREADS = 256

_SOURCE = r"""
// stream[i] += (branch[i] + bias[i % C]) * mask[i]; bias and mask may be null
extern "C" __global__ void residual_add(S_T* stream, const B_T* branch, const B_T* bias,
        const B_T* mask, long long n, int C) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        ACC v = (ACC)load(branch + i);
        if (bias) v += (ACC)load(bias + i % C);
        if (mask) v *= (ACC)load(mask + i);
        store(stream + i, (ACC)load(stream + i) + v);
    }
}
"""


def residual_add(stream, branch, bias=None, scaled_mask=None):
    """stream (N, C) += (branch + bias) * scaled_mask, in place; returns stream."""
    cupy = _import_cupy()
    if not stream.flags.c_contiguous:
        raise ValueError("residual_add: the stream must be C-contiguous")
    branch = cupy.ascontiguousarray(branch)
    if scaled_mask is not None:
        scaled_mask = cupy.ascontiguousarray(scaled_mask, dtype=branch.dtype)
    if bias is not None and bias.dtype != branch.dtype:
        bias = bias.astype(branch.dtype)
    n, C = stream.size, stream.shape[-1]
    kernel = raw_kernel(_SOURCE, "residual_add", half=half_of(stream.dtype, branch.dtype),
                        S_T=c_type(stream.dtype), B_T=c_type(branch.dtype),
                        ACC=acc_type(stream.dtype, branch.dtype))
    kernel(*stride_grid(n, _THREADS), (stream, branch, optional(bias), optional(scaled_mask),
                                    numpy.int64(n), numpy.int32(C)))
    return stream
