"""LayerNorm and RMSNorm forward and backward kernels (RMSNorm is the same
kernel compiled with CENTER 0: no mean).

A row of C channels is held in registers by ROW_WARPS = ceil(C / 1024) warps,
each of its ROW_THREADS threads holding CPL = ceil(C / ROW_THREADS) <= 32 of
its channels, so the row is read once; C is compiled in. Rows of at most 1024
channels take a warp each, eight to a block; a wider row takes a block of its
own, whose warps add their partial sums in shared memory. Backward also sums
dw and db (and, when asked, the column sums of dx): each thread over its rows
in registers; a block of eight rows then adds its warps' sums in shared
memory, so every block adds one atomic per channel into the results.
"""
import numpy

from ..backend import import_cupy
from .compile import acc_type, c_type, half_of, multiprocessor_count, optional, raw_kernel

_WARPS = 8    # a block's warps: eight rows of one warp, or one row of at most eight
_VALUES = 32  # a thread's channels of a row, at most (64 spilled: 788 bytes a thread at C = 2048)
# Wider rows go to the layers' xp expressions instead. A block of eight warps
# holds 8192 channels: in float32, the backward's 32 values a thread of each of dout,
# xhat and the dw, db and dx column sums take 210-220 registers of the 255 a
# thread may have (NVRTC 12.9, sm_80 and sm_90); a block of more threads would
# have to fit each in fewer.
MAX_WIDTH = _WARPS * 32 * _VALUES

