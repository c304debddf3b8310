"""A stand-in for CuPy that runs xpmodel's raw CUDA kernels on the CPU.

`emulated_cuda()` makes xpmodel see this module as CuPy: arrays are NumPy
arrays of a subclass the layers take for device arrays, so they dispatch to
xpmodel.cuda, whose wrappers allocate, size grids and launch exactly as on a
GPU. Each RawKernel is compiled by g++ with emulator.h (one fiber per CUDA
thread, real block and warp barriers) in place of nvcc, and launched through
ctypes. The two cuBLAS calls of the matrix products are emulated from the
pointers, leading dimensions and strides they are given (cublas.py).

Kernels are compiled with UndefinedBehaviorSanitizer checks: an index past a
register array or a signed overflow fails the launch (a misaligned 16-byte
load is logged, then usually crashes the process). Every array this module
allocates sits between two canary regions filled with a signalling NaN of its
dtype (-2 for integers). A kernel that writes
outside an argument's bytes is reported after its launch (arithmetic on a
signalling NaN gives a quiet one, so even a value computed from a canary
changes the bytes); one that reads outside them picks up NaNs, which the
tests' comparisons catch.
"""
import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import types
import weakref
from pathlib import Path

import numpy

import xpmodel
from xpmodel.backend import BFLOAT16
from xpmodel.cuda.compile import H16_CONVERSIONS as _GPU_H16_CONVERSIONS
from xpmodel.cuda.compile import WARP_MATRIX as _GPU_WARP_MATRIX

from . import cublas

HEADER = Path(__file__).with_name("emulator.h")
CACHE = Path(tempfile.gettempdir()) / f"xpmodel-cuda-emulator-{os.getuid()}"
# Kernels are built with UndefinedBehaviorSanitizer checks (misaligned vector
# loads, indexes past a fixed-size array, null pointers, signed overflow). Its
# reports go to stderr, which each launch captures. (A misaligned 16-byte load
# is reported and then usually faults as an aligned SSE load: the test process
# dies, loudly.)
SANITIZE = ["-fsanitize=alignment,bounds,null,shift,signed-integer-overflow",
            "-fsanitize-recover=all"]
FLAGS = ["-std=c++20", "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas", *SANITIZE]
CANARY_BYTES = 256          # also the alignment of every allocation, as cudaMalloc's
MULTIPROCESSORS = 4         # small, so grids sized per multiprocessor stay quick to emulate

# h16 <-> float32 in C++, chosen by H16_IS_BF16 as on the GPU. float16:
# _Float16 converts with round-to-nearest-even, like the PTX. bfloat16: the
# upper half of a float32's bits, rounded to nearest even by integer
# arithmetic (cvt.rn.bf16.f32's rounding and ml_dtypes'); a NaN stays a NaN.
EMULATED_H16_CONVERSIONS = r"""
typedef unsigned short h16;
#ifdef H16_IS_BF16
inline float h16_to_float(h16 h) { unsigned u = (unsigned)h << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline h16 float_to_h16(float x) {
    unsigned u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (h16)((u >> 16) | 0x40u);
    return (h16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#else
inline float h16_to_float(h16 h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
inline h16 float_to_h16(float x) { _Float16 v = (_Float16)x; h16 h; std::memcpy(&h, &v, 2); return h; }
#endif
inline unsigned pack_h16x2(float low, float high) {
    return (unsigned)float_to_h16(low) | ((unsigned)float_to_h16(high) << 16);
}
"""

