"""Compiling and launching the raw CUDA kernels of this package.

Kernel sources are C++ with a small prelude: `load` widens a 16-bit float
(`h16`: raw 16-bit storage, converted with PTX, so no CUDA header is needed
at run time), float32 and float64 to the accumulator type ACC, and `store`
narrows it back. A build's 16-bit type is float16, or bfloat16 when the
kernel is compiled with H16_IS_BF16 defined (raw_kernel's `half`): one
kernel source serves both, and so do the tensor-core instructions of
WARP_MATRIX. Each (source, type macros) pair compiles once.
The PTX lives only in H16_CONVERSIONS and WARP_MATRIX, so the CPU emulator of
the tests (tests/cuda_emulator) can put its own versions in their place.
"""
import numpy

from ..backend import BFLOAT16, HALF_DTYPES, import_cupy

# h16 <-> float32 (round to nearest even), and pack_h16x2: two floats as the
# low and high halves of a 32-bit word. float16: one PTX instruction each way.
# bfloat16 (sm_80 and later, where it is supported): the upper half of a
# float32, so widening moves it into place, and one instruction narrows a
# pair (as two, the flash backward spills registers on sm_90).
H16_CONVERSIONS = r"""
typedef unsigned short h16;
#ifdef H16_IS_BF16
__device__ __forceinline__ float h16_to_float(h16 h) {
    float f; asm("mov.b32 %0, {0, %1};" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ h16 float_to_h16(float x) {
    h16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x)); return h;
}
__device__ __forceinline__ unsigned pack_h16x2(float low, float high) {
    unsigned r; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(high), "f"(low)); return r;
}
#else
__device__ __forceinline__ float h16_to_float(h16 h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ h16 float_to_h16(float x) {
    h16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x)); return h;
}
__device__ __forceinline__ unsigned pack_h16x2(float low, float high) {
    return (unsigned)float_to_h16(low) | ((unsigned)float_to_h16(high) << 16);
}
#endif
"""

# The warp-level matrix instructions (sm_80 and later), each in one function:
#
# mma_16816: d (16x8, float32) += a (16x16, h16, row-major) @ b (16x8, h16,
# column-major), one tensor-core instruction for a warp (.f16 or .bf16 operands
# as the build's h16). Lane l holds, with g = l / 4 and t = l % 4 (each 32-bit
# word two h16 of consecutive k, the lower k in the low half):
#   a[0] = A[g][2t..2t+1]    a[1] = A[g+8][2t..2t+1]
#   a[2] = A[g][2t+8..2t+9]  a[3] = A[g+8][2t+8..2t+9]
#   b[0] = B[2t..2t+1][g]    b[1] = B[2t+8..2t+9][g]
#   d[0..1] = D[g][2t..2t+1] d[2..3] = D[g+8][2t..2t+1]
# ldmatrix_x4: four 8x8 matrices of 16-bit values from shared memory; lane 8j + r gives
# the address of row r of matrix j (16 bytes, 16-byte aligned); lane l receives
# r[j] = M_j[g][2t..2t+1] (ldmatrix_x4_trans: M_j[2t][g] and M_j[2t+1][g]).
# cp_async16: 16 bytes from global to shared memory without registers, landed
# once cp_async_wait<n>() returns with at most n later committed groups pending.
# atomic_add2: dst[0] += x and dst[1] += y (dst 8-byte aligned), one vector
# reduction on sm_90 (PTX ISA 8.1: CUDA 12.1 and later), two atomics otherwise.
WARP_MATRIX = r"""
__device__ __forceinline__ unsigned shared_address(const void* p) {
    unsigned a;
    asm("{ .reg .u64 s; cvta.to.shared.u64 s, %1; cvt.u32.u64 %0, s; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void mma_16816(float* d, const unsigned* a, const unsigned* b) {
#ifdef H16_IS_BF16
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#endif
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(row)) : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(row)) : "memory");
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                 :: "r"(shared_address(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}
__device__ __forceinline__ void atomic_add2(float* dst, float x, float y) {
#if __CUDA_ARCH__ >= 900 && (__CUDACC_VER_MAJOR__ > 12 || __CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 1)
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" :: "l"(dst), "f"(x), "f"(y) : "memory");
#else
    atomicAdd(dst, x);
    atomicAdd(dst + 1, y);
#endif
}
"""

PRELUDE = r"""
#define NEG_INF (-__int_as_float(0x7f800000))
__device__ __forceinline__ float load(const h16* p) { return h16_to_float(*p); }
__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ void store(h16* p, float x) { *p = float_to_h16(x); }
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(float* p, double x) { *p = (float)x; }
__device__ __forceinline__ void store(double* p, double x) { *p = x; }
// a * b + c rounded once, spelled out where two kernels are to round alike: NVRTC
// contracts a product and a sum into one where it chooses (the emulator never does)
__device__ __forceinline__ float fused_multiply_add(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fused_multiply_add(double a, double b, double c) { return fma(a, b, c); }
// exp for statistics: the hardware exp2 in float32 (relative error about
// |x| * 1e-7), the accurate one in float64
__device__ __forceinline__ float EXP(float x) { return __expf(x); }
__device__ __forceinline__ double EXP(double x) { return exp(x); }
// the 8 h16 values of a 16-byte vector, and back
__device__ __forceinline__ void unpack8(uint4 v, float* h) {
    unsigned words[4] = {v.x, v.y, v.z, v.w};
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        h[2 * i] = h16_to_float((h16)(words[i] & 0xffffu));
        h[2 * i + 1] = h16_to_float((h16)(words[i] >> 16));
    }
}
__device__ __forceinline__ uint4 pack8(const float* h) {
    unsigned words[4];
    #pragma unroll
    for (int i = 0; i < 4; i++)
        words[i] = pack_h16x2(h[2 * i], h[2 * i + 1]);
    return uint4{words[0], words[1], words[2], words[3]};
}
// The start of a kernel whose thread owns one 16-byte vector column of `vectors`
// and walks the rows (column_grid): its column c (false past the last column) and
// the 8 values of vector c of `bias` (zeros without one), kept in registers
__device__ __forceinline__ bool vector_column(const h16* bias, int vectors, int& c, float* b) {
    c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= vectors) return false;
    if (bias) unpack8(((const uint4*)bias)[c], b);
    else for (int e = 0; e < 8; e++) b[e] = 0.0f;
    return true;
}
__device__ __forceinline__ float warp_sum(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}
__device__ __forceinline__ double warp_sum(double x) {
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}
__device__ __forceinline__ double warp_max(double x) {
    for (int offset = 16; offset > 0; offset >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}
"""