_SOURCE = r"""
#define ROW_THREADS (32 * ROW_WARPS)

// the sum of x over the threads of a row, the same in each of them; warp_sums:
// the kernel's shared ACC[ROW_WARPS] (a block holds one row when ROW_WARPS > 1)
__device__ __forceinline__ ACC row_sum(ACC x, ACC* warp_sums) {
    x = warp_sum(x);
#if ROW_WARPS > 1
    __syncthreads();                       // the previous sum's readers are done
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = x;
    __syncthreads();
    x = 0;
    for (int i = 0; i < ROW_WARPS; i++) x += warp_sums[i];
#endif
    return x;
}

// ROWS rows a block; a thread's channels are t + ROW_THREADS * j, t its place in its row
extern "C" __global__ void layernorm_forward(const X_T* x, const W_T* w, const W_T* b,
        OUT_T* out, ACC* xhat, ACC* rstd, int N) {
    __shared__ ACC warp_sums[ROW_WARPS];
    int row = blockIdx.x * ROWS + threadIdx.x / ROW_THREADS;
    int t = threadIdx.x % ROW_THREADS;
    if (row >= N) return;                  // only where a row is a warp: no block barrier follows
    const X_T* xr = x + (long long)row * C;
    ACC v[CPL];
    ACC sum = 0;
    #pragma unroll
    for (int j = 0; j < CPL; j++) {
        int c = t + ROW_THREADS * j;
        v[j] = c < C ? (ACC)load(xr + c) : (ACC)0;
        sum += v[j];
    }
#if CENTER
    ACC mean = row_sum(sum, warp_sums) / C;
#else
    ACC mean = 0;   // RMSNorm: no centring
#endif
    ACC sq = 0;
    #pragma unroll
    for (int j = 0; j < CPL; j++) {
        int c = t + ROW_THREADS * j;
        v[j] = c < C ? v[j] - mean : (ACC)0;
        sq += v[j] * v[j];
    }
    ACC rs = (ACC)1 / sqrt(row_sum(sq, warp_sums) / C + (ACC)EPS);
    #pragma unroll
    for (int j = 0; j < CPL; j++) {
        int c = t + ROW_THREADS * j;
        if (c < C) {
            ACC h = v[j] * rs;
            xhat[(long long)row * C + c] = h;
            store(out + (long long)row * C + c, h * (ACC)load(w + c) + (b ? (ACC)load(b + c) : (ACC)0));
        }
    }
    if (t == 0) rstd[row] = rs;
}

// dx_low, when not null, receives a copy of dx in the activations' dtype;
// dx_sum, when not null, has the column sums of dx added into it
extern "C" __global__ void layernorm_backward(const D_T* dout, const ACC* xhat, const ACC* rstd,
        const W_T* w, ACC* dw, ACC* db, ACC* dx, LOW_T* dx_low, ACC* dx_sum, int N, int accumulate) {
    __shared__ ACC warp_sums[ROW_WARPS];
#if ROWS > 1
    __shared__ ACC block_dw[C];
    __shared__ ACC block_db[C];
    __shared__ ACC block_dx_sum[C];
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        block_dw[c] = 0;
        block_db[c] = 0;
        block_dx_sum[c] = 0;
    }
    __syncthreads();
#endif
    int t = threadIdx.x % ROW_THREADS;
    ACC own_dw[CPL], own_db[CPL];
#if ROWS == 1
    ACC own_dx_sum[CPL];   // a block of one row: each channel has one thread
#endif
    #pragma unroll
    for (int j = 0; j < CPL; j++) {
        own_dw[j] = 0;
        own_db[j] = 0;
#if ROWS == 1
        own_dx_sum[j] = 0;
#endif
    }
    // with one row a block, every thread of the block takes the same rows
    for (int row = blockIdx.x * ROWS + threadIdx.x / ROW_THREADS; row < N; row += gridDim.x * ROWS) {
        const D_T* dr = dout + (long long)row * C;
        const ACC* hr = xhat + (long long)row * C;
        ACC d[CPL], h[CPL];
        ACC mean_dxhat = 0, mean_dxhat_xhat = 0;
        #pragma unroll
        for (int j = 0; j < CPL; j++) {
            int c = t + ROW_THREADS * j;
            d[j] = c < C ? (ACC)load(dr + c) : (ACC)0;
            h[j] = c < C ? hr[c] : (ACC)0;
            ACC dxhat = c < C ? d[j] * (ACC)load(w + c) : (ACC)0;
            mean_dxhat += dxhat;
            mean_dxhat_xhat += dxhat * h[j];
            own_dw[j] += d[j] * h[j];
            own_db[j] += d[j];
        }
#if CENTER
        mean_dxhat = row_sum(mean_dxhat, warp_sums) / C;
#else
        mean_dxhat = 0;
#endif
        mean_dxhat_xhat = row_sum(mean_dxhat_xhat, warp_sums) / C;
        ACC rs = rstd[row];
        #pragma unroll
        for (int j = 0; j < CPL; j++) {
            int c = t + ROW_THREADS * j;
            if (c < C) {
                ACC value = rs * (d[j] * (ACC)load(w + c) - mean_dxhat - h[j] * mean_dxhat_xhat);
                ACC* target = dx + (long long)row * C + c;
                ACC total = accumulate ? *target + value : value;
                *target = total;
                if (dx_low) store(dx_low + (long long)row * C + c, total);
#if ROWS > 1
                // straight into shared memory: a third register array would
                // halve the blocks per multiprocessor at C = 768
                if (dx_sum) atomicAdd(block_dx_sum + c, total);
#else
                own_dx_sum[j] += total;
#endif
            }
        }
    }
#if ROWS > 1
    #pragma unroll
    for (int j = 0; j < CPL; j++) {
        int c = t + ROW_THREADS * j;
        if (c < C) {
            atomicAdd(block_dw + c, own_dw[j]);
            if (db) atomicAdd(block_db + c, own_db[j]);
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        atomicAdd(dw + c, block_dw[c]);
        if (db) atomicAdd(db + c, block_db[c]);
        if (dx_sum) atomicAdd(dx_sum + c, block_dx_sum[c]);
    }
#else
    #pragma unroll
    for (int j = 0; j < CPL; j++) {
        int c = t + ROW_THREADS * j;
        if (c < C) {
            atomicAdd(dw + c, own_dw[j]);
            if (db) atomicAdd(db + c, own_db[j]);
            if (dx_sum) atomicAdd(dx_sum + c, own_dx_sum[j]);
        }
    }
#endif
}
"""


