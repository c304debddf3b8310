"""Softmax cross-entropy over (n, V) logits, and its gradient, in one kernel:
one block per row. Passes one and two find the row's maximum and its sum of
exponentials (independent loads, unlike a running-maximum pass); pass three,
when a gradient is wanted, overwrites the logits with
dloss * (softmax - onehot(target)) in the logits' dtype, so no (n, V)
buffer wider than the logits is ever made. Statistics are float32 (float64
for float64 logits).
"""
import numpy

from ..backend import _import_cupy
from .compile import acc_type, c_type, raw_kernel

_THREADS = 512

_SOURCE = r"""
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


def crossentropy(logits, targets, dloss=None):
    """logits: (n, V) C-contiguous, targets: (n,) int64 (-1 ignored).

    Returns per-row losses (n,) (0 where ignored). With dloss (a scalar or
    0-d array, the gradient of each row's loss) the logits are replaced by
    their gradient, in place."""
    cupy = _import_cupy()
    n, V = logits.shape
    if not logits.flags.c_contiguous:
        raise ValueError("crossentropy: logits must be C-contiguous")
    acc = acc_type(logits.dtype)
    losses = cupy.empty((n,), dtype=numpy.float64 if acc == "double" else numpy.float32)
    kernel = raw_kernel(_SOURCE, "crossentropy", L_T=c_type(logits.dtype), ACC=acc)
    want_grad = dloss is not None
    dloss = cupy.asarray(dloss if want_grad else 0.0, dtype=numpy.float64).reshape(1)
    targets = cupy.ascontiguousarray(targets, dtype=numpy.int64)
    kernel((n,), (_THREADS,), (logits, targets, losses, dloss, numpy.int32(want_grad),
                               numpy.int32(V)))
    return losses
