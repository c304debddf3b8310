"""The head split and merge for grouped-query attention and rotary positions,
one kernel each way: for 16-bit heads with D a multiple of 16, a thread per
pair of 16-byte vectors (8 columns of a head's first half and their rotation
partners), else a thread per element.

The split reads qkv (B*T, (H + 2 H_kv) D), adds the projection's bias,
rotates q and k by their position's angles, scales q, and writes the heads
the attention core reads: q (B, H, T, D) and k, v (B, H_kv, T, D), each
key/value head once (the flash kernels read it for every query head of its
group; the path through T x T scores repeats it). The merge undoes it for
the gradients: it turns q's and k's back by the same angles, writes
(B*T, (H + 2 H_kv) D) and adds the bias's gradient. QK-norm, which needs a
reduction over each head, stays on the layer's own `xp` code.
"""
import numpy

from ..backend import import_cupy, is_half
from .compile import (acc_type, c_type, column_grid, half_of, in_16_byte_vectors, optional,
                      raw_kernel, stride_grid, warps_for)
from .flash import empty_heads

_THREADS = 256

_SOURCE = r"""
// x of a head's first half (first_half) or its second, turned by the angle whose
// cosine and sine are c and s with its pair partner: x c - partner s in the first
// half, x c + partner s in the second; sign -1 turns back. One fused multiply-add
// of x c and the rounded partner s, spelled out: left to itself NVRTC fuses the
// element and vector kernels' expressions differently, and they are to round alike.
__device__ __forceinline__ ACC turned(ACC x, ACC partner, ACC c, ACC s, bool first_half, ACC sign) {
    return fused_multiply_add(x, c, (first_half ? -sign : sign) * partner * s);
}

// The rotation of element d of a head at position t whose pair partner holds `partner`
__device__ __forceinline__ ACC rotated(ACC x, ACC partner, int d, int D, const R_T* cos,
        const R_T* sin, long long t, ACC sign) {
    int half = D / 2, j = d < half ? d : d - half;
    return turned(x, partner, (ACC)cos[t * half + j], (ACC)sin[t * half + j], d < half, sign);
}

// one thread per element of the heads q (B, H, T, D), k, v (B, H_kv, T, D),
// in that order; cos, sin (T, D/2) or null
extern "C" __global__ void split_rope_heads(const X_T* qkv, const X_T* bias, X_T* q, X_T* k, X_T* v,
        const R_T* cos, const R_T* sin, long long n, int B, int T, int H, int H_kv, int D,
        ACC q_scale) {
    int width = (H + 2 * H_kv) * D, half = D / 2;
    long long q_size = (long long)B * H * T * D, kv_size = (long long)B * H_kv * T * D;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        int part = i < q_size ? 0 : (i < q_size + kv_size ? 1 : 2);
        long long j = part == 0 ? i : i - q_size - (part - 1) * kv_size;   // within its part
        int part_heads = part == 0 ? H : H_kv;
        int d = (int)(j % D);
        long long t = (j / D) % T;
        int h = (int)((j / ((long long)D * T)) % part_heads);
        long long b = j / ((long long)D * T * part_heads);
        int head = part == 0 ? h : H + (part - 1) * H_kv + h;          // its column block of qkv
        int col = head * D + d, partner_col = head * D + (d < half ? d + half : d - half);
        const X_T* row = qkv + (b * T + t) * width;
        ACC x = (ACC)load(row + col);
        if (bias) x += (ACC)load(bias + col);
        if (cos && part < 2) {
            ACC partner = (ACC)load(row + partner_col);
            if (bias) partner += (ACC)load(bias + partner_col);
            x = rotated(x, partner, d, D, cos, sin, t, (ACC)1);
        }
        if (part == 0) x *= q_scale;
        store((part == 0 ? q : (part == 1 ? k : v)) + j, x);
    }
}

// dq (B, H, T, D), dk, dv (B, H_kv, T, D) -> out (B*T, (H + 2 H_kv) D): thread
// col of the grid's x walks column col over every gridDim.y-th row, turning q
// and k back; with dbias it adds the column's sum (one atomic)
extern "C" __global__ void merge_rope_heads(const X_T* dq, const X_T* dk, const X_T* dv, X_T* out,
        G_T* dbias, const R_T* cos, const R_T* sin, int B, int T, int H, int H_kv, int D) {
    int width = (H + 2 * H_kv) * D, half = D / 2;
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= width) return;
    int head = col / D, d = col % D, partner_d = d < half ? d + half : d - half;
    int part = head < H ? 0 : (head < H + H_kv ? 1 : 2);
    int part_heads = part == 0 ? H : H_kv, h = part == 0 ? head : head - H - (part - 1) * H_kv;
    const X_T* src = part == 0 ? dq : (part == 1 ? dk : dv);
    ACC column_sum = 0;
    for (long long r = blockIdx.y; r < (long long)B * T; r += gridDim.y) {
        long long b = r / T, t = r - b * T;
        const X_T* row = src + ((b * part_heads + h) * T + t) * D;
        ACC x = (ACC)load(row + d);
        if (cos && part < 2) x = rotated(x, (ACC)load(row + partner_d), d, D, cos, sin, t, (ACC)-1);
        store(out + r * width + col, x);
        column_sum += x;
    }
    if (dbias) atomicAdd(dbias + col, (G_T)column_sum);
}

// The same two for 16-bit heads with D a multiple of 16 in 16-byte vectors (every
// array 16-byte aligned). A row of qkv holds H + 2 H_kv heads of D / 16 pairs of
// vectors: pair p of a head is its columns 8p .. 8p + 7 and their rotation partners,
// the same 8 of its second half. Thread c of the grid's x owns pair c of every row
// (one division finds its head), keeps its 16 bias values in registers, and walks
// every gridDim.y-th row (one division a row finds b and t); each value is read
// once, and turned as `rotated` turns it.
struct RopePair {
    int part, h, part_heads;   // q, k or v (0, 1, 2); head h of its part's part_heads
    int column, qkv_column;    // 8p: in the head, and in a row of qkv
    bool turns;                // a q or k head, with rotary positions
};

__device__ __forceinline__ RopePair rope_pair(int c, int H, int H_kv, int D, bool rope) {
    int pairs = D / 16, head = c / pairs;
    RopePair p;
    p.part = head < H ? 0 : (head < H + H_kv ? 1 : 2);
    p.h = p.part == 0 ? head : head - H - (p.part - 1) * H_kv;
    p.part_heads = p.part == 0 ? H : H_kv;
    p.column = (c - head * pairs) * 8;
    p.qkv_column = head * D + p.column;
    p.turns = rope && p.part < 2;
    return p;
}

// first (columns 8p ..) and second (8p + D/2 ..) turned by the angles of position t
__device__ __forceinline__ void turn_pair(float* first, float* second, const R_T* cos,
        const R_T* sin, long long t, int half, int column, float sign) {
    #pragma unroll
    for (int e = 0; e < 8; e++) {
        float c = (float)cos[t * half + column + e], s = (float)sin[t * half + column + e];
        float x = first[e];
        first[e] = turned(x, second[e], c, s, true, sign);
        second[e] = turned(second[e], x, c, s, false, sign);
    }
}

extern "C" __global__ void split_rope_heads_h16x8(const h16* qkv, const h16* bias, h16* q, h16* k,
        h16* v, const R_T* cos, const R_T* sin, int B, int T, int H, int H_kv, int D, float q_scale) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= (H + 2 * H_kv) * D / 16) return;
    RopePair p = rope_pair(c, H, H_kv, D, cos != nullptr);
    int width = (H + 2 * H_kv) * D, half = D / 2, column = p.qkv_column;
    float first_bias[8], second_bias[8];
    if (bias) {
        unpack8(*(const uint4*)(bias + column), first_bias);
        unpack8(*(const uint4*)(bias + column + half), second_bias);
    }
    h16* heads = p.part == 0 ? q : (p.part == 1 ? k : v);
    for (long long r = blockIdx.y; r < (long long)B * T; r += gridDim.y) {
        long long b = r / T, t = r - b * T;
        float first[8], second[8];
        unpack8(*(const uint4*)(qkv + r * width + column), first);
        unpack8(*(const uint4*)(qkv + r * width + column + half), second);
        if (bias) {
            #pragma unroll
            for (int e = 0; e < 8; e++) {
                first[e] += first_bias[e];
                second[e] += second_bias[e];
            }
        }
        if (p.turns) turn_pair(first, second, cos, sin, t, half, p.column, 1.0f);
        if (p.part == 0) {
            #pragma unroll
            for (int e = 0; e < 8; e++) {
                first[e] *= q_scale;
                second[e] *= q_scale;
            }
        }
        h16* at = heads + ((b * p.part_heads + p.h) * T + t) * D + p.column;
        *(uint4*)at = pack8(first);
        *(uint4*)(at + half) = pack8(second);
    }
}

extern "C" __global__ void merge_rope_heads_h16x8(const h16* dq, const h16* dk, const h16* dv,
        h16* out, G_T* dbias, const R_T* cos, const R_T* sin, int B, int T, int H, int H_kv, int D) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= (H + 2 * H_kv) * D / 16) return;
    RopePair p = rope_pair(c, H, H_kv, D, cos != nullptr);
    int width = (H + 2 * H_kv) * D, half = D / 2, column = p.qkv_column;
    const h16* heads = p.part == 0 ? dq : (p.part == 1 ? dk : dv);
    float first_sum[8] = {0, 0, 0, 0, 0, 0, 0, 0}, second_sum[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (long long r = blockIdx.y; r < (long long)B * T; r += gridDim.y) {
        long long b = r / T, t = r - b * T;
        const h16* at = heads + ((b * p.part_heads + p.h) * T + t) * D + p.column;
        float first[8], second[8];
        unpack8(*(const uint4*)at, first);
        unpack8(*(const uint4*)(at + half), second);
        if (p.turns) turn_pair(first, second, cos, sin, t, half, p.column, -1.0f);
        *(uint4*)(out + r * width + column) = pack8(first);
        *(uint4*)(out + r * width + column + half) = pack8(second);
        #pragma unroll
        for (int e = 0; e < 8; e++) {
            first_sum[e] += first[e];
            second_sum[e] += second[e];
        }
    }
    if (dbias) {
        #pragma unroll
        for (int e = 0; e < 8; e++) {
            atomicAdd(dbias + column + e, (G_T)first_sum[e]);
            atomicAdd(dbias + column + half + e, (G_T)second_sum[e]);
        }
    }
}
"""