# The warp-level matrix instructions (see WARP_MATRIX). mma_16816 follows the
# fragment layout PTX documents for mma.m16n8k16: every lane publishes its
# fragments, a warp barrier, then each lane computes its own four results from
# the whole warp's, reading the operands as the build's h16 (.f16 or .bf16;
# either's products are exact in float32). ldmatrix moves 16-bit values
# without reading them, so it is the same for both types. ldmatrix and cp.async are in emulator.h; an asynchronous
# copy fills its destination with NaN bytes when issued and lands only when its
# thread waits for it, so a read before the wait, or a copy into a tile another
# warp still reads (warps are released from their barriers in a random order,
# so they drift apart as on a GPU), shows up as NaN.
EMULATED_WARP_MATRIX = r"""
inline void mma_16816(float* d, const unsigned* a, const unsigned* b) {
    struct Fragments { unsigned a[4], b[2]; };
    static Fragments warp_fragments[32][32];           // [warp of the block][lane]
    Fragments* mine = warp_fragments[xpemu::flat_thread() / 32];
    int lane = xpemu::lane_id(), g = lane / 4, t = lane % 4;
    std::memcpy(mine[lane].a, a, sizeof mine[lane].a);
    std::memcpy(mine[lane].b, b, sizeof mine[lane].b);
    __syncwarp();
    auto half = [](unsigned word, int k) { return h16_to_float((h16)(k % 2 ? word >> 16 : word & 0xffffu)); };
    auto A = [&](int r, int k) { return half(mine[(r % 8) * 4 + (k % 8) / 2].a[r / 8 + 2 * (k / 8)], k); };
    auto B = [&](int k, int n) { return half(mine[n * 4 + (k % 8) / 2].b[k / 8], k); };
    for (int i = 0; i < 4; i++) {
        int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float sum = 0.0f;
        for (int k = 0; k < 16; k++) sum += A(row, k) * B(k, col);
        d[i] += sum;
    }
    __syncwarp();
}
inline void ldmatrix_x4(unsigned* r, const void* row) { xpemu::ldmatrix_x4(r, row, false); }
inline void ldmatrix_x4_trans(unsigned* r, const void* row) { xpemu::ldmatrix_x4(r, row, true); }
inline void cp_async16(void* dst, const void* src) { xpemu::cp_async16(dst, src); }
inline void cp_async_commit() { xpemu::cp_async_commit(); }
template <int N> inline void cp_async_wait() { xpemu::cp_async_wait(N); }
inline void atomic_add2(float* dst, float x, float y) {
    if (reinterpret_cast<uintptr_t>(dst) % 8) xpemu::fail("atomic_add2: an address not 8-byte aligned");
    atomicAdd(dst, x);
    atomicAdd(dst + 1, y);
}
"""


