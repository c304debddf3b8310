"""Squared ReLU forward and backward, one kernel each way; backward recomputes
max(h, 0) from h."""
import numpy

from ..backend import import_cupy
from .compile import acc_type, c_type, column_backward, half_of, optional, raw_kernel, stride_grid

_THREADS = 256

_SOURCE = r"""
// with a bias (C,), h[i] += bias[i % C] first, in place: backward reads the biased h
extern "C" __global__ void relu2_forward(X_T* h, const X_T* bias, X_T* out, long long n, int C) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        if (bias) store(h + i, (ACC)load(h + i) + (ACC)load(bias + i % C));
        ACC r = (ACC)load(h + i);
        r = r > (ACC)0 ? r : (ACC)0;
        store(out + i, r * r);
    }
}

// dh = 2 max(h, 0) dout; thread c of the grid's x walks column c over every
// gridDim.y-th row; with dbias (C,), it adds its column's sum into it (one atomic)
extern "C" __global__ void relu2_backward(const D_T* dout, const X_T* h, D_T* dh, G_T* dbias,
        long long rows, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    ACC column_sum = 0;
    for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
        long long i = r * C + c;
        ACC v = (ACC)load(h + i);
        ACC value = v > (ACC)0 ? (ACC)2 * v * (ACC)load(dout + i) : (ACC)0;
        store(dh + i, value);
        column_sum += value;
    }
    if (dbias) atomicAdd(dbias + c, (G_T)column_sum);
}
"""


def relu2_forward(h, bias=None):
    """h: (rows, C) C-contiguous -> max(h + bias, 0)^2 in h's dtype; with a bias
    (C,), h is replaced by h + bias."""
    cupy = import_cupy()
    if not h.flags.c_contiguous:
        raise ValueError("relu2_forward: h must be C-contiguous")
    if bias is not None and bias.dtype != h.dtype:
        bias = bias.astype(h.dtype)
    out = cupy.empty_like(h)
    kernel = raw_kernel(_SOURCE, "relu2_forward", half=half_of(h.dtype), X_T=c_type(h.dtype),
                        D_T=c_type(h.dtype), G_T="float", ACC=acc_type(h.dtype))
    kernel(*stride_grid(h.size, _THREADS), (h, optional(bias), out, numpy.int64(h.size), numpy.int32(h.shape[-1])))
    return out


def relu2_backward(dout, h, dbias=None):
    """dout, h: (rows, C) -> dh in dout's dtype; with dbias (C,) (float32 or
    float64) dh's column sums are added into it."""
    cupy = import_cupy()
    dout, h = cupy.ascontiguousarray(dout), cupy.ascontiguousarray(h)
    return column_backward(_SOURCE, "relu2_backward", dout, h, cupy.empty_like(dout), dbias,
                           dout.shape[-1])
