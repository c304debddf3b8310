"""The CPU emulator of the CUDA kernels (tests/cuda_emulator) on small kernels
written to break a rule: it must report what a GPU would get wrong or hang on,
since the kernel tests rely on it where there is no GPU."""
import numpy as np
import pytest

import cuda_emulator
from xpmodel.cuda.compile import H16_CONVERSIONS

pytestmark = pytest.mark.skipif(cuda_emulator.compiler() is None, reason="the CUDA emulator needs g++")


def kernel(source, name):
    return cuda_emulator.RawKernel(H16_CONVERSIONS + source, name)


def test_warp_shuffles_and_block_barriers_compute_like_a_gpu():
    source = r"""
    extern "C" __global__ void block_sum(const float* x, float* out) {
        __shared__ float partial[32];
        float v = x[blockIdx.x * blockDim.x + threadIdx.x];
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
        if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
        __syncthreads();
        if (threadIdx.x == 0) {
            float total = 0;
            for (int w = 0; w < blockDim.x / 32; w++) total += partial[w];
            out[blockIdx.x] = total;
        }
    }
    """
    x = cuda_emulator.asarray(np.random.default_rng(0).standard_normal(3 * 128).astype(np.float32))
    out = cuda_emulator.zeros(3, np.float32)
    kernel(source, "block_sum")((3,), (128,), (x, out))
    assert np.allclose(out.get(), x.get().reshape(3, 128).sum(axis=1), rtol=1e-5)


def test_a_barrier_some_threads_never_reach_is_a_deadlock():
    source = r"""
    extern "C" __global__ void early_exit(float* x) {
        if (threadIdx.x == 5) return;
        __syncthreads();
        x[threadIdx.x] = 1;
    }
    """
    with pytest.raises(RuntimeError, match="deadlock: __syncthreads"):
        kernel(source, "early_exit")((1,), (64,), (cuda_emulator.zeros(64, np.float32),))


def test_a_shuffle_half_a_warp_skips_is_a_deadlock():
    source = r"""
    extern "C" __global__ void half_warp(float* x) {
        float v = x[threadIdx.x];
        if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
        x[threadIdx.x] = v;
    }
    """
    with pytest.raises(RuntimeError, match="deadlock: a warp shuffle"):
        kernel(source, "half_warp")((1,), (32,), (cuda_emulator.zeros(32, np.float32),))


def test_a_write_past_an_array_is_reported():
    source = r"""
    extern "C" __global__ void one_past(float* x, int n) {
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i <= n) x[i] = 0.5f;
    }
    """
    with pytest.raises(AssertionError, match="wrote outside"):
        kernel(source, "one_past")((1,), (64,), (cuda_emulator.zeros(10, np.float32), np.int32(10)))


def test_undefined_behaviour_is_reported():
    source = r"""
    extern "C" __global__ void past_a_register_array(float* x, int n) {
        float v[4] = {1, 2, 3, 4};
        float s = 0;
        for (int i = 0; i <= n; i++) s += v[i];
        x[threadIdx.x] = s;
    }
    """
    with pytest.raises(AssertionError, match="undefined behaviour"):
        kernel(source, "past_a_register_array")((1,), (32,), (cuda_emulator.zeros(32, np.float32),
                                                               np.int32(4)))


def test_arguments_must_match_the_kernel_parameters():
    source = r"""
    extern "C" __global__ void takes_an_int(float* x, int n) { if (threadIdx.x < n) x[threadIdx.x] = 1; }
    """
    x = cuda_emulator.zeros(32, np.float32)
    with pytest.raises(RuntimeError, match="argument 1 is 8 bytes, the kernel takes 4"):
        kernel(source, "takes_an_int")((1,), (32,), (x, np.int64(32)))
    with pytest.raises(TypeError, match="None as a kernel argument"):
        kernel(source, "takes_an_int")((1,), (32,), (None, np.int32(32)))


@pytest.mark.parametrize("grid,block", [((1,), (1025,)), ((1,), (32, 32, 2)), ((1,), (1, 1, 65)),
                                        ((1, 65536), (32,)), ((1, 1, 65536), (32,))])