def compiler():
    """The C++ compiler the emulator uses, or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


class Transfers:
    """Copies between host and device while counted (see `counting_transfers`):
    each is (direction, shape, the xpmodel line that asked for it)."""

    def __init__(self):
        self.to_device, self.to_host = [], []

    def record(self, kind, shape):
        caller = next((f"{os.path.relpath(frame.filename, _PACKAGE)}:{frame.lineno}"
                       for frame in reversed(traceback.extract_stack()[:-2])
                       if frame.filename.startswith(_PACKAGE + os.sep)), "?")
        getattr(self, kind).append((tuple(shape), caller))


_PACKAGE = os.path.dirname(os.path.abspath(xpmodel.__file__))   # the lines Transfers names


_counting = []   # the Transfers being recorded, if any


@contextlib.contextmanager
def counting_transfers():
    """Record the copies from the host that CuPy makes (asarray, array or set
    of host data; a host array of indices) and the reads of device values on
    the host (get, float, int, bool, item, tolist, format): what a CUDA
    stream would be fed, or waited for, by the host."""
    transfers = Transfers()
    _counting.append(transfers)
    try:
        yield transfers
    finally:
        _counting.remove(transfers)


def _record(kind, shape):
    for transfers in _counting:
        transfers.record(kind, shape)


def _index_parts(key):
    return key if isinstance(key, tuple) else (key,)


def _basic_index(key):
    """Whether `key` takes a view (ints, slices, Ellipsis, None), not index arrays."""
    return all(part is None or part is Ellipsis or isinstance(part, (int, numpy.integer, slice))
               for part in _index_parts(key))


def _record_host_indices(key):
    for part in _index_parts(key):
        if isinstance(part, list) or (isinstance(part, numpy.ndarray)
                                      and not isinstance(part, EmulatedArray)):
            _record("to_device", numpy.shape(part))


def _read_on_host(method):
    """An ndarray method that hands a device value to the host, recorded."""
    def read(self, *args, **kwargs):
        _record("to_host", self.shape)
        return getattr(numpy.ndarray, method)(self.view(numpy.ndarray), *args, **kwargs)
    read.__name__ = method
    return read


class EmulatedArray(numpy.ndarray):
    """A NumPy array that xpmodel takes for a device array."""

    __float__, __int__, __bool__, __index__, __format__ = (
        _read_on_host(name) for name in ("__float__", "__int__", "__bool__", "__index__",
                                         "__format__"))
    item, tolist = _read_on_host("item"), _read_on_host("tolist")

    def __getitem__(self, key):
        """A view, or for one element a 0-d device array, as CuPy gives (NumPy gives a host
        scalar); host index arrays are copied to the device first, as CuPy copies them."""
        _record_host_indices(key)
        return _on_device(numpy.ndarray.__getitem__(self, key))

    def __setitem__(self, key, value):
        """On the device, as CuPy assigns a device array (NumPy would read a 0-d one as a
        number); a number is a kernel argument. Through basic indexes (ints, slices) a
        host array or list is refused, as CuPy's fill refuses it (set, or asarray, copies
        one from the host); through index arrays CuPy copies it, and so do host indexes."""
        host_value = isinstance(value, (list, tuple)) or (
            isinstance(value, numpy.ndarray) and value.ndim and not isinstance(value, EmulatedArray))
        if host_value and _basic_index(key):
            raise ValueError("a host array assigned into a device array: CuPy cannot fill with "
                             "it (use .set, or asarray first)")
        if host_value:
            _record("to_device", numpy.shape(value))
        _record_host_indices(key)
        plain = [x.view(numpy.ndarray) if isinstance(x, EmulatedArray) else x for x in (key, value)]
        numpy.ndarray.__setitem__(self.view(numpy.ndarray), *plain)

    def get(self):
        _record("to_host", self.shape)
        return numpy.array(self, copy=True).view(numpy.ndarray)

    def set(self, host):
        """Copy a host array of the same shape and dtype in, as cupy.ndarray.set does."""
        host = numpy.asarray(host)
        _record("to_device", host.shape)
        if host.shape != self.shape or host.dtype != self.dtype:
            raise ValueError(f"set: {host.shape} {host.dtype} into {self.shape} {self.dtype}")
        self.view(numpy.ndarray)[...] = host

    @property
    def data(self):
        """The device pointer, as cupy.ndarray.data.ptr gives it."""
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        """NumPy's ufuncs, without the warnings about NaN or overflow that CuPy never gives;
        a host array among the operands is refused, as CuPy's ufuncs refuse it."""
        _refuse_host_arrays(f"{ufunc.__name__}.{method}", (*inputs, *(kwargs.get("out") or ())))
        plain = [x.view(numpy.ndarray) if isinstance(x, EmulatedArray) else x for x in inputs]
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(x.view(numpy.ndarray) if isinstance(x, EmulatedArray) else x
                                  for x in out)
        with numpy.errstate(all="ignore"):
            result = getattr(ufunc, method)(*plain, **kwargs)
        if out is not None:   # in place: the caller's arrays themselves, as NumPy returns them
            return out[0] if len(out) == 1 else out
        if isinstance(result, tuple):
            return tuple(_on_device(r) for r in result)
        return _on_device(result)

    @property
    def device(self):
        return types.SimpleNamespace(id=0)


_allocations = []   # (weakref to a padded byte buffer, canary start, data start, data end,
                    #  canary bytes before, canary bytes after)
_SIGNALLING_NAN = {2: numpy.uint16(0x7C01), 4: numpy.uint32(0x7F800001),
                   8: numpy.uint64(0x7FF0000000000001)}
_BFLOAT16_SIGNALLING_NAN = numpy.uint16(0x7F81)


def _canary(dtype):
    """One element's bytes of the canary for dtype."""
    if dtype == BFLOAT16:
        return _BFLOAT16_SIGNALLING_NAN.tobytes()
    if dtype.kind == "f":
        return _SIGNALLING_NAN[dtype.itemsize].tobytes()
    return numpy.array(-2 if dtype.kind == "i" else 0, dtype=dtype).tobytes()


