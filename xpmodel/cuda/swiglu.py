"""SwiGLU forward and backward, one kernel each way.

h holds [gate | up] side by side, (rows, 2F); the forward adds the bias of
the projection that made h (in place, as the layer's xp code does) and
writes silu(gate) * up; the backward recomputes sigmoid(gate) instead of
keeping it, and sums the bias's gradient."""
import numpy

from ..backend import import_cupy, is_half
from .compile import (acc_type, c_type, column_backward, column_grid, half_of, in_16_byte_vectors,
                      optional, raw_kernel, stride_grid, warps_for)

_THREADS = 256

_SOURCE = r"""
__device__ __forceinline__ ACC sigmoid(ACC a) { return (ACC)1 / ((ACC)1 + EXP(-a)); }

// one output element (row, col) per thread: gate h[row, col], up h[row, F + col]
extern "C" __global__ void swiglu_forward(X_T* h, const X_T* bias, X_T* out, long long n, int F) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long row = i / F;
        int col = (int)(i - row * F);
        X_T* gate = h + row * 2 * F + col;
        X_T* up = gate + F;
        if (bias) {
            store(gate, (ACC)load(gate) + (ACC)load(bias + col));
            store(up, (ACC)load(up) + (ACC)load(bias + F + col));
        }
        ACC a = (ACC)load(gate);
        store(out + i, a * sigmoid(a) * (ACC)load(up));
    }
}

// The same for 16-bit h in 16-byte vectors (F % 8 == 0, h, out and bias 16-byte
// aligned): thread c of the grid's x owns output columns 8c .. 8c + 7 (their gate
// and up columns), their bias in registers, and walks every gridDim.y-th row; no
// index is divided. The biased h is rounded to 16 bits before it is read, as above.
extern "C" __global__ void swiglu_forward_h16x8(h16* h, const h16* bias, h16* out, long long rows,
        int vectors) {
    int c;
    float gate_bias[8], up_bias[8];
    if (!vector_column(bias, vectors, c, gate_bias)) return;
    vector_column(bias ? bias + 8 * vectors : nullptr, vectors, c, up_bias);   // the up half's
    for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
        uint4* gate_at = (uint4*)h + r * 2 * vectors + c;
        uint4* up_at = gate_at + vectors;
        float a[8], b[8], o[8];
        unpack8(*gate_at, a);
        unpack8(*up_at, b);
        if (bias) {
            #pragma unroll
            for (int e = 0; e < 8; e++) {
                a[e] = h16_to_float(float_to_h16(a[e] + gate_bias[e]));
                b[e] = h16_to_float(float_to_h16(b[e] + up_bias[e]));
            }
            *gate_at = pack8(a);
            *up_at = pack8(b);
        }
        #pragma unroll
        for (int e = 0; e < 8; e++) o[e] = a[e] * sigmoid(a[e]) * b[e];
        ((uint4*)out)[r * vectors + c] = pack8(o);
    }
}

// d out / d gate = up s (1 + gate (1 - s)), d out / d up = gate s, s = sigmoid(gate).
// Thread col of the grid's x walks column col over every gridDim.y-th row; with
// dbias (2F,), it adds its two columns' sums into it (one atomic each).
extern "C" __global__ void swiglu_backward(const D_T* dout, const X_T* h, D_T* dh, G_T* dbias,
        long long rows, int F) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= F) return;
    ACC gate_sum = 0, up_sum = 0;
    for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
        ACC d = (ACC)load(dout + r * F + col);
        ACC a = (ACC)load(h + r * 2 * F + col), b = (ACC)load(h + r * 2 * F + F + col);
        ACC s = sigmoid(a);
        ACC dgate = d * b * s * ((ACC)1 + a * ((ACC)1 - s)), dup = d * a * s;
        store(dh + r * 2 * F + col, dgate);
        store(dh + r * 2 * F + F + col, dup);
        gate_sum += dgate;
        up_sum += dup;
    }
    if (dbias) {
        atomicAdd(dbias + col, (G_T)gate_sum);
        atomicAdd(dbias + F + col, (G_T)up_sum);
    }
}
"""


def swiglu_forward(h, bias=None):
    """h: (rows, 2F) C-contiguous -> silu(gate) * up (rows, F) in h's dtype; with
    a bias (2F,), h is replaced by h + bias."""
    cupy = import_cupy()
    if not h.flags.c_contiguous:
        raise ValueError("swiglu_forward: h must be C-contiguous")
    if bias is not None and bias.dtype != h.dtype:
        bias = bias.astype(h.dtype)
    rows, F = h.shape[0], h.shape[1] // 2
    out = cupy.empty((rows, F), dtype=h.dtype)
    by_vectors = is_half(h.dtype) and in_16_byte_vectors(F, h, out, bias)
    kernel = raw_kernel(_SOURCE, "swiglu_forward_h16x8" if by_vectors else "swiglu_forward",
                        half=half_of(h.dtype), X_T=c_type(h.dtype), D_T=c_type(h.dtype),
                        G_T="float", ACC=acc_type(h.dtype))
    if by_vectors:
        vectors_per_row = F // 8
        kernel(*column_grid(vectors_per_row, rows, warps_for(vectors_per_row, _THREADS)),
               (h, optional(bias), out, numpy.int64(rows), numpy.int32(vectors_per_row)))
    else:
        kernel(*stride_grid(out.size, _THREADS), (h, optional(bias), out, numpy.int64(out.size),
                                                  numpy.int32(F)))
    return out


def swiglu_backward(dout, h, dbias=None):
    """dout: (rows, F), h: (rows, 2F) as forward left it -> dh (rows, 2F) in
    dout's dtype; with dbias (2F,) (float32 or float64) dh's column sums are added."""
    cupy = import_cupy()
    dout, h = cupy.ascontiguousarray(dout), cupy.ascontiguousarray(h)
    return column_backward(_SOURCE, "swiglu_backward", dout, h,
                           cupy.empty(h.shape, dtype=dout.dtype), dbias, dout.shape[-1])
