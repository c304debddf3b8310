"""The matrix product every layer uses, on NumPy or through cuBLAS.

On CuPy arrays it goes to xpmodel.cuda.gemm: float16 and bfloat16 operands
use the tensor cores with float32 accumulation, a wider output dtype costs
nothing, and accumulate=True adds into `out` inside the product. This holds
for both kernel modes (backend.use_kernels): cuBLAS is reached only from here.

NumPy has no bfloat16 matrix product of its own (ml_dtypes' is slow and
varies by version), so bfloat16 operands on NumPy are multiplied in float32:
exact products, float32 sums, the result rounded once, as the tensor cores do.
"""
import numpy

from ..backend import BFLOAT16, array_module, fused_kernels, is_cuda_array


def matmul(a, b, transpose_a=False, transpose_b=False, out=None, out_dtype=None,
           accumulate=False, alpha=1.0):
    """alpha * op(a) @ op(b) over the last two axes, op transposing when asked.

    a: (..., M, K) (or (..., K, M) with transpose_a), b likewise; leading axes
    are a batch. out: written (or, with accumulate, added into) when given;
    otherwise a new array of out_dtype (default: a's dtype).
    """
    a_op = a.swapaxes(-1, -2) if transpose_a else a
    b_op = b.swapaxes(-1, -2) if transpose_b else b
    xp = array_module(a)
    if is_cuda_array(a):
        from ..cuda.gemm import gemm
        if out is None:
            out = xp.empty(a_op.shape[:-1] + b_op.shape[-1:], dtype=out_dtype or a.dtype)
        return gemm(a_op, b_op, out, alpha=alpha, beta=1.0 if accumulate else 0.0)
    if a.dtype == BFLOAT16:
        a_op, b_op = a_op.astype(numpy.float32), b_op.astype(numpy.float32)
    if out is not None and not accumulate and out.dtype == xp.result_type(a_op, b_op):
        xp.matmul(a_op, b_op, out=out)
        if alpha != 1.0:
            out *= alpha
        return out
    product = xp.matmul(a_op, b_op)
    if alpha != 1.0:
        product *= alpha
    if out is None:
        return product.astype(out_dtype or a.dtype, copy=False)
    if accumulate:
        out += product
    else:
        out[...] = product
    return out


def add_column_sums(dout, db):
    """db (Cout,) += dout (N, Cout) summed over rows, in db's dtype (bias gradients)."""
    if fused_kernels(dout):
        # a (1, N) @ (N, Cout) product reads dout once and adds into db in cuBLAS
        matmul(_filled(dout, (1, dout.shape[0]), 1.0), dout, out=db.reshape(1, -1), accumulate=True)
    else:
        db += dout.sum(axis=0, dtype=db.dtype)


def row_sums(a, scale=1.0):
    """a (..., C) -> (..., 1): each row's sum over the last axis times `scale`,
    as one matrix-vector product with a column of `scale`. On NumPy that is one
    BLAS pass, where a reduction along a short last axis took two to five times
    as long on a 2-core Intel Xeon (a LayerNorm of (768, 128) float32 rows: 160
    instead of 316 us forward; the sums of (6, 4, 64, 64) probabilities: 12
    instead of 59 us)."""
    C = a.shape[-1]
    sums = matmul(a.reshape(-1, C), _filled(a, (C, 1), scale))
    return sums.reshape(a.shape[:-1] + (1,))


def row_means(a):
    """a (..., C) -> (..., 1): the mean over the last axis (see row_sums)."""
    return row_sums(a, 1.0 / a.shape[-1])


_filled_arrays = {}


def _filled(like, shape, value):
    """A cached array of `shape` filled with `value`, in like's dtype, on like's device."""
    device = like.device.id if is_cuda_array(like) else None
    key = (shape, value, like.dtype.str, device)
    if key not in _filled_arrays:
        _filled_arrays[key] = array_module(like).full(shape, value, dtype=like.dtype)
    return _filled_arrays[key]