def split_rope_heads(qkv, bias, n_head, n_kv_head, rope, q_scale):
    """qkv: (B, T, (H + 2 H_kv) D) C-contiguous, bias or None, rope (cos, sin)
    (T, D/2) or None -> heads q (B, H, T, D), scaled by q_scale, and k, v
    (B, H_kv, T, D), in the form of flash.empty_heads."""
    cupy = import_cupy()
    qkv = cupy.ascontiguousarray(qkv)
    B, T, width = qkv.shape
    D = width // (n_head + 2 * n_kv_head)
    if bias is not None and bias.dtype != qkv.dtype:
        bias = bias.astype(qkv.dtype)
    cos, sin = _tables(rope)
    heads = empty_heads(B, n_head, n_kv_head, T, D, qkv.dtype)
    by_vectors = _in_pairs_of_vectors(D, width, qkv, bias, *heads)
    acc = acc_type(qkv.dtype)
    kernel = raw_kernel(_SOURCE, "split_rope_heads_h16x8" if by_vectors else "split_rope_heads",
                        half=half_of(qkv.dtype, cos.dtype if cos is not None else None),
                        X_T=c_type(qkv.dtype), ACC=acc,
                        R_T=c_type(cos.dtype) if cos is not None else acc, G_T="float")
    scale = numpy.float64(q_scale) if acc == "double" else numpy.float32(q_scale)
    sizes = (numpy.int32(B), numpy.int32(T), numpy.int32(n_head), numpy.int32(n_kv_head),
             numpy.int32(D), scale)
    if by_vectors:
        pairs = width // 16
        kernel(*column_grid(pairs, B * T, warps_for(pairs, _THREADS)),
               (qkv, optional(bias), *heads, optional(cos), optional(sin), *sizes))
    else:
        n = B * (n_head + 2 * n_kv_head) * T * D
        kernel(*stride_grid(n, _THREADS), (qkv, optional(bias), *heads, optional(cos), optional(sin),
                                        numpy.int64(n), *sizes))
    return heads


