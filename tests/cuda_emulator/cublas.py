"""The two cuBLAS calls xpmodel.cuda.gemm makes, computed by NumPy from the raw
pointers, leading dimensions and strides it passes, with cuBLAS's
column-major meaning: so the emulator tests the wrapper's arithmetic (which
operand is transposed, the leading dimensions, the batch strides) rather
than standing in for it. An operand described wrongly reads the canaries
around it (NaN) or writes into them (reported after the call)."""
import ctypes

import numpy

from xpmodel.backend import BFLOAT16

CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_64F = 68, 70
CUBLAS_POINTER_MODE_HOST = 0
CUBLAS_GEMM_DEFAULT = -1
CUDA_R_16F, CUDA_R_16BF, CUDA_R_32F, CUDA_R_64F = 2, 14, 0, 1
_DTYPES = {CUDA_R_16F: numpy.float16, CUDA_R_16BF: BFLOAT16, CUDA_R_32F: numpy.float32,
           CUDA_R_64F: numpy.float64}


def setPointerMode(handle, mode):
    if mode != CUBLAS_POINTER_MODE_HOST:
        raise NotImplementedError("only host pointer mode is emulated")


def _matrix(pointer, cuda_type, rows, cols, ld, batch=1, batch_stride=0):
    """The (batch, rows, cols) column-major matrices at `pointer`, as a NumPy view."""
    dtype = numpy.dtype(_DTYPES[cuda_type])
    if ld < max(rows, 1):
        raise ValueError(f"leading dimension {ld} < rows {rows}")
    extent = (batch - 1) * batch_stride + (cols - 1) * ld + rows
    buffer = (ctypes.c_char * (extent * dtype.itemsize)).from_address(pointer)
    item = dtype.itemsize
    return numpy.ndarray((batch, rows, cols), dtype, buffer=buffer,
                         strides=(batch_stride * item, item, ld * item))


def _scalar(pointer, wide):
    return (ctypes.c_double if wide else ctypes.c_float).from_address(pointer).value


# (A and B type, C type, compute type) combinations cuBLAS's GemmEx calls accept
# among the float16 / bfloat16 / float32 / float64 ones (a 16-bit output keeps
# its operands' type: no float16 x float16 -> bfloat16)
_SUPPORTED = {(CUDA_R_16F, CUDA_R_16F, CUBLAS_COMPUTE_32F), (CUDA_R_16F, CUDA_R_32F, CUBLAS_COMPUTE_32F),
              (CUDA_R_16BF, CUDA_R_16BF, CUBLAS_COMPUTE_32F),
              (CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F),
              (CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F), (CUDA_R_64F, CUDA_R_64F, CUBLAS_COMPUTE_64F)}


def _product(transa, transb, m, n, k, alpha, A, a_type, lda, stride_a, B, b_type, ldb, stride_b,
             beta, C, c_type, ldc, stride_c, batch, compute):
    if a_type != b_type or (a_type, c_type, compute) not in _SUPPORTED:
        raise ValueError(f"cuBLAS does not support types A {a_type}, B {b_type}, C {c_type} "
                         f"with compute type {compute}")
    wide = compute == CUBLAS_COMPUTE_64F
    op_a = _matrix(A, a_type, *((m, k) if transa == CUBLAS_OP_N else (k, m)), lda, batch, stride_a)
    op_b = _matrix(B, b_type, *((k, n) if transb == CUBLAS_OP_N else (n, k)), ldb, batch, stride_b)
    if transa == CUBLAS_OP_T:
        op_a = op_a.swapaxes(1, 2)
    if transb == CUBLAS_OP_T:
        op_b = op_b.swapaxes(1, 2)
    c = _matrix(C, c_type, m, n, ldc, batch, stride_c)
    acc = numpy.float64 if wide else numpy.float32
    product = _scalar(alpha, wide) * numpy.matmul(op_a.astype(acc), op_b.astype(acc))
    b = _scalar(beta, wide)
    if b != 0:   # beta = 0 never reads C, which may hold anything
        product += b * c.astype(acc)
    c[...] = product


def gemmEx(handle, transa, transb, m, n, k, alpha, A, a_type, lda, B, b_type, ldb, beta, C, c_type,
           ldc, compute, algo):
    _product(transa, transb, m, n, k, alpha, A, a_type, lda, 0, B, b_type, ldb, 0,
             beta, C, c_type, ldc, 0, 1, compute)


def gemmStridedBatchedEx(handle, transa, transb, m, n, k, alpha, A, a_type, lda, stride_a,
                         B, b_type, ldb, stride_b, beta, C, c_type, ldc, stride_c, batch,
                         compute, algo):
    _product(transa, transb, m, n, k, alpha, A, a_type, lda, stride_a, B, b_type, ldb, stride_b,
             beta, C, c_type, ldc, stride_c, batch, compute)
