"""LayerNorm and RMSNorm forward and backward kernels: one warp per row of C
channels (RMSNorm is the same kernel compiled with CENTER 0: no mean).

Each lane holds its CPL = ceil(C / 32) channels of the row in registers, so
the row is read once; C is compiled in. Backward also sums dw and db (and,
when asked, the column sums of dx): each lane over its rows in registers,
then the block's warps in shared memory, then one atomic add per block and
channel.
"""
import numpy

from ..backend import _import_cupy
from .compile import acc_type, c_type, half_of, multiprocessor_count, optional, raw_kernel

_THREADS = 256
_WARPS = _THREADS // 32
# Rows wider than this go to the layers' xp expressions instead: each lane's
# registers hold ceil(C / 32) values of a row, which spill from C = 2048 (788
# bytes a thread there, 8.9 KB at 4096), and the block's three shared column
# sums stop compiling at C = 4096 in float64 and 6144 in float32.
MAX_WIDTH = 2048

_SOURCE = r"""
extern "C" __global__ void layernorm_forward(const X_T* x, const W_T* w, const W_T* b,
        OUT_T* out, ACC* xhat, ACC* rstd, int N) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const X_T* xr = x + (long long)row * C;
    ACC v[CPL];
    ACC sum = 0;
    #pragma unroll
    for (int j = 0; j < CPL; j++) {
        int c = lane + 32 * j;
        v[j] = c < C ? (ACC)load(xr + c) : (ACC)0;
        sum += v[j];
    }
#if CENTER
    ACC mean = warp_sum(sum) / C;
#else
    ACC mean = 0;   // RMSNorm: no centring
#endif
    ACC sq = 0;
    #pragma unroll
    for (int j = 0; j < CPL; j++) {
        int c = lane + 32 * j;
        v[j] = c < C ? v[j] - mean : (ACC)0;
        sq += v[j] * v[j];
    }
    ACC rs = (ACC)1 / sqrt(warp_sum(sq) / C + (ACC)EPS);
    #pragma unroll
    for (int j = 0; j < CPL; j++) {
        int c = lane + 32 * j;
        if (c < C) {
            ACC h = v[j] * rs;
            xhat[(long long)row * C + c] = h;
            store(out + (long long)row * C + c, h * (ACC)load(w + c) + (b ? (ACC)load(b + c) : (ACC)0));
        }
    }
    if (lane == 0) rstd[row] = rs;
}

// dx_low, when not null, receives a copy of dx in the activations' dtype;
// dx_sum, when not null, has the column sums of dx added into it
extern "C" __global__ void layernorm_backward(const D_T* dout, const ACC* xhat, const ACC* rstd,
        const W_T* w, ACC* dw, ACC* db, ACC* dx, LOW_T* dx_low, ACC* dx_sum, int N, int accumulate) {
    __shared__ ACC block_dw[C];
    __shared__ ACC block_db[C];
    __shared__ ACC block_dx_sum[C];
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        block_dw[c] = 0;
        block_db[c] = 0;
        block_dx_sum[c] = 0;
    }
    __syncthreads();
    int lane = threadIdx.x % 32;
    int warps = blockDim.x / 32;
    ACC lane_dw[CPL], lane_db[CPL];
    #pragma unroll
    for (int j = 0; j < CPL; j++) { lane_dw[j] = 0; lane_db[j] = 0; }
    for (int row = blockIdx.x * warps + threadIdx.x / 32; row < N; row += gridDim.x * warps) {
        const D_T* dr = dout + (long long)row * C;
        const ACC* hr = xhat + (long long)row * C;
        ACC d[CPL], h[CPL];
        ACC mean_dxhat = 0, mean_dxhat_xhat = 0;
        #pragma unroll
        for (int j = 0; j < CPL; j++) {
            int c = lane + 32 * j;
            d[j] = c < C ? (ACC)load(dr + c) : (ACC)0;
            h[j] = c < C ? hr[c] : (ACC)0;
            ACC dxhat = c < C ? d[j] * (ACC)load(w + c) : (ACC)0;
            mean_dxhat += dxhat;
            mean_dxhat_xhat += dxhat * h[j];
            lane_dw[j] += d[j] * h[j];
            lane_db[j] += d[j];
        }
#if CENTER
        mean_dxhat = warp_sum(mean_dxhat) / C;
#else
        mean_dxhat = 0;
#endif
        mean_dxhat_xhat = warp_sum(mean_dxhat_xhat) / C;
        ACC rs = rstd[row];
        #pragma unroll
        for (int j = 0; j < CPL; j++) {
            int c = lane + 32 * j;
            if (c < C) {
                ACC value = rs * (d[j] * (ACC)load(w + c) - mean_dxhat - h[j] * mean_dxhat_xhat);
                ACC* target = dx + (long long)row * C + c;
                ACC total = accumulate ? *target + value : value;
                *target = total;
                if (dx_low) store(dx_low + (long long)row * C + c, total);
                // straight into shared memory: a third register array would
                // halve the blocks per multiprocessor at C = 768
                if (dx_sum) atomicAdd(block_dx_sum + c, total);
            }
        }
    }
    #pragma unroll
    for (int j = 0; j < CPL; j++) {
        int c = lane + 32 * j;
        if (c < C) {
            atomicAdd(block_dw + c, lane_dw[j]);
            if (db) atomicAdd(block_db + c, lane_db[j]);
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        atomicAdd(dw + c, block_dw[c]);
        if (db) atomicAdd(db + c, block_db[c]);
        if (dx_sum) atomicAdd(dx_sum + c, block_dx_sum[c]);
    }
}
"""


def _macros(C, acc, eps, center):
    return dict(C=C, CPL=(C + 31) // 32, ACC=acc, EPS=repr(float(eps)), CENTER=int(center))


def layernorm_forward(x, w, b, eps, out_dtype, center=True):
    """x: (N, C) -> out (N, C) in out_dtype, xhat (N, C) and rstd (N,) in the
    accumulator type. b may be None; center=False is RMSNorm (no mean)."""
    cupy = _import_cupy()
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
    kernel(((N + _WARPS - 1) // _WARPS,), (_THREADS,), (x, w, optional(b), out, xhat, rstd,
                                                        numpy.int32(N)))
    return out, xhat, rstd


def layernorm_backward(dout, xhat, rstd, w, dw, db, dx=None, dx_low=None, dx_sum=None,
                       center=True):
    """dout: (N, C). Adds into dw, db (C,) (db may be None); center as forward's.
    Returns dx (N, C), added into `dx`
    when given; `dx_low` (N, C), when given, receives a copy of the result, and
    `dx_sum` (C,) its column sums."""
    cupy = _import_cupy()
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
    blocks = max(1, min((N + _WARPS - 1) // _WARPS, 2 * multiprocessor_count()))
    kernel((blocks,), (_THREADS,), (dout, xhat, rstd, w, dw, optional(db), dx, optional(dx_low),
                                    optional(dx_sum),
                                    numpy.int32(N),
                                    numpy.int32(accumulate)))
    return dx
