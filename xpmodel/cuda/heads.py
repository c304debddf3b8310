"""Splitting the fused qkv activation into heads and merging the heads'
gradients back, one kernel each way: the split adds the bias of the
projection that made qkv and scales q on the way, the merge sums that bias's
gradient."""
import numpy

from ..backend import import_cupy
from ..backend import is_half
from .compile import (acc_type, c_type, column_grid, half_of, multiprocessor_count, optional,
                      raw_kernel, stride_grid)

_THREADS = 256

_SOURCE = r"""
// qkv (B*T, 3C) row-major, bias (3C,) or null -> heads (3, B, H, T, D); q times q_scale
extern "C" __global__ void split_heads(const X_T* qkv, const X_T* bias, X_T* heads,
        long long n, int B, int T, int H, int D, ACC q_scale) {
    int C = H * D;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long row = i / (3 * C);
        int col = (int)(i - row * 3 * C);
        int part = col / C, h = (col - part * C) / D, d = col % D;
        long long b = row / T, t = row - b * T;
        ACC v = (ACC)load(qkv + i);
        if (bias) v += (ACC)load(bias + col);
        if (part == 0) v *= q_scale;
        store(heads + (((part * B + b) * H + h) * T + t) * D + d, v);
    }
}

// heads (3, B, H, T, D) -> out (B*T, 3C): thread col of the grid's x walks column
// col = (part, h, d) over every gridDim.y-th row; with dbias (3C,) it adds the
// column's sum into it (one atomic)
extern "C" __global__ void merge_heads(const X_T* heads, X_T* out, G_T* dbias, int B, int T,
        int H, int D) {
    int C3 = 3 * H * D;
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= C3) return;
    int part = col / (H * D), h = (col - part * H * D) / D, d = col % D;
    ACC column_sum = 0;
    for (long long r = blockIdx.y; r < (long long)B * T; r += gridDim.y) {
        long long b = r / T, t = r - b * T;
        ACC v = (ACC)load(heads + ((((long long)part * B + b) * H + h) * T + t) * D + d);
        store(out + r * C3 + col, v);
        column_sum += v;
    }
    if (dbias) atomicAdd(dbias + col, (G_T)column_sum);
}

// The same two for 16-bit floats with H * D and D multiples of 8 and 16-byte aligned
// arrays: a thread moves a column's 8 values (16 bytes) at a time down rows
// blockIdx.y, blockIdx.y + gridDim.y, ... (the 8 never cross a head).
__device__ __forceinline__ long long head_offset(int col, int row, int rows, int T, int H, int D) {
    int C = H * D, part = col / C, h = (col - part * C) / D, d = col - part * C - h * D;
    int b = row / T, t = row - b * T;
    return (long long)part * rows * C + (((long long)b * H + h) * T + t) * D + d;
}

extern "C" __global__ void split_heads_h16(const h16* __restrict__ qkv, const h16* bias,
        h16* __restrict__ heads, int rows, int T,
        int H, int D, float q_scale) {
    int C3 = 3 * H * D, col = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (col >= C3) return;
    float scale = col < H * D ? q_scale : 1.0f, add[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (bias) unpack8(*(const uint4*)(bias + col), add);
    for (int row = blockIdx.y; row < rows; row += gridDim.y) {
        float x[8];
        unpack8(*(const uint4*)(qkv + (long long)row * C3 + col), x);
        #pragma unroll
        for (int e = 0; e < 8; e++) x[e] = (x[e] + add[e]) * scale;
        *(uint4*)(heads + head_offset(col, row, rows, T, H, D)) = pack8(x);
    }
}

extern "C" __global__ void merge_heads_h16(const h16* __restrict__ heads, h16* __restrict__ out,
        G_T* dbias, int rows, int T,
        int H, int D) {
    int C3 = 3 * H * D, col = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (col >= C3) return;
    float sums[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    #pragma unroll 4
    for (int row = blockIdx.y; row < rows; row += gridDim.y) {
        uint4 v = *(const uint4*)(heads + head_offset(col, row, rows, T, H, D));
        *(uint4*)(out + (long long)row * C3 + col) = v;
        float x[8];
        unpack8(v, x);
        #pragma unroll
        for (int e = 0; e < 8; e++) sums[e] += x[e];
    }
    if (dbias) {
        #pragma unroll
        for (int e = 0; e < 8; e++) atomicAdd(dbias + col + e, (G_T)sums[e]);
    }
}
"""