def test_a_launch_past_a_gpus_limits_is_refused(grid, block):
    """1024 threads a block (64 along z), 65,535 blocks along y and z: a GPU
    refuses more, the emulator's loops would not."""
    source = r"""
    extern "C" __global__ void nothing(float* x) {}
    """
    with pytest.raises(RuntimeError, match="more than a GPU launches"):
        kernel(source, "nothing")(grid, block, (cuda_emulator.zeros(1, np.float32),))


def warp_matrix_kernel(source, name):
    from xpmodel.cuda.compile import PRELUDE, WARP_MATRIX
    return cuda_emulator.RawKernel(H16_CONVERSIONS + PRELUDE + WARP_MATRIX + source, name)


def test_an_async_copy_read_before_its_wait_sees_neither_old_nor_new_bytes():
    source = r"""
    extern "C" __global__ void early_read(const float* src, float* before, float* after) {
        __shared__ __align__(16) float tile[4];
        if (threadIdx.x == 0) {
            for (int i = 0; i < 4; i++) tile[i] = -1.0f;
            cp_async16(tile, src);
            cp_async_commit();
            for (int i = 0; i < 4; i++) before[i] = tile[i];
            cp_async_wait<0>();
            for (int i = 0; i < 4; i++) after[i] = tile[i];
        }
    }
    """
    src = cuda_emulator.asarray(np.arange(1, 5, dtype=np.float32))
    before, after = cuda_emulator.zeros(4, np.float32), cuda_emulator.zeros(4, np.float32)
    warp_matrix_kernel(source, "early_read")((1,), (32,), (src, before, after))
    assert np.isnan(before.get()).all() and (after.get() == src.get()).all()


def test_ldmatrix_reads_rows_the_lanes_address():
    """Lane 8j + r addresses row r of matrix j; lane l gets row l/4, columns
    2(l%4) and 2(l%4)+1 of each (transposed: column l/4, rows 2(l%4) and +1)."""
    source = r"""
    extern "C" __global__ void load(const h16* m, unsigned* plain, unsigned* transposed) {
        __shared__ __align__(16) h16 tiles[4 * 64];
        for (int i = threadIdx.x; i < 4 * 64; i += 32) tiles[i] = m[i];
        __syncthreads();
        int lane = threadIdx.x;
        const h16* row = tiles + (lane / 8) * 64 + (lane % 8) * 8;
        ldmatrix_x4(plain + 4 * lane, row);
        ldmatrix_x4_trans(transposed + 4 * lane, row);
    }
    """
    m = np.random.default_rng(0).standard_normal((4, 8, 8)).astype(np.float16)
    plain, transposed = cuda_emulator.zeros(128, np.uint32), cuda_emulator.zeros(128, np.uint32)
    warp_matrix_kernel(source, "load")((1,), (32,), (cuda_emulator.asarray(m.reshape(-1)), plain, transposed))
    plain = plain.get().view(np.float16).reshape(32, 4, 2)             # [lane][matrix][half]
    transposed = transposed.get().view(np.float16).reshape(32, 4, 2)
    lanes = np.arange(32)
    g, t = lanes // 4, lanes % 4
    for j in range(4):
        assert (plain[:, j, 0] == m[j, g, 2 * t]).all() and (plain[:, j, 1] == m[j, g, 2 * t + 1]).all()
        assert (transposed[:, j, 0] == m[j, 2 * t, g]).all()
        assert (transposed[:, j, 1] == m[j, 2 * t + 1, g]).all()


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_mma_follows_the_fragment_layout_in_both_16_bit_types(half):
    """mma_16816 as PTX documents m16n8k16: lane (g, t) holds A[g][2t..], A[g+8][2t..],
    A[g][2t+8..], A[g+8][2t+8..], B[2t..][g], B[2t+8..][g] and gets D[g][2t..],
    D[g+8][2t..]; the operands read as the build's 16-bit type (H16_IS_BF16)."""
    from xpmodel.backend import BFLOAT16
    dtype = BFLOAT16 if half == "bfloat16" else np.dtype(np.float16)
    source = r"""
    __device__ inline unsigned pair(const h16* p) { return (unsigned)p[0] | ((unsigned)p[1] << 16); }
    extern "C" __global__ void product(const h16* A, const h16* Bt, float* D) {
        int lane = threadIdx.x, g = lane / 4, t = lane % 4;
        unsigned a[4] = {pair(A + g * 16 + 2 * t), pair(A + (g + 8) * 16 + 2 * t),
                         pair(A + g * 16 + 2 * t + 8), pair(A + (g + 8) * 16 + 2 * t + 8)};
        unsigned b[2] = {pair(Bt + g * 16 + 2 * t), pair(Bt + g * 16 + 2 * t + 8)};
        float d[4] = {1.0f, 1.0f, 1.0f, 1.0f};
        mma_16816(d, a, b);
        D[g * 8 + 2 * t] = d[0];
        D[g * 8 + 2 * t + 1] = d[1];
        D[(g + 8) * 8 + 2 * t] = d[2];
        D[(g + 8) * 8 + 2 * t + 1] = d[3];
    }
    """
    defines = "#define H16_IS_BF16 1\n" if half == "bfloat16" else ""
    rng = np.random.default_rng(0)
    a, bt = rng.standard_normal((16, 16)).astype(dtype), rng.standard_normal((8, 16)).astype(dtype)
    d = cuda_emulator.zeros((16, 8), np.float32)
    from xpmodel.cuda.compile import PRELUDE, WARP_MATRIX
    kernel = cuda_emulator.RawKernel(defines + H16_CONVERSIONS + PRELUDE + WARP_MATRIX + source, "product")
    kernel((1,), (32,), (cuda_emulator.asarray(a), cuda_emulator.asarray(bt), d))
    want = 1.0 + a.astype(np.float64) @ bt.astype(np.float64).T
    np.testing.assert_allclose(d.get(), want, rtol=1e-6, atol=1e-6)
    other = np.dtype(np.float16) if half == "bfloat16" else BFLOAT16   # the same bits as the other type
    misread = 1.0 + a.view(other).astype(np.float64) @ bt.view(other).astype(np.float64).T
    assert not np.allclose(d.get(), misread, rtol=1e-3)


