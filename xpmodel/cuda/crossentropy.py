"""Softmax cross-entropy over (n, V) logits, and its gradient, in one kernel:
one block per row. When a gradient is wanted the logits are overwritten with
dloss * (softmax - onehot(target)) in the logits' dtype, so no (n, V) buffer
wider than the logits is ever made. Statistics are float32 (float64 for
float64 logits).

16-bit (float16 or bfloat16) logits with V a multiple of 8 (the training case) take
`crossentropy_rows`: each thread loads its share of the row as 16-byte
vectors into registers, so the row is read once and written once. Other
dtypes and widths take `crossentropy`, which reads the row three times
(maximum, sum of exponentials, gradient).
"""
import numpy

from ..backend import import_cupy, device_scalar, is_half
from .compile import acc_type, c_type, half_of, raw_kernel

_THREADS = 512

_REDUCE = r"""
// reduce one value per thread over the block; every thread gets the result
template <bool MAX>
__device__ __forceinline__ ACC block_reduce(ACC x, ACC* shared) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    x = MAX ? warp_max(x) : warp_sum(x);
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    if (warp == 0) {
        x = lane < warps ? shared[lane] : (MAX ? (ACC)NEG_INF : (ACC)0);
        x = MAX ? warp_max(x) : warp_sum(x);
        if (lane == 0) shared[32] = x;
    }
    __syncthreads();
    x = shared[32];
    __syncthreads();   // shared is reused by the next reduction
    return x;
}
"""

_SOURCE = _REDUCE + r"""
extern "C" __global__ void crossentropy(L_T* logits, const long long* targets, ACC* losses,
        const double* dloss, int want_grad, int V) {
    __shared__ ACC shared[33];
    L_T* x = logits + (long long)blockIdx.x * V;
    ACC m = NEG_INF;
    #pragma unroll 16
    for (int j = threadIdx.x; j < V; j += blockDim.x) m = fmax(m, (ACC)load(x + j));
    m = block_reduce<true>(m, shared);
    ACC l = 0;
    #pragma unroll 16
    for (int j = threadIdx.x; j < V; j += blockDim.x) l += EXP((ACC)load(x + j) - m);
    l = block_reduce<false>(l, shared);
    long long target = targets[blockIdx.x];
    bool keep = target >= 0;
    if (threadIdx.x == 0) losses[blockIdx.x] = keep ? log(l) + m - (ACC)load(x + target) : (ACC)0;
    if (!want_grad) return;
    __syncthreads();   // the target's logit is read above before it is overwritten below
    ACC scale = keep ? (ACC)dloss[0] : (ACC)0;
    ACC inv = (ACC)1 / l;
    #pragma unroll 16
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        ACC p = EXP((ACC)load(x + j) - m) * inv;
        store(x + j, (p - (j == target ? (ACC)1 : (ACC)0)) * scale);
    }
}
"""


_ROWS_SOURCE = _REDUCE + r"""
// 16-bit logits, V = 8 * VECS; thread t holds vectors t, t + THREADS, ... (VPT of them)
extern "C" __global__ void __launch_bounds__(THREADS) crossentropy_rows(h16* logits,
        const long long* targets, float* losses, const double* dloss, int want_grad) {
    __shared__ float shared[33];
    uint4* row = (uint4*)(logits + (long long)blockIdx.x * VECS * 8);
    long long target = targets[blockIdx.x];
    bool keep = target >= 0;
    // read before any thread overwrites the row (the reductions below synchronise)
    float target_logit = threadIdx.x == 0 && keep ? h16_to_float(((h16*)row)[target]) : 0.0f;
    uint4 v[VPT];
    float m = NEG_INF;
    #pragma unroll
    for (int k = 0; k < VPT; k++) {
        int i = threadIdx.x + k * THREADS;
        if (i < VECS) {
            v[k] = row[i];
            float h[8];
            unpack8(v[k], h);
            #pragma unroll
            for (int e = 0; e < 8; e++) m = fmaxf(m, h[e]);
        }
    }
    m = block_reduce<true>(m, shared);
    float l = 0;
    #pragma unroll
    for (int k = 0; k < VPT; k++) {
        if (threadIdx.x + k * THREADS < VECS) {
            float h[8];
            unpack8(v[k], h);
            #pragma unroll
            for (int e = 0; e < 8; e++) l += EXP(h[e] - m);
        }
    }
    l = block_reduce<false>(l, shared);
    if (threadIdx.x == 0) losses[blockIdx.x] = keep ? logf(l) + m - target_logit : 0.0f;
    if (!want_grad) return;
    float scale = keep ? (float)dloss[0] : 0.0f;
    float inv = 1.0f / l;
    #pragma unroll
    for (int k = 0; k < VPT; k++) {
        int i = threadIdx.x + k * THREADS;
        if (i < VECS) {
            float h[8];
            unpack8(v[k], h);
            #pragma unroll
            for (int e = 0; e < 8; e++)
                h[e] = (EXP(h[e] - m) * inv - (8LL * i + e == target ? 1.0f : 0.0f)) * scale;
            row[i] = pack8(h);
        }
    }
}
"""

# beyond this (V > 65536, 1024 threads) a thread would need more than the 64
# registers __launch_bounds__(1024) leaves it, and spill
_MAX_VECTORS_PER_THREAD = 8


def _rows_launch(V):
    """(threads, vectors per thread) of crossentropy_rows for V, or None where it does not apply."""
    if V % 8:
        return None
    vectors = V // 8
    threads = min(1024, max(64, 32 * -(-vectors // 256)))   # about 8 vectors per thread
    per_thread = -(-vectors // threads)
    return None if per_thread > _MAX_VECTORS_PER_THREAD else (threads, per_thread)


def crossentropy(logits, targets, dloss=None):
    """logits: (n, V) C-contiguous, targets: (n,) int64 (-1 ignored).

    Returns per-row losses (n,) (0 where ignored). With dloss (a scalar or
    0-d array, the gradient of each row's loss) the logits are replaced by
    their gradient, in place."""
    cupy = import_cupy()
    n, V = logits.shape
    if not logits.flags.c_contiguous:
        raise ValueError("crossentropy: logits must be C-contiguous")
    acc = acc_type(logits.dtype)
    losses = cupy.empty((n,), dtype=numpy.float64 if acc == "double" else numpy.float32)
    want_grad = dloss is not None
    dloss = device_scalar(cupy, dloss if want_grad else 0.0).reshape(1)   # no copy from the host
    targets = cupy.ascontiguousarray(targets, dtype=numpy.int64)
    aligned = logits.data.ptr % 16 == 0   # 16-byte vectors (rows are, as V % 8 == 0)
    rows = _rows_launch(V) if is_half(logits.dtype) and aligned else None
    if rows is not None:
        threads, per_thread = rows
        kernel = raw_kernel(_ROWS_SOURCE, "crossentropy_rows", half=logits.dtype, ACC="float", VECS=V // 8,
                            THREADS=threads, VPT=per_thread)
        kernel((n,), (threads,), (logits, targets, losses, dloss, numpy.int32(want_grad)))
        return losses
    kernel = raw_kernel(_SOURCE, "crossentropy", half=half_of(logits.dtype), L_T=c_type(logits.dtype),
                        ACC=acc)
    kernel((n,), (_THREADS,), (logits, targets, losses, dloss, numpy.int32(want_grad),
                               numpy.int32(V)))
    return losses
