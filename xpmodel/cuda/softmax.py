"""Causal softmax forward and backward over (R, T) rows of attention scores:
one warp per row, row r being query position r % T, which sees keys 0..r % T.

Forward keeps a running maximum and sum in one pass over the visible keys
and writes the probabilities (zeros for the future) in a second; backward
needs one dot product per row. Both read scores of any float dtype, compute
in float32 (float64 for float64) and write the probabilities / score
gradients in the caller's dtype.

Rows all of one 16-bit float dtype (float16 or bfloat16) with T a multiple
of 8 (up to 2048) take the `_h16` kernels instead: each lane loads its part of the row as 16-byte vectors
into registers, so a row is read once and written once.
"""
import numpy

from ..backend import import_cupy
from ..backend import is_half
from .compile import acc_type, c_type, half_of, raw_kernel

_THREADS = 256
_WARPS = _THREADS // 32

_SOURCE = r"""
// probabilities past the last visible key are written as zeros up to the end
// of the query's block of key_block keys: the products read no further
__device__ __forceinline__ int zeros_end(int last, int T, int key_block) {
    int end = (last / key_block + 1) * key_block;
    return end < T ? end : T;
}
extern "C" __global__ void causal_softmax_forward(const S_T* scores, P_T* probs, long long R, int T,
        int key_block) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= R) return;
    int last = (int)(row % T);          // the last key this query may see
    const S_T* s = scores + row * T;
    ACC m = NEG_INF, l = 0;
    for (int j = lane; j <= last; j += 32) {
        ACC v = (ACC)load(s + j);
        ACC m_new = v > m ? v : m;
        l = l * EXP(m - m_new) + EXP(v - m_new);
        m = m_new;
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        ACC m_other = __shfl_xor_sync(0xffffffffu, m, offset);
        ACC l_other = __shfl_xor_sync(0xffffffffu, l, offset);
        ACC m_new = m_other > m ? m_other : m;
        l = (l == 0 ? (ACC)0 : l * EXP(m - m_new)) + (l_other == 0 ? (ACC)0 : l_other * EXP(m_other - m_new));
        m = m_new;
    }
    ACC inv = (ACC)1 / l;
    P_T* p = probs + row * T;
    for (int j = lane; j <= last; j += 32) store(p + j, EXP((ACC)load(s + j) - m) * inv);
    for (int j = last + 1 + lane; j < zeros_end(last, T, key_block); j += 32) store(p + j, (ACC)0);
}

extern "C" __global__ void causal_softmax_backward(const S_T* dprobs, const P_T* probs, D_T* dscores,
        long long R, int T, int key_block) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= R) return;
    int last = (int)(row % T);
    const S_T* dp = dprobs + row * T;
    const P_T* p = probs + row * T;
    ACC dot = 0;
    for (int j = lane; j <= last; j += 32) dot += (ACC)load(dp + j) * (ACC)load(p + j);
    dot = warp_sum(dot);
    D_T* ds = dscores + row * T;
    for (int j = lane; j <= last; j += 32) store(ds + j, (ACC)load(p + j) * ((ACC)load(dp + j) - dot));
    for (int j = last + 1 + lane; j < zeros_end(last, T, key_block); j += 32) store(ds + j, (ACC)0);
}
"""

_H16_SOURCE = r"""
// probabilities past the last visible key are written as zeros up to the end
// of the query's block of key_block keys: the products read no further
__device__ __forceinline__ int zeros_end(int last, int T, int key_block) {
    int end = (last / key_block + 1) * key_block;
    return end < T ? end : T;
}
// 16-bit rows of T = 8 * vectors; lane l holds vectors l, l + 32, ... (VPL of them)
extern "C" __global__ void causal_softmax_forward_h16(const h16* scores, h16* probs, long long R, int T,
        int key_block) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= R) return;
    int last = (int)(row % T), vectors = T / 8;
    const uint4* s = (const uint4*)(scores + row * T);
    uint4 v[VPL];
    float h[8], m = NEG_INF;
    #pragma unroll
    for (int k = 0; k < VPL; k++) {
        int i = lane + 32 * k;
        if (i < vectors && 8 * i <= last) {
            v[k] = s[i];
            unpack8(v[k], h);
            #pragma unroll
            for (int e = 0; e < 8; e++) if (8 * i + e <= last) m = fmaxf(m, h[e]);
        }
    }
    m = warp_max(m);
    float l = 0;
    #pragma unroll
    for (int k = 0; k < VPL; k++) {
        int i = lane + 32 * k;
        if (i < vectors && 8 * i <= last) {
            unpack8(v[k], h);
            #pragma unroll
            for (int e = 0; e < 8; e++) if (8 * i + e <= last) l += EXP(h[e] - m);
        }
    }
    float inv = 1.0f / warp_sum(l);
    uint4* p = (uint4*)(probs + row * T);
    #pragma unroll
    for (int k = 0; k < VPL; k++) {
        int i = lane + 32 * k;
        if (8 * i >= zeros_end(last, T, key_block)) continue;
        if (8 * i <= last) {
            unpack8(v[k], h);
            #pragma unroll
            for (int e = 0; e < 8; e++) h[e] = 8 * i + e <= last ? EXP(h[e] - m) * inv : 0.0f;
            p[i] = pack8(h);
        } else {
            p[i] = uint4{0u, 0u, 0u, 0u};
        }
    }
}

extern "C" __global__ void causal_softmax_backward_h16(const h16* dprobs, const h16* probs,
        h16* dscores, long long R, int T, int key_block) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= R) return;
    int last = (int)(row % T), vectors = T / 8;
    const uint4* dp = (const uint4*)(dprobs + row * T);
    const uint4* p = (const uint4*)(probs + row * T);
    uint4 dv[VPL], pv[VPL];
    float d[8], h[8], dot = 0;
    #pragma unroll
    for (int k = 0; k < VPL; k++) {
        int i = lane + 32 * k;
        if (i < vectors && 8 * i <= last) {
            dv[k] = dp[i];
            pv[k] = p[i];
            unpack8(dv[k], d);
            unpack8(pv[k], h);
            #pragma unroll
            for (int e = 0; e < 8; e++) if (8 * i + e <= last) dot += d[e] * h[e];
        }
    }
    dot = warp_sum(dot);
    uint4* ds = (uint4*)(dscores + row * T);
    #pragma unroll
    for (int k = 0; k < VPL; k++) {
        int i = lane + 32 * k;
        if (8 * i >= zeros_end(last, T, key_block)) continue;
        if (8 * i <= last) {
            unpack8(dv[k], d);
            unpack8(pv[k], h);
            #pragma unroll
            for (int e = 0; e < 8; e++) d[e] = 8 * i + e <= last ? h[e] * (d[e] - dot) : 0.0f;
            ds[i] = pack8(d);
        } else {
            ds[i] = uint4{0u, 0u, 0u, 0u};
        }
    }
}
"""


