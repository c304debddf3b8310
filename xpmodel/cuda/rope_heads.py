"""The head split and merge for grouped-query attention and rotary positions,
one kernel each way.

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

from ..backend import _import_cupy
from .compile import (acc_type, c_type, column_grid, half_of, optional, raw_kernel, stride_grid,
                      warps_for)
from .flash import empty_heads

_THREADS = 256

_SOURCE = r"""
// The rotation of element d of a head whose pair partner holds `partner`:
// d < D/2: x cos - partner sin; d >= D/2: x cos + partner sin. sign -1 turns back.
__device__ __forceinline__ ACC rotated(ACC x, ACC partner, int d, int D, const R_T* cos,
        const R_T* sin, long long t, ACC sign) {
    int half = D / 2, j = d < half ? d : d - half;
    ACC c = (ACC)cos[t * half + j], s = (ACC)sin[t * half + j];
    return d < half ? x * c - sign * partner * s : x * c + sign * partner * s;
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
"""


def split_rope_heads(qkv, bias, n_head, n_kv_head, rope, q_scale):
    """qkv: (B, T, (H + 2 H_kv) D) C-contiguous, bias or None, rope (cos, sin)
    (T, D/2) or None -> heads q (B, H, T, D), scaled by q_scale, and k, v
    (B, H_kv, T, D), in the form of flash.empty_heads."""
    cupy = _import_cupy()
    qkv = cupy.ascontiguousarray(qkv)
    B, T, width = qkv.shape
    D = width // (n_head + 2 * n_kv_head)
    if bias is not None and bias.dtype != qkv.dtype:
        bias = bias.astype(qkv.dtype)
    cos, sin = _tables(rope)
    acc = acc_type(qkv.dtype)
    kernel = raw_kernel(_SOURCE, "split_rope_heads",
                        half=half_of(qkv.dtype, cos.dtype if cos is not None else None),
                        X_T=c_type(qkv.dtype), ACC=acc,
                        R_T=c_type(cos.dtype) if cos is not None else acc, G_T="float")
    heads = empty_heads(B, n_head, n_kv_head, T, D, qkv.dtype)
    n = B * (n_head + 2 * n_kv_head) * T * D
    scale = numpy.float64(q_scale) if acc == "double" else numpy.float32(q_scale)
    kernel(*stride_grid(n, _THREADS), (qkv, optional(bias), *heads, optional(cos), optional(sin),
                                    numpy.int64(n), numpy.int32(B), numpy.int32(T),
                                    numpy.int32(n_head), numpy.int32(n_kv_head), numpy.int32(D),
                                    scale))
    return heads


def merge_rope_heads(dheads, rope, dbias=None):
    """dheads: dq (B, H, T, D), dk, dv (B, H_kv, T, D) -> (B*T, (H + 2 H_kv) D),
    the gradient of split_rope_heads' input; with dbias, its column sums are added."""
    cupy = _import_cupy()
    dq, dk, dv = (cupy.ascontiguousarray(part) for part in dheads)
    B, H, T, D = dq.shape
    n_kv_head = dk.shape[1]
    width = (H + 2 * n_kv_head) * D
    cos, sin = _tables(rope)
    acc = acc_type(dq.dtype)
    g_type = c_type(dbias.dtype) if dbias is not None else "float"
    kernel = raw_kernel(_SOURCE, "merge_rope_heads",
                        half=half_of(dq.dtype, cos.dtype if cos is not None else None),
                        X_T=c_type(dq.dtype), ACC=acc,
                        R_T=c_type(cos.dtype) if cos is not None else acc, G_T=g_type)
    out = cupy.empty((B * T, width), dtype=dq.dtype)
    kernel(*column_grid(width, B * T, warps_for(width, _THREADS), per_multiprocessor=8),
           (dq, dk, dv, out, optional(dbias), optional(cos), optional(sin), numpy.int32(B),
            numpy.int32(T), numpy.int32(H), numpy.int32(n_kv_head), numpy.int32(D)))
    return out


def _tables(rope):
    """The contiguous (cos, sin) tables, or (None, None) without rotary positions."""
    if rope is None:
        return None, None
    cupy = _import_cupy()
    return tuple(cupy.ascontiguousarray(table) for table in rope)
