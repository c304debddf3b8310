"""Softmax cross-entropy over (n, V) logits, and its gradient, in one kernel:
one block per row. Pass one keeps a running maximum and sum of exponentials;
pass two, when a gradient is wanted, overwrites the logits with
dloss * (softmax - onehot(target)) in the logits' dtype, so no (n, V)
buffer wider than the logits is ever made. Statistics are float32 (float64
for float64 logits).
"""
import numpy

from ..backend import _import_cupy
from .compile import acc_type, c_type, raw_kernel

_THREADS = 512

_SOURCE = r"""
// (m, l) pairs combine as l = l_a exp(m_a - m) + l_b exp(m_b - m), m = max(m_a, m_b)
__device__ __forceinline__ void combine(ACC& m, ACC& l, ACC m_other, ACC l_other) {
    ACC m_new = m_other > m ? m_other : m;
    l = (l == 0 ? (ACC)0 : l * exp(m - m_new)) + (l_other == 0 ? (ACC)0 : l_other * exp(m_other - m_new));
    m = m_new;
}

extern "C" __global__ void crossentropy(L_T* logits, const long long* targets, ACC* losses,
        const double* dloss, int want_grad, int V) {
    __shared__ ACC shared_m[32], shared_l[32];
    long long row = blockIdx.x;
    L_T* x = logits + row * V;
    ACC m = NEG_INF, l = 0;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        ACC v = (ACC)load(x + j);
        ACC m_new = v > m ? v : m;
        l = l * exp(m - m_new) + exp(v - m_new);
        m = m_new;
    }
    for (int offset = 16; offset > 0; offset >>= 1)
        combine(m, l, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, l, offset));
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) { shared_m[warp] = m; shared_l[warp] = l; }
    __syncthreads();
    if (warp == 0) {
        m = lane < warps ? shared_m[lane] : NEG_INF;
        l = lane < warps ? shared_l[lane] : (ACC)0;
        for (int offset = 16; offset > 0; offset >>= 1)
            combine(m, l, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, l, offset));
        if (lane == 0) { shared_m[0] = m; shared_l[0] = l; }
    }
    __syncthreads();
    m = shared_m[0];
    l = shared_l[0];
    long long target = targets[row];
    bool keep = target >= 0;
    if (threadIdx.x == 0) losses[row] = keep ? log(l) + m - (ACC)load(x + target) : (ACC)0;
    if (!want_grad) return;
    __syncthreads();   // the target's logit is read above before it is overwritten below
    ACC scale = keep ? (ACC)dloss[0] : (ACC)0;
    ACC inv = (ACC)1 / l;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        ACC p = exp((ACC)load(x + j) - m) * inv;
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