def _allocate(shape, dtype):
    dtype = numpy.dtype(dtype)
    shape = tuple(shape) if numpy.iterable(shape) else (int(shape),)
    nbytes = int(numpy.prod(shape, dtype=numpy.int64)) * dtype.itemsize
    padded = numpy.empty(nbytes + 3 * CANARY_BYTES, dtype=numpy.uint8)
    start = CANARY_BYTES - padded.ctypes.data % CANARY_BYTES + CANARY_BYTES
    end = start + nbytes
    # whole canary elements on both sides, lined up with the data's elements
    pattern = numpy.frombuffer(_canary(dtype), dtype=numpy.uint8)
    before = numpy.tile(pattern, start // dtype.itemsize)
    after = numpy.tile(pattern, (padded.size - end) // dtype.itemsize)
    padded[start - before.size:start], padded[end:end + after.size] = before, after
    array = padded[start:end].view(dtype).reshape(shape).view(EmulatedArray)
    _allocations.append((weakref.ref(padded), start - before.size, start, end, before, after))
    return array


def _check_canaries(kernel_name):
    live = []
    for entry in _allocations:
        ref, first, start, end, before, after = entry
        padded = ref()
        if padded is None:
            continue
        live.append(entry)
        if (padded[first:start] != before).any() or (padded[end:end + after.size] != after).any():
            raise AssertionError(f"kernel {kernel_name} wrote outside an array's bytes")
    _allocations[:] = live


def empty(shape, dtype=numpy.float64):
    return _allocate(shape, dtype)


def zeros(shape, dtype=numpy.float64):
    out = _allocate(shape, dtype)
    out[...] = 0
    return out


def ones(shape, dtype=numpy.float64):
    out = _allocate(shape, dtype)
    out[...] = 1
    return out


def empty_like(a, dtype=None):
    return _allocate(a.shape, dtype or a.dtype)


def zeros_like(a, dtype=None):
    return zeros(a.shape, dtype or a.dtype)


def _refuse_host_arrays(what, arguments, any_rank=True):
    """TypeError where a host NumPy array (of any rank, or unless 0-d) is among
    `arguments`, which CuPy takes only as device arrays."""
    for x in arguments:
        if (isinstance(x, numpy.ndarray) and not isinstance(x, EmulatedArray)
                and (any_rank or x.ndim)):
            raise TypeError(f"{what}: a host array of shape {x.shape} among device arrays "
                            f"(CuPy refuses it)")


def _on_device(result):
    """A NumPy result computed from device arrays, as the device array CuPy
    returns (a reduction or a 0-d operation gives a 0-d array, not a scalar)."""
    if isinstance(result, EmulatedArray) or not isinstance(result, (numpy.ndarray, numpy.generic)):
        return result
    out = _allocate(numpy.shape(result), result.dtype)
    out.view(numpy.ndarray)[...] = result
    return out


def asarray(a, dtype=None):
    """A fresh device copy, as cupy.asarray of a host array makes (a device array
    of the right dtype is returned as it is; of another, converted on the device;
    a list of device arrays is stacked on the device, and one that mixes device
    arrays and host values is refused, as CuPy refuses it)."""
    if isinstance(a, EmulatedArray):
        return a if dtype is None or a.dtype == dtype else _on_device(a.view(numpy.ndarray).astype(dtype))
    on_device = [isinstance(x, EmulatedArray) for x in a] if isinstance(a, (list, tuple)) else [False]
    if any(on_device) and not all(on_device):
        raise TypeError("a sequence of device arrays and host values (CuPy cannot convert it)")
    if not any(on_device):
        _record("to_device", numpy.shape(a))
    return _on_device(numpy.asarray(a, dtype=dtype))


def array(a, dtype=None, copy=True):
    """cupy.array: a device array (or a list of them) copied on the device, anything
    else copied from the host."""
    if isinstance(a, EmulatedArray):
        return _on_device(numpy.array(a.view(numpy.ndarray), dtype=dtype, copy=copy))
    if isinstance(a, (list, tuple)):
        return asarray(a, dtype=dtype).copy()
    return asarray(numpy.array(a, dtype=dtype, copy=copy))


def _device_arrays_only(function):
    """stack and concatenate as CuPy's: device arrays only."""
    def joined(arrays, *args, **kwargs):
        arrays = list(arrays)
        if not all(isinstance(x, EmulatedArray) for x in arrays):
            raise TypeError(f"{function.__name__}: only device arrays can be joined, as in CuPy")
        return _on_device(function([x.view(numpy.ndarray) for x in arrays], *args, **kwargs))
    joined.__name__ = function.__name__
    return joined


stack, concatenate = _device_arrays_only(numpy.stack), _device_arrays_only(numpy.concatenate)


def ascontiguousarray(a, dtype=None):
    if isinstance(a, EmulatedArray):
        if a.flags.c_contiguous and (dtype is None or a.dtype == dtype):
            return a
        return _on_device(numpy.ascontiguousarray(a.view(numpy.ndarray), dtype=dtype))
    return asarray(numpy.ascontiguousarray(a, dtype=dtype))


_SCALAR_TYPES = {numpy.dtype(t): c for t, c in [
    (numpy.int32, ctypes.c_int32), (numpy.int64, ctypes.c_int64), (numpy.uint32, ctypes.c_uint32),
    (numpy.uint64, ctypes.c_uint64), (numpy.float32, ctypes.c_float), (numpy.float64, ctypes.c_double)]}


def _argument(value):
    """The ctypes object a kernel argument is passed as, CuPy's way."""
    if value is None:   # CuPy 13 passes no null pointer for None: xpmodel must not send one
        raise TypeError("None as a kernel argument (pass xpmodel.cuda.compile.optional(None))")
    if isinstance(value, numpy.ndarray):
        if not isinstance(value, EmulatedArray):
            raise TypeError("a host NumPy array passed to a kernel (CuPy would refuse it)")
        return ctypes.c_void_p(value.ctypes.data)
    if isinstance(value, numpy.generic):
        return _SCALAR_TYPES[value.dtype](value.item())
    if isinstance(value, float):
        return ctypes.c_double(value)
    raise TypeError(f"kernel argument of type {type(value).__name__}: pass a NumPy scalar type")


def _build(code, name):
    """Compile `code` with a launcher for kernel `name`; the loaded library."""
    source = "\n".join([
        HEADER.read_text(), code,
        f'extern "C" int xpemu_launch(const unsigned* grid, const unsigned* block, void** args,'
        f' const int* sizes, int n_args, char* message, int message_size) {{'
        f' return xpemu::launch(&{name}, grid, block, args, sizes, n_args, message, message_size); }}'])
    digest = hashlib.sha256((source + " ".join(FLAGS)).encode()).hexdigest()[:24]
    CACHE.mkdir(exist_ok=True)
    library = CACHE / f"{name}-{digest}.so"
    if not library.exists():
        source_path = CACHE / f"{name}-{digest}-{os.getpid()}.cpp"
        source_path.write_text(source)
        partial = CACHE / f"{name}-{digest}-{os.getpid()}.so"
        result = subprocess.run(
            [compiler(), *FLAGS, "-o", str(partial), str(source_path)],
            capture_output=True, text=True)
        source_path.unlink()
        if result.returncode != 0:
            raise RuntimeError(f"kernel {name} does not compile:\n{result.stderr[-4000:]}")
        partial.replace(library)
    return ctypes.CDLL(str(library))


built = []   # (name, GPU source) of every RawKernel made, for the NVRTC compile test
launched = []   # (name, GPU source, block) of every launch, for the NVRTC resource test


class RawKernel:
    """cupy.RawKernel's interface: compiled on first launch, launched on the CPU."""

    def __init__(self, code, name):
        if _GPU_H16_CONVERSIONS not in code:
            raise ValueError(f"kernel {name}: source without xpmodel's 16-bit float conversions")
        built.append((name, code))
        self.gpu_code = code
        self.code = (code.replace(_GPU_H16_CONVERSIONS, EMULATED_H16_CONVERSIONS)
                     .replace(_GPU_WARP_MATRIX, EMULATED_WARP_MATRIX))
        self.name = name
        self._launch = None

    def __call__(self, grid, block, args, shared_mem=0):
        if shared_mem:
            raise NotImplementedError("dynamic shared memory is not emulated")
        _check_launch_limits(self.name, _dims(grid), _dims(block))
        launched.append((self.name, self.gpu_code, tuple(_dims(block))))
        if self._launch is None:
            self._launch = _build(self.code, self.name).xpemu_launch
        values = [_argument(a) for a in args]
        n = len(values)
        pointers = (ctypes.c_void_p * max(n, 1))(*[ctypes.addressof(v) for v in values])
        sizes = (ctypes.c_int * max(n, 1))(*[ctypes.sizeof(v) for v in values])
        message = ctypes.create_string_buffer(512)
        status, reports = _capturing_stderr(
            lambda: self._launch(_dims(grid), _dims(block), pointers, sizes, n, message, 512))
        if status:
            raise RuntimeError(f"kernel {self.name}: {message.value.decode()}")
        if "runtime error:" in reports:
            raise AssertionError(f"kernel {self.name}: undefined behaviour\n{reports[:2000]}")
        _check_canaries(self.name)


def _capturing_stderr(call):
    """(call(), what was written to file descriptor 2 meanwhile)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            result = call()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        return result, capture.read().decode(errors="replace")


def _check_launch_limits(name, grid, block):
    """The launch limits of every GPU since sm_30, which a GPU enforces and
    the emulator's loops would not: 1024 threads a block (1024, 1024, 64 along
    x, y, z), 2^31 - 1 blocks along x and 65,535 along y and z."""
    if block[0] * block[1] * block[2] > 1024 or block[0] > 1024 or block[1] > 1024 or block[2] > 64:
        raise RuntimeError(f"kernel {name}: block {tuple(block)} is more than a GPU launches")
    if grid[0] > 2 ** 31 - 1 or grid[1] > 65535 or grid[2] > 65535:
        raise RuntimeError(f"kernel {name}: grid {tuple(grid)} is more than a GPU launches")


def _dims(dims):
    """Three launch dimensions; CuPy launches at least one block along each."""
    dims = tuple(max(1, int(d)) for d in dims) + (1,) * (3 - len(dims))
    return (ctypes.c_uint * 3)(*dims)


_C_NAMES = {"float32": "float", "float64": "double", "int32": "int", "int64": "long long",
            "bool": "bool"}


class ElementwiseKernel:
    """cupy.ElementwiseKernel's interface for same-shape arguments: the
    operation runs once per index i, each non-raw argument bound to its
    element (outputs by reference), raw ones as pointers, scalars by value."""

    def __init__(self, in_params, out_params, operation, name):
        self.params = [self._parse(p, output=False) for p in in_params.split(",")]
        self.params += [self._parse(p, output=True) for p in out_params.split(",")]
        self.operation, self.name = operation, name
        self._kernels = {}

    @staticmethod
    def _parse(text, output):
        words = text.split()
        raw = words[0] == "raw"
        type_name, name = words[-2], words[-1]
        return types.SimpleNamespace(raw=raw, type=type_name, name=name, output=output)

    def __call__(self, *args):
        generic = {numpy.dtype(a.dtype).name for a, p in zip(args, self.params)
                   if p.type == "T" and isinstance(a, numpy.ndarray)}
        if len(generic) != 1 or generic.pop() not in _C_NAMES:
            raise NotImplementedError(f"{self.name}: T must be one float32 / float64 dtype")
        t_name = next(a.dtype.name for a, p in zip(args, self.params) if p.type == "T")
        arrays = [a for a, p in zip(args, self.params) if isinstance(a, numpy.ndarray) and not p.raw]
        n = arrays[0].size
        if any(a.size != n for a in arrays):
            raise NotImplementedError(f"{self.name}: broadcasting is not emulated")
        if t_name not in self._kernels:
            self._kernels[t_name] = RawKernel(self._source(t_name), self.name)
        values = []
        for a, p in zip(args, self.params):
            if isinstance(a, numpy.ndarray) or p.raw:
                values.append(a)
            else:   # a scalar parameter: its declared type
                values.append(numpy.dtype(t_name if p.type == "T" else p.type).type(a))
        self._kernels[t_name]((1,), (1,), tuple(values) + (numpy.int64(n),))

    def _source(self, t_name):
        c = {p.name: _C_NAMES[t_name if p.type == "T" else p.type] for p in self.params}
        signature, binds = [], []
        for p in self.params:
            if p.raw:
                signature.append(f"{c[p.name]}* {p.name}")
            elif p.output or p.type == "T":
                signature.append(f"{c[p.name]}* _{p.name}")
                binds.append(f"{c[p.name]}& {p.name} = _{p.name}[i];" if p.output
                             else f"const {c[p.name]} {p.name} = _{p.name}[i];")
            else:
                signature.append(f"{c[p.name]} {p.name}")
        return (_GPU_H16_CONVERSIONS + f"typedef {_C_NAMES[t_name]} T;\n"
                f'extern "C" __global__ void {self.name}({", ".join(signature)}, long long _n) {{\n'
                f"    for (long long i = 0; i < _n; i++) {{ {' '.join(binds)}\n{self.operation}\n    }}\n}}\n")


class _Device:
    attributes = {"MultiProcessorCount": MULTIPROCESSORS}
    compute_capability = "90"   # the emulated warp-level matrix instructions are sm_80's

    def __init__(self, index=0):
        self.id = index

    def use(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class OutOfMemoryError(MemoryError):
    pass


class _Event:
    """cupy.cuda.Event: the host's clock when recorded (work here is done when launched)."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.time, self.done = None, True

    def record(self, stream=None):
        self.time = time.perf_counter()

    def synchronize(self):
        pass


cuda = types.SimpleNamespace(
    Device=_Device,
    Event=_Event,
    get_elapsed_time=lambda start, stop: 1e3 * (stop.time - start.time),
    device=types.SimpleNamespace(get_cublas_handle=lambda: 1),
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1,
                                  getDeviceProperties=lambda index: {"name": b"CPU emulator"}),
    get_current_stream=lambda: types.SimpleNamespace(synchronize=lambda: None, ptr=0),
    memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError))


