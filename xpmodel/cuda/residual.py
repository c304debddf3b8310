"""The residual add with the branch's bias and dropout mask, in one kernel:
for a float32 stream and a 16-bit branch of a multiple of 8 columns (mixed
precision), in 16-byte vectors, else element by element. The mask is
dropout's KeepMask: a byte an element (kept or not) and the scale, applied
in the statistics' dtype."""
import numpy

from ..backend import import_cupy, is_half
from .compile import (acc_type, c_type, column_grid, half_of, in_16_byte_vectors, optional,
                      raw_kernel, stride_grid, warps_for)

_THREADS = 256

_SOURCE = r"""
// stream[i] += (branch[i] + bias[i % C]) * (keep[i] ? scale : 0), the product and sum rounded
// once in both kernels; bias and keep may be null
extern "C" __global__ void residual_add(S_T* stream, const B_T* branch, const B_T* bias,
        const unsigned char* keep, double scale, long long n, int C) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        ACC v = (ACC)load(branch + i), s = (ACC)load(stream + i);
        if (bias) v += (ACC)load(bias + i % C);
        store(stream + i, keep ? fused_multiply_add(v, keep[i] ? (ACC)scale : (ACC)0, s) : s + v);
    }
}

// The same for a float32 stream and 16-bit branch and bias in vectors (C % 8 == 0, every
// array 16-byte aligned; keep's 8 bytes a vector): thread c of the grid's x owns columns
// 8c .. 8c + 7, its bias in registers, and walks every gridDim.y-th row; no index is divided.
extern "C" __global__ void residual_add_h16x8(float* stream, const h16* branch, const h16* bias,
        const unsigned char* keep, double scale, long long rows, int vectors) {
    int c;
    float b[8];
    if (!vector_column(bias, vectors, c, b)) return;
    float kept_scale = (float)scale;
    for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
        long long i = r * vectors + c;
        float v[8];
        unpack8(((const uint4*)branch)[i], v);
        uint2 kept = keep ? ((const uint2*)keep)[i] : uint2{0, 0};
        const unsigned char* k = (const unsigned char*)&kept;
        float4* s = (float4*)stream + 2 * i;
        float4 low = s[0], high = s[1];
        float sum[8] = {low.x, low.y, low.z, low.w, high.x, high.y, high.z, high.w};
        #pragma unroll
        for (int e = 0; e < 8; e++) {
            float x = bias ? v[e] + b[e] : v[e];
            sum[e] = keep ? fused_multiply_add(x, k[e] ? kept_scale : 0.0f, sum[e]) : sum[e] + x;
        }
        s[0] = float4{sum[0], sum[1], sum[2], sum[3]};
        s[1] = float4{sum[4], sum[5], sum[6], sum[7]};
    }
}
"""


def residual_add(stream, branch, bias=None, mask=None):
    """stream (N, C) += (branch + bias) with dropout's KeepMask `mask` applied,
    in place; returns stream."""
    cupy = import_cupy()
    if not stream.flags.c_contiguous:
        raise ValueError("residual_add: the stream must be C-contiguous")
    branch = cupy.ascontiguousarray(branch)
    keep = None if mask is None else cupy.ascontiguousarray(mask.keep, dtype=numpy.bool_)
    scale = numpy.float64(0.0 if mask is None else mask.scale)
    if bias is not None and bias.dtype != branch.dtype:
        bias = bias.astype(branch.dtype)
    n, C = stream.size, stream.shape[-1]
    by_vectors = (stream.dtype == numpy.float32 and is_half(branch.dtype)
                  and in_16_byte_vectors(C, stream, branch, bias, keep))
    kernel = raw_kernel(_SOURCE, "residual_add_h16x8" if by_vectors else "residual_add",
                        half=half_of(stream.dtype, branch.dtype), S_T=c_type(stream.dtype),
                        B_T=c_type(branch.dtype), ACC=acc_type(stream.dtype, branch.dtype))
    if by_vectors:
        vectors_per_row = C // 8
        kernel(*column_grid(vectors_per_row, n // C, warps_for(vectors_per_row, _THREADS)),
               (stream, branch, optional(bias), optional(keep), scale, numpy.int64(n // C),
                numpy.int32(vectors_per_row)))
    else:
        kernel(*stride_grid(n, _THREADS), (stream, branch, optional(bias), optional(keep), scale,
                                        numpy.int64(n), numpy.int32(C)))
    return stream