def merge_rope_heads(dheads, rope, dbias=None):
    """dheads: dq (B, H, T, D), dk, dv (B, H_kv, T, D) -> (B*T, (H + 2 H_kv) D),
    the gradient of split_rope_heads' input; with dbias, its column sums are added."""
    cupy = import_cupy()
    dq, dk, dv = (cupy.ascontiguousarray(part) for part in dheads)
    B, H, T, D = dq.shape
    n_kv_head = dk.shape[1]
    width = (H + 2 * n_kv_head) * D
    cos, sin = _tables(rope)
    out = cupy.empty((B * T, width), dtype=dq.dtype)
    by_vectors = _in_pairs_of_vectors(D, width, dq, dk, dv, out)
    acc = acc_type(dq.dtype)
    g_type = c_type(dbias.dtype) if dbias is not None else "float"
    kernel = raw_kernel(_SOURCE, "merge_rope_heads_h16x8" if by_vectors else "merge_rope_heads",
                        half=half_of(dq.dtype, cos.dtype if cos is not None else None),
                        X_T=c_type(dq.dtype), ACC=acc,
                        R_T=c_type(cos.dtype) if cos is not None else acc, G_T=g_type)
    threads = width // 16 if by_vectors else width      # a pair of vectors each, or a column
    kernel(*column_grid(threads, B * T, warps_for(threads, _THREADS), per_multiprocessor=8),
           (dq, dk, dv, out, optional(dbias), optional(cos), optional(sin), numpy.int32(B),
            numpy.int32(T), numpy.int32(H), numpy.int32(n_kv_head), numpy.int32(D)))
    return out


def _in_pairs_of_vectors(D, width, *arrays):
    """Whether the 16-bit kernels serve: 16-bit arrays, 16-byte aligned, with D a
    multiple of 16, so each half of a head is whole 16-byte vectors."""
    return is_half(arrays[0].dtype) and D % 16 == 0 and in_16_byte_vectors(width, *arrays)


def _tables(rope):
    """The contiguous (cos, sin) tables, or (None, None) without rotary positions."""
    if rope is None:
        return None, None
    cupy = import_cupy()
    return tuple(cupy.ascontiguousarray(table) for table in rope)
