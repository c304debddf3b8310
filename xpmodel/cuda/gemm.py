"""Matrix products straight through cuBLAS.

CuPy's matmul sends a float16 product whose operands have more than two
dimensions to a slow path without tensor cores; these calls avoid that:
2-D products go to cublasGemmEx and batched ones (attention's per-head
products) to cublasGemmStridedBatchedEx, with float32 accumulation (float64
for float64) and an output dtype of the caller's choosing, so 16-bit
operands (float16 or bfloat16) can write a float32 result or add into float32
gradients (beta = 1).

Row-major C = A @ B is computed as the column-major product C^T = B^T A^T.
An operand whose last two axes are row-major reads as its own transpose in
column-major terms (op N); one whose last two axes are column-major (the
.T view of a row-major matrix) needs op T.
"""
import math

import numpy

from ..backend import BFLOAT16, import_cupy

# cudaDataType codes: CUDA_R_16F, CUDA_R_16BF, CUDA_R_32F, CUDA_R_64F
_CUDA_TYPES = {numpy.dtype(numpy.float16): 2, BFLOAT16: 14, numpy.dtype(numpy.float32): 0,
               numpy.dtype(numpy.float64): 1}


def _cublas():
    try:
        from cupy_backends.cuda.libs import cublas
    except ImportError:
        from cupy.cuda import cublas
    return cublas


def _operand(x):
    """(x itself or a contiguous copy, op, leading dimension) for the last two axes."""
    item = x.itemsize
    rows, cols = x.shape[-2:]
    row_stride, col_stride = x.strides[-2] // item, x.strides[-1] // item
    if col_stride == 1 and row_stride >= max(cols, 1):
        return x, _cublas().CUBLAS_OP_N, row_stride
    if row_stride == 1 and col_stride >= max(rows, 1):
        return x, _cublas().CUBLAS_OP_T, col_stride
    x = import_cupy().ascontiguousarray(x)
    return x, _cublas().CUBLAS_OP_N, cols


def _batch_stride(x):
    """The element stride between consecutive matrices of x (..., r, c),
    whose leading axes must flatten into one evenly strided batch axis. Axes
    of size 1 take no part: their strides are arbitrary (NumPy and CuPy call
    an array contiguous whatever they are, so a contiguous copy keeps them)."""
    batch = [(n, stride) for n, stride in zip(x.shape[:-2], x.strides[:-2]) if n != 1]
    for (_, outer), (n, inner) in zip(batch, batch[1:]):
        if outer != inner * n:
            raise ValueError(f"batched matmul: the batch axes of shape {x.shape} do not "
                             f"flatten to one strided axis")
    return (batch[-1][1] if batch else x.strides[-3]) // x.itemsize


_scalars = {}                # (value, wide) -> a NumPy scalar cuBLAS reads through a pointer


def _host_scalar(value, wide):
    key = (float(value), wide)
    if key not in _scalars:
        _scalars[key] = numpy.array(value, dtype=numpy.float64 if wide else numpy.float32)
    return _scalars[key]


_plans = {}   # (operand shapes, strides and dtypes, alpha, beta) -> _Plan


def gemm(a, b, out, alpha=1.0, beta=0.0):
    """out = alpha * a @ b + beta * out, for a (..., M, K), b (..., K, N) and
    out (..., M, N) with the same leading (batch) shape, or 2-D a, b, out.

    A training step repeats the same few dozen products, so everything but
    the pointers is worked out once per operand layout (_Plan) and kept."""
    key = (a.shape, a.strides, a.dtype, b.shape, b.strides, b.dtype,
           out.shape, out.strides, out.dtype, alpha, beta)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _Plan(a, b, out, alpha, beta)
    plan.run(a, b, out)
    return out


class _Plan:
    """One cuBLAS call's arguments other than the data pointers, and whether
    an operand must first be copied to a layout cuBLAS can read."""

    def __init__(self, a, b, out, alpha, beta):
        M, K = a.shape[-2:]
        N = b.shape[-1]
        if b.shape[-2] != K or out.shape[-2:] != (M, N) or a.shape[:-2] != b.shape[:-2] \
                or out.shape[:-2] != a.shape[:-2]:
            raise ValueError(f"gemm: shapes {a.shape} @ {b.shape} -> {out.shape} do not match")
        if out.strides[-1] != out.itemsize:
            raise ValueError("gemm: the output's rows must be contiguous")
        if a.dtype != b.dtype:
            raise ValueError(f"gemm: operand dtypes differ ({a.dtype}, {b.dtype})")
        self.cublas = cublas = _cublas()
        a_read, op_a, ld_a = _operand(a)
        b_read, op_b, ld_b = _operand(b)
        self.copy_a, self.copy_b = a_read is not a, b_read is not b
        wide = a.dtype == numpy.float64 or out.dtype == numpy.float64
        in_type, out_type = _CUDA_TYPES[a.dtype], _CUDA_TYPES[out.dtype]
        self.batched = a.ndim > 2
        self.leading = (op_b, op_a, N, M, K, _host_scalar(alpha, wide).ctypes.data)
        self.b_layout = (in_type, ld_b) + ((_batch_stride(b_read),) if self.batched else ())
        self.a_layout = (in_type, ld_a) + ((_batch_stride(a_read),) if self.batched else ())
        self.beta = _host_scalar(beta, wide).ctypes.data
        ld_out = out.strides[-2] // out.itemsize
        batch = (_batch_stride(out), math.prod(a.shape[:-2])) if self.batched else ()
        compute = cublas.CUBLAS_COMPUTE_64F if wide else cublas.CUBLAS_COMPUTE_32F
        self.out_layout = (out_type, ld_out) + batch + (compute, cublas.CUBLAS_GEMM_DEFAULT)
        self.call = cublas.gemmStridedBatchedEx if self.batched else cublas.gemmEx

    def run(self, a, b, out):
        cupy = import_cupy()
        if self.copy_a:
            a = cupy.ascontiguousarray(a)
        if self.copy_b:
            b = cupy.ascontiguousarray(b)
        handle = cupy.cuda.device.get_cublas_handle()
        self.cublas.setPointerMode(handle, self.cublas.CUBLAS_POINTER_MODE_HOST)   # alpha, beta on the host
        self.call(handle, *self.leading, b.data.ptr, *self.b_layout, a.data.ptr, *self.a_layout,
                  self.beta, out.data.ptr, *self.out_layout)