def _h16_vectors_per_lane(T, *arrays):
    """VPL for the _h16 kernels (a power of two), or None where they do not apply:
    every array of one 16-bit float dtype and 16-byte aligned, T a multiple of 8
    up to 2048."""
    if T % 8 or T > 2048 or len({a.dtype for a in arrays}) != 1 or not is_half(arrays[0].dtype) \
            or any(a.data.ptr % 16 for a in arrays):
        return None
    per_lane = 1
    while 256 * per_lane < T:
        per_lane *= 2
    return per_lane


def _key_block(T, key_block):
    """key_block as the kernels take it: whole rows unless a block of a
    multiple of 8 keys (the vector width) was asked for."""
    return key_block if key_block and key_block % 8 == 0 else T


def _warp_per_row(R):
    """(grid, block) giving each of R rows one warp."""
    return ((R + _WARPS - 1) // _WARPS,), (_THREADS,)


def causal_softmax_forward(scores, out_dtype, key_block=None):
    """scores: (..., T, T) -> probabilities (scores' shape) in out_dtype.

    key_block: the future part of a row is written (as zeros) only up to the
    end of its query's block of key_block keys; None: to the end of the row."""
    cupy = import_cupy()
    scores = cupy.ascontiguousarray(scores)
    T = scores.shape[-1]
    R = scores.size // T
    probs = cupy.empty(scores.shape, dtype=out_dtype)
    per_lane = _h16_vectors_per_lane(T, scores, probs)
    if per_lane:
        kernel = raw_kernel(_H16_SOURCE, "causal_softmax_forward_h16", half=scores.dtype, VPL=per_lane)
    else:
        kernel = raw_kernel(_SOURCE, "causal_softmax_forward", half=half_of(scores.dtype, out_dtype),
                            S_T=c_type(scores.dtype),
                            P_T=c_type(out_dtype), D_T="float", ACC=acc_type(scores.dtype))
    kernel(*_warp_per_row(R), (scores, probs, numpy.int64(R), numpy.int32(T),
                               numpy.int32(_key_block(T, key_block))))
    return probs


def causal_softmax_backward(dprobs, probs, out_dtype, key_block=None):
    """dprobs, probs: (..., T, T) -> dscores in out_dtype (key_block: as forward's)."""
    cupy = import_cupy()
    dprobs, probs = cupy.ascontiguousarray(dprobs), cupy.ascontiguousarray(probs)
    T = probs.shape[-1]
    R = probs.size // T
    dscores = cupy.empty(probs.shape, dtype=out_dtype)
    per_lane = _h16_vectors_per_lane(T, dprobs, probs, dscores)
    if per_lane:
        kernel = raw_kernel(_H16_SOURCE, "causal_softmax_backward_h16", half=probs.dtype, VPL=per_lane)
    else:
        kernel = raw_kernel(_SOURCE, "causal_softmax_backward",
                            half=half_of(dprobs.dtype, probs.dtype, out_dtype), S_T=c_type(dprobs.dtype),
                            P_T=c_type(probs.dtype), D_T=c_type(out_dtype),
                            ACC=acc_type(dprobs.dtype))
    kernel(*_warp_per_row(R), (dprobs, probs, dscores, numpy.int64(R), numpy.int32(T),
                               numpy.int32(_key_block(T, key_block))))
    return dscores