def test_a_shared_array_inside_an_inline_function_is_each_kernels_own():
    """Two kernels whose inline helper declares a __shared__ array of its own size
    (as the norm kernels' row sums do, per compiled width) must not share one
    array: on a GPU each block's shared memory is its kernel's."""
    template = r"""
    __device__ __forceinline__ float* scratch() { __shared__ float values[SIZE]; return values; }
    extern "C" __global__ void where_SIZE(unsigned long long* out) {
        out[0] = (unsigned long long)scratch();
    }
    """
    addresses = []
    for size in ("2", "64"):
        out = cuda_emulator.zeros(1, np.uint64)
        kernel(template.replace("SIZE", size), f"where_{size}")((1,), (32,), (out,))
        addresses.append(int(out.get()[0]))
    assert addresses[0] != addresses[1]


def test_copies_between_host_and_device_are_recorded_as_cupy_makes_them():
    """counting_transfers sees what a CUDA stream would be fed or waited for:
    host data made a device array or set in; a device value read by get,
    float, bool or item. Numbers are kernel arguments, one element is a 0-d
    device array, and host arrays among device arrays (joined, assigned, in
    arithmetic) are refused, as in CuPy."""
    cp = cuda_emulator
    with cp.emulated_cuda(), cp.counting_transfers() as transfers:
        x = cp.asarray(np.arange(6.0))                   # copied from the host
        x.set(np.zeros(6))                               # and again
        with pytest.raises(ValueError):
            x[...] = np.ones(6)
        with pytest.raises(TypeError):
            x + np.ones(6)
        x[2] = 5.0                                       # a number: a kernel argument
        total = (x * 2.0).sum() + x[2]                   # all on the device
        assert isinstance(x[2], cp.EmulatedArray) and x[2].shape == ()
        assert float(total) == 15.0 and bool(total > 0)  # two reads
        assert x.get()[2] == 5.0                         # and a third
        with pytest.raises(TypeError):
            cp.stack([total, np.float64(1.0)])
        with pytest.raises(TypeError):
            cp.asarray([total, 1.0])
        assert cp.stack([total, x[2]]).tolist() == [15.0, 5.0]   # a fourth read
        x[np.array([0, 1])] = np.array([7.0, 8.0])      # index and values copied, as CuPy does
        assert f"{cp.take(x, np.array([1]))[0]:.1f}" == "8.0"   # the index copied; a fifth read
    assert [shape for shape, _ in transfers.to_device] == [(6,), (6,), (2,), (2,), (1,)]
    assert [shape for shape, _ in transfers.to_host] == [(), (), (6,), (2,), ()]