def optional(array):
    """A kernel argument for a pointer that may be null: the array, or 8 zero
    bytes when it is None (CuPy 13 does not pass None as a null pointer)."""
    return numpy.uint64(0) if array is None else array


_C_TYPES = {numpy.dtype(numpy.float16): "h16", BFLOAT16: "h16", numpy.dtype(numpy.float32): "float",
            numpy.dtype(numpy.float64): "double"}
_compiled = {}


def c_type(dtype):
    """The kernel-side type of a float16 / bfloat16 / float32 / float64 array."""
    return _C_TYPES[numpy.dtype(dtype)]


def acc_type(*dtypes):
    """double when any array is float64, else float (16-bit math runs in float32)."""
    return "double" if any(numpy.dtype(d) == numpy.float64 for d in dtypes) else "float"


def half_of(*dtypes):
    """The one 16-bit float dtype among `dtypes` (None entries allowed), or
    None when there is none: the `half` of a build whose arrays these are."""
    halves = {numpy.dtype(d) for d in dtypes if d is not None and numpy.dtype(d) in HALF_DTYPES}
    if len(halves) > 1:
        raise TypeError("a kernel's 16-bit arrays must be all float16 or all bfloat16")
    return halves.pop() if halves else None


def raw_kernel(source, name, half=None, **macros):
    """`name` from PRELUDE + `source`, compiled with `#define KEY VALUE` for each
    macro; its h16 is bfloat16 when `half` is bfloat16, else float16."""
    if half is not None and numpy.dtype(half) not in HALF_DTYPES:
        raise TypeError(f"raw_kernel: half must be float16 or bfloat16, not {numpy.dtype(half)}")
    if half is not None and numpy.dtype(half) == BFLOAT16:
        macros = dict(macros, H16_IS_BF16=1)
    key = (source, name, tuple(sorted(macros.items())))
    if key not in _compiled:
        defines = "".join(f"#define {k} {v}\n" for k, v in sorted(macros.items()))
        _compiled[key] = import_cupy().RawKernel(defines + H16_CONVERSIONS + PRELUDE + source, name)
    return _compiled[key]


_multiprocessors = {}


def multiprocessor_count():
    """Streaming multiprocessors of the current GPU (sizes persistent grids)."""
    device = import_cupy().cuda.Device()
    if device.id not in _multiprocessors:
        _multiprocessors[device.id] = device.attributes["MultiProcessorCount"]
    return _multiprocessors[device.id]


def stride_grid(n, threads=256):
    """(grid, block) for a grid-stride loop over n elements: at most 16 blocks
    per multiprocessor, each thread taking every (grid * threads)-th element."""
    return (max(1, min((n + threads - 1) // threads, 16 * multiprocessor_count())),), (threads,)


def warps_for(columns, most=256):
    """Threads of a block for `columns` columns: whole warps, at most `most`."""
    return min(most, -(-columns // 32) * 32)


def in_16_byte_vectors(columns, *arrays):
    """Whether rows of `columns` 16-bit values in `arrays` (None entries left out)
    can move as 16-byte vectors: a positive multiple of 8 columns, every array
    starting 16-byte aligned (so every row does)."""
    return (columns > 0 and columns % 8 == 0
            and all(a.data.ptr % 16 == 0 for a in arrays if a is not None))


def column_grid(columns, rows, threads=256, per_multiprocessor=16):
    """(grid, block) for kernels where thread c of the grid's x walks column c
    over every gridDim.y-th of `rows` rows (summing the column as it goes)."""
    column_blocks = -(-columns // threads)
    row_blocks = max(1, min(rows, per_multiprocessor * multiprocessor_count() // column_blocks))
    return (column_blocks, row_blocks), (threads,)


def column_backward(source, name, dout, x, dx, dbias, columns, **macros):
    """Run an activation's backward kernel `name(dout, x, dx, dbias, rows, columns)`
    of `source` on column_grid: dout has `columns` columns, dx is written, and
    with dbias (float32 or float64) dx's column sums are added into it. The
    types X_T, D_T, ACC and G_T follow x, dout and dbias. Returns dx."""
    rows = dout.size // columns
    kernel = raw_kernel(source, name, half=half_of(x.dtype, dout.dtype), X_T=c_type(x.dtype),
                        D_T=c_type(dout.dtype), ACC=acc_type(dout.dtype, x.dtype),
                        G_T=c_type(dbias.dtype) if dbias is not None else "float", **macros)
    kernel(*column_grid(columns, rows),
           (dout, x, dx, optional(dbias), numpy.int64(rows), numpy.int32(columns)))
    return dx