def _vector_grid(C3, rows, blocks_per_multiprocessor):
    """(grid, block) for the 16-bit kernels: a thread per 8 columns, rows split over grid y."""
    threads = min(1024, -(-C3 // 8 // 32) * 32)
    column_blocks = -(-C3 // 8 // threads)
    row_blocks = max(1, min(rows, blocks_per_multiprocessor * multiprocessor_count() // column_blocks))
    return (column_blocks, row_blocks), (threads,)


def _vectors_fit(D, *arrays):
    """Whether the 16-bit kernels serve: D a multiple of 8, every array of one
    16-bit float dtype (float16 or bfloat16) and 16-byte aligned."""
    dtypes = {a.dtype for a in arrays if a is not None}
    return D % 8 == 0 and len(dtypes) == 1 and is_half(dtypes.pop()) and \
        all(a is None or a.data.ptr % 16 == 0 for a in arrays)


def split_heads(qkv, bias, n_head, q_scale):
    """qkv: (B, T, 3C) C-contiguous, bias: (3C,) or None -> (3, B, H, T, D)
    contiguous, bias added and q multiplied by q_scale."""
    cupy = import_cupy()
    if not qkv.flags.c_contiguous:
        raise ValueError("split_heads: qkv must be C-contiguous")
    B, T, C3 = qkv.shape
    D = C3 // 3 // n_head
    if bias is not None and bias.dtype != qkv.dtype:
        bias = bias.astype(qkv.dtype)
    heads = cupy.empty((3, B, n_head, T, D), dtype=qkv.dtype)
    if _vectors_fit(D, qkv, bias, heads):
        grid, block = _vector_grid(C3, B * T, 16)
        raw_kernel(_SOURCE, "split_heads_h16", half=qkv.dtype, X_T="h16", ACC="float", G_T="float")(
            grid, block, (qkv, optional(bias), heads, numpy.int32(B * T), numpy.int32(T),
                          numpy.int32(n_head), numpy.int32(D), numpy.float32(q_scale)))
        return heads
    acc = acc_type(qkv.dtype)
    kernel = raw_kernel(_SOURCE, "split_heads", half=half_of(qkv.dtype), X_T=c_type(qkv.dtype), ACC=acc,
                        G_T="float")
    n = qkv.size
    scale = numpy.float64(q_scale) if acc == "double" else numpy.float32(q_scale)
    kernel(*stride_grid(n, _THREADS), (qkv, optional(bias), heads, numpy.int64(n), numpy.int32(B),
                                    numpy.int32(T), numpy.int32(n_head), numpy.int32(D), scale))
    return heads


def merge_heads(dheads, dbias=None):
    """dheads: (3, B, H, T, D) contiguous -> (B*T, 3C); with dbias (3C,) (float32
    or float64) the column sums of the result are added into it."""
    cupy = import_cupy()
    _, B, H, T, D = dheads.shape
    C3 = 3 * H * D
    dheads = cupy.ascontiguousarray(dheads)
    out = cupy.empty((B * T, C3), dtype=dheads.dtype)
    g_type = c_type(dbias.dtype) if dbias is not None else "float"
    if _vectors_fit(D, dheads, out):
        grid, block = _vector_grid(C3, B * T, 2)
        raw_kernel(_SOURCE, "merge_heads_h16", half=dheads.dtype, X_T="h16", ACC="float", G_T=g_type)(
            grid, block, (dheads, out, optional(dbias), numpy.int32(B * T), numpy.int32(T),
                          numpy.int32(H), numpy.int32(D)))
        return out
    kernel = raw_kernel(_SOURCE, "merge_heads", half=half_of(dheads.dtype), X_T=c_type(dheads.dtype),
                        ACC=acc_type(dheads.dtype), G_T=g_type)
    kernel(*column_grid(C3, B * T, _THREADS),
           (dheads, out, optional(dbias), numpy.int32(B), numpy.int32(T), numpy.int32(H), numpy.int32(D)))
    return out