class _Generator:
    """cupy.random.default_rng's draws, made by NumPy, as device arrays."""

    def __init__(self, seed):
        self._rng = numpy.random.default_rng(seed)

    def __getattr__(self, name):
        draw = getattr(self._rng, name)   # drawn on the device, as CuPy's are: no copy
        return lambda *args, **kwargs: _on_device(draw(*args, **kwargs))


random = types.SimpleNamespace(default_rng=_Generator)
ndarray = EmulatedArray


def __getattr__(name):
    """Anything else is NumPy's; its functions return device arrays."""
    attribute = getattr(numpy, name)
    if not callable(attribute) or isinstance(attribute, (type, numpy.ufunc)):
        return attribute

    def on_device(*args, **kwargs):
        arguments = (*args, *kwargs.values())
        if name not in _CONVERTING:
            _refuse_host_arrays(name, arguments, any_rank=False)
        for x in arguments:   # copied to the device by the function, as CuPy's copies them
            if isinstance(x, numpy.ndarray) and not isinstance(x, EmulatedArray) and x.ndim:
                _record("to_device", x.shape)
        return _on_device(attribute(*args, **kwargs))
    return on_device


# CuPy functions that copy a host array argument to the device themselves
_CONVERTING = {"take", "copyto", "full", "full_like"}