def _layout(C):
    """(warps a row, rows a block) for rows of C channels: a warp a row and
    eight rows a block up to 1024 channels, one row of ceil(C / 1024) warps a
    block beyond."""
    row_warps = -(-C // (32 * _VALUES))
    return row_warps, (_WARPS if row_warps == 1 else 1)


def _macros(C, acc, eps, center):
    row_warps, rows = _layout(C)
    return dict(C=C, CPL=-(-C // (32 * row_warps)), ROW_WARPS=row_warps, ROWS=rows, ACC=acc,
                EPS=repr(float(eps)), CENTER=int(center))


def layernorm_forward(x, w, b, eps, out_dtype, center=True):
    """x: (N, C) -> out (N, C) in out_dtype, xhat (N, C) and rstd (N,) in the
    accumulator type. b may be None; center=False is RMSNorm (no mean)."""
    cupy = import_cupy()
    N, C = x.shape
    acc = acc_type(x.dtype, w.dtype)
    kernel = raw_kernel(_SOURCE, "layernorm_forward", half=half_of(x.dtype, w.dtype, out_dtype),
                        X_T=c_type(x.dtype), W_T=c_type(w.dtype),
                        OUT_T=c_type(out_dtype), D_T="float", LOW_T="float", **_macros(C, acc, eps, center))
    acc_dtype = numpy.float64 if acc == "double" else numpy.float32
    x = cupy.ascontiguousarray(x)
    out = cupy.empty((N, C), dtype=out_dtype)
    xhat = cupy.empty((N, C), dtype=acc_dtype)
    rstd = cupy.empty((N,), dtype=acc_dtype)
    row_warps, rows = _layout(C)
    kernel((-(-N // rows),), (32 * row_warps * rows,), (x, w, optional(b), out, xhat, rstd, numpy.int32(N)))
    return out, xhat, rstd


def layernorm_backward(dout, xhat, rstd, w, dw, db, dx=None, dx_low=None, dx_sum=None,
                       center=True):
    """dout: (N, C). Adds into dw, db (C,) (db may be None); center as forward's.
    Returns dx (N, C), added into `dx`
    when given; `dx_low` (N, C), when given, receives a copy of the result, and
    `dx_sum` (C,) its column sums."""
    cupy = import_cupy()
    N, C = dout.shape
    acc = acc_type(xhat.dtype)
    if any(g is not None and g.dtype != xhat.dtype for g in (dw, db, dx_sum)):
        raise ValueError("layernorm_backward: dw, db and dx_sum must have the statistics' dtype")
    if dx_low is not None and not dx_low.flags.c_contiguous:
        raise ValueError("layernorm_backward: dx_low must be C-contiguous")
    kernel = raw_kernel(_SOURCE, "layernorm_backward",
                        half=half_of(w.dtype, dout.dtype, dx_low.dtype if dx_low is not None else None),
                        X_T="float", W_T=c_type(w.dtype),
                        OUT_T="float", D_T=c_type(dout.dtype),
                        LOW_T=c_type(dx_low.dtype if dx_low is not None else xhat.dtype),
                        **_macros(C, acc, 0.0, center))
    dout = cupy.ascontiguousarray(dout)
    accumulate = dx is not None
    if dx is None:
        dx = cupy.empty((N, C), dtype=xhat.dtype)
    elif dx.dtype != xhat.dtype or not dx.flags.c_contiguous:
        raise ValueError("layernorm_backward: dx must be C-contiguous in the statistics' dtype")
    row_warps, rows = _layout(C)
    threads = 32 * row_warps * rows
    # the blocks a multiprocessor holds at once, as their registers allow: two
    # of eight one-warp rows (128 registers a thread at C = 768; at C = 1024,
    # 166-168 registers hold one, and the other half of the grid waits), or a guess of
    # eight warps of wide rows (209-220 registers at C >= 4096; at C = 1025-1600
    # NVRTC gives 118-165 and more would fit: tools/GPU_NOTES.md, wide norms, 3)
    resident = 2 if rows > 1 else _WARPS // row_warps
    blocks = max(1, min(-(-N // rows), resident * multiprocessor_count()))
    kernel((blocks,), (threads,), (dout, xhat, rstd, w, dw, optional(db), dx, optional(dx_low),
                                    optional(dx_sum),
                                    numpy.int32(N),
                                    numpy.int32(accumulate)))
    return dx
