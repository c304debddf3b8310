"""GELU (tanh approximation) forward and backward, one kernel each way.

Backward recomputes sigmoid(2u) from x rather than keeping it, which saves
a float32 activation of 4C channels per layer."""
import math

import numpy

from ..backend import import_cupy, is_half
from .compile import (acc_type, c_type, column_backward, column_grid, half_of, in_16_byte_vectors,
                      optional, raw_kernel, stride_grid, warps_for)

_THREADS = 256

_SOURCE = r"""
// sigmoid(2u), u = K (x + 0.044715 x^3); exp(-2u) overflowing to inf gives 0: exact
__device__ __forceinline__ ACC sigmoid_2u(ACC x) {
    return (ACC)1 / ((ACC)1 + EXP((ACC)(-2.0 * K) * x * ((ACC)1 + (ACC)CUBIC * x * x)));
}

// with a bias (C,), x[i] += bias[i % C] first, in place: backward reads the biased x
extern "C" __global__ void gelu_forward(X_T* x, const X_T* bias, X_T* out, long long n, int C) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        if (bias) store(x + i, (ACC)load(x + i) + (ACC)load(bias + i % C));
        ACC v = (ACC)load(x + i);
        store(out + i, v * sigmoid_2u(v));
    }
}

// The same for 16-bit x in 16-byte vectors (C % 8 == 0, x, out and bias 16-byte
// aligned): thread c of the grid's x owns columns 8c .. 8c + 7, its bias in
// registers, and walks every gridDim.y-th row; no index is divided. The biased x
// is rounded to 16 bits before GELU reads it, as above: the same values.
extern "C" __global__ void gelu_forward_h16x8(h16* x, const h16* bias, h16* out, long long rows,
        int vectors) {
    int c;
    float b[8];
    if (!vector_column(bias, vectors, c, b)) return;
    for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
        long long i = r * vectors + c;
        float v[8], o[8];
        unpack8(((const uint4*)x)[i], v);
        if (bias) {
            #pragma unroll
            for (int e = 0; e < 8; e++) v[e] = h16_to_float(float_to_h16(v[e] + b[e]));
            ((uint4*)x)[i] = pack8(v);
        }
        #pragma unroll
        for (int e = 0; e < 8; e++) o[e] = v[e] * sigmoid_2u(v[e]);
        ((uint4*)out)[i] = pack8(o);
    }
}

// d/dx [x s] = s + x s (1 - s) 2 du/dx, du/dx = K (1 + 3 * 0.044715 x^2).
// (rows, C): thread c of the grid's x walks column c over every gridDim.y-th row;
// with dbias (C,), each thread adds its column's sum of dx into it (one atomic).
extern "C" __global__ void gelu_backward(const D_T* dout, const X_T* x, D_T* dx, G_T* dbias,
        long long rows, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    ACC column_sum = 0;
    for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
        long long i = r * C + c;
        ACC v = (ACC)load(x + i);
        ACC s = sigmoid_2u(v);
        ACC slope = s + v * s * ((ACC)1 - s) * (ACC)(2.0 * K) * ((ACC)1 + (ACC)(3.0 * CUBIC) * v * v);
        ACC value = (ACC)load(dout + i) * slope;
        store(dx + i, value);
        column_sum += value;
    }
    if (dbias) atomicAdd(dbias + c, (G_T)column_sum);
}
"""


_MACROS = dict(K=repr(math.sqrt(2.0 / math.pi)), CUBIC="0.044715")


def gelu_forward(x, bias=None):
    """x: (..., C) C-contiguous -> GELU(x + bias) in x's dtype; with a bias (C,)
    x is replaced by x + bias."""
    cupy = import_cupy()
    if not x.flags.c_contiguous:
        raise ValueError("gelu_forward: x must be C-contiguous")
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.astype(x.dtype)
    out = cupy.empty_like(x)
    C = x.shape[-1]
    by_vectors = is_half(x.dtype) and in_16_byte_vectors(C, x, out, bias)
    name = "gelu_forward_h16x8" if by_vectors else "gelu_forward"
    kernel = raw_kernel(_SOURCE, name, half=half_of(x.dtype), X_T=c_type(x.dtype),
                        D_T=c_type(x.dtype), G_T="float", ACC=acc_type(x.dtype), **_MACROS)
    if by_vectors:
        vectors_per_row = C // 8
        kernel(*column_grid(vectors_per_row, x.size // C, warps_for(vectors_per_row, _THREADS)),
               (x, optional(bias), out, numpy.int64(x.size // C), numpy.int32(vectors_per_row)))
    else:
        kernel(*stride_grid(x.size, _THREADS), (x, optional(bias), out, numpy.int64(x.size),
                                                numpy.int32(C)))
    return out


def gelu_backward(dout, x, dbias=None):
    """dout, x: (..., C), the same shape -> dx in dout's dtype; with dbias (C,)
    (float32 or float64) the column sums of dx are added into it."""
    cupy = import_cupy()
    dout, x = cupy.ascontiguousarray(dout), cupy.ascontiguousarray(x)
    return column_backward(_SOURCE, "gelu_backward", dout, x, cupy.empty_like(dout), dbias,
                           x.shape[-1], **_MACROS)