@contextlib.contextmanager
def emulated_cuda():
    """xpmodel's CUDA path on this module, with fresh kernel and device caches."""
    from xpmodel import backend
    from xpmodel.cuda import compile as kernels, gemm
    from xpmodel.layers import matmul
    saved = [(backend, "_cupy", backend._cupy), (kernels, "_compiled", kernels._compiled),
             (kernels, "_multiprocessors", kernels._multiprocessors), (matmul, "_filled_arrays", matmul._filled_arrays),
             (gemm, "_cublas", gemm._cublas), (gemm, "_plans", gemm._plans)]
    from xpmodel.cuda import adamw, flash
    saved += [(adamw, "_kernel", adamw._kernel), (flash, "_compute_capability", flash._compute_capability)]
    backend._cupy = sys.modules[__name__]
    kernels._compiled, kernels._multiprocessors, matmul._filled_arrays, adamw._kernel = {}, {}, {}, None
    flash._compute_capability = {}
    gemm._cublas, gemm._plans = (lambda: cublas), {}
    try:
        yield sys.modules[__name__]
    finally:
        for module, attribute, value in saved:
            setattr(module, attribute, value)


def emulated_cuda_or_skip():
    """emulated_cuda(), or a pytest skip where g++ is missing."""
    import pytest
    if compiler() is None:
        pytest.skip("the CUDA emulator needs g++")
    return emulated_cuda()
