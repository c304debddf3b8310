"""The array backend: turns a device string into an array module `xp`.

NumPy serves `cpu`; CuPy serves `cuda` / `cuda:N`. CuPy is imported here and
nowhere else, lazily, so xpmodel installs and runs without it. Layer code asks
`array_module(x)` for the module that owns an array and does all its math
through it.

On CuPy a layer can run two ways, chosen by `use_kernels`: "fused" (the
default) hands its hot spots to the kernels of xpmodel/cuda; "xp" runs the
layer's own `xp` expressions, the code NumPy runs, with cuBLAS only through
the shared `matmul` helper. Layers ask `fused_kernels(x)`; NumPy arrays
always take the `xp` code.
"""
import contextlib
import contextvars
from dataclasses import dataclass

import ml_dtypes
import numpy

from .checks import POSITIVE, check_number

# bfloat16 (8 exponent bits like float32, 8 significand bits) as NumPy and
# CuPy 14 both read it, through ml_dtypes
BFLOAT16 = numpy.dtype(ml_dtypes.bfloat16)
# the 16-bit float dtypes activations may take (train.precision fp16 / bf16)
HALF_DTYPES = (numpy.dtype(numpy.float16), BFLOAT16)

_cupy = None          # the cupy module once imported
_cupy_error = None    # why it could not be imported


def import_cupy():
    """The cupy module, imported once; None where it cannot be imported (the
    reason is kept for the error that asks for a GPU)."""
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        try:
            import cupy
            _cupy = cupy
        except Exception as exc:  # ImportError, or a broken CUDA install
            _cupy_error = exc
    return _cupy


def cuda_available():
    """True when CuPy imports and sees at least one GPU."""
    cupy = import_cupy()
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


class DeviceError(RuntimeError):
    """A device was asked for that this machine cannot provide."""


@dataclass(frozen=True)
class Device:
    """A resolved device: its array module and, for CUDA, the GPU index."""
    kind: str   # "cpu" or "cuda"
    index: int  # GPU ordinal; 0 on CPU

    @property
    def xp(self):
        return numpy if self.kind == "cpu" else _cupy

    @property
    def is_cuda(self):
        return self.kind == "cuda"

    def __str__(self):
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    def activate(self):
        """Make this device current for the allocations that follow."""
        if self.is_cuda:
            _cupy.cuda.Device(self.index).use()


_INSTALL_HINT = ("install CuPy for your CUDA version: pip install 'xpmodel[cuda12]' "
                 "or 'xpmodel[cuda13]'")


def get_device(spec="cpu"):
    """Resolve `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when usable, else CPU)."""
    if isinstance(spec, Device):
        return spec
    text = str(spec).strip().lower()
    if text == "auto":
        return get_device("cuda") if cuda_available() else Device("cpu", 0)
    if text == "cpu":
        return Device("cpu", 0)
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text[5:] if text.startswith("cuda:") else "0"
        if not index_text.isdigit():
            raise DeviceError(f"bad device {spec!r}: expected cpu, cuda, cuda:N or auto")
        index = int(index_text)
        if import_cupy() is None:
            raise DeviceError(f"device {spec!r} needs CuPy, which is not importable "
                              f"({_cupy_error.__class__.__name__}): {_INSTALL_HINT}")
        try:
            count = _cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:
            raise DeviceError(f"device {spec!r}: CuPy sees no usable GPU ({exc})") from None
        if count == 0:
            raise DeviceError(f"device {spec!r}: no GPU found")
        if index >= count:
            raise DeviceError(f"device {spec!r}: only {count} GPU(s) present")
        return Device("cuda", index)
    raise DeviceError(f"bad device {spec!r}: expected cpu, cuda, cuda:N or auto")


def array_module(array):
    """The module (numpy or cupy) that owns `array`."""
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy
    return numpy


def is_cuda_array(array):
    return _cupy is not None and isinstance(array, _cupy.ndarray)


KERNELS = ("fused", "xp")
_kernels = contextvars.ContextVar("xpmodel_kernels", default="fused")


def check_kernels(mode):
    """`mode` when it is one of KERNELS; ValueError naming them otherwise."""
    if mode not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {mode!r}")
    return mode


@contextlib.contextmanager
def use_kernels(mode):
    """Inside the block, layers given CuPy arrays run `mode`: "fused" (the
    kernels of xpmodel/cuda) or "xp" (their own `xp` expressions).
    The mode belongs to the current thread (a context variable)."""
    token = _kernels.set(check_kernels(mode))
    try:
        yield
    finally:
        _kernels.reset(token)


def fused_mode():
    """Whether the "fused" mode is in force on this thread (use_kernels)."""
    return _kernels.get() == "fused"


def fused_kernels(array):
    """Whether a layer handed `array` takes its fused CUDA kernel: a CuPy
    array, with the "fused" mode in force."""
    return is_cuda_array(array) and fused_mode()


def to_host(array):
    """A NumPy copy (or the array itself when already on the host)."""
    if is_cuda_array(array):
        return array.get()
    return numpy.asarray(array)


def check_scale(scale):
    """A gradient scale (loss scaling, accumulation): a Python float from a
    finite positive number; a 0-d float array on the GPU is passed through
    unread, so that a step need not wait for it."""
    if is_cuda_array(scale) and scale.shape == () and scale.dtype.kind == "f":
        return scale
    return check_number("scale", scale, POSITIVE)


def check_real_values(name, array, dtype, non_negative=False):
    """ValueError naming `name` unless `array` (host or device) holds real
    numbers that stay finite cast to `dtype` (and, with non_negative, none
    below zero): what may be copied into weights or optimizer state."""
    kind = getattr(array, "dtype", None)
    if kind is None or not (kind.kind in "fiu" or kind == BFLOAT16):
        raise ValueError(f"{name} must be an array of real numbers, got "
                         f"{kind if kind is not None else type(array).__name__}")
    xp = array_module(array)
    with numpy.errstate(over="ignore", invalid="ignore"):
        cast = array.astype(dtype, copy=False)
        if not bool(xp.isfinite(cast).all()):
            raise ValueError(f"{name} holds values that are not finite as {numpy.dtype(dtype)} "
                             f"(NaN, infinity, or past its range)")
        if non_negative and bool((cast < 0).any()):
            raise ValueError(f"{name} holds negative values")


def device_scalar(xp, value, dtype=numpy.float64):
    """`value`, a host number (or 0-d NumPy array) or a 0-d array of `xp`, as a
    0-d array of `xp` and `dtype`. On a GPU it is made there: a host number is
    filled in by a kernel that takes it as an argument, not copied from host memory."""
    if not isinstance(value, xp.ndarray):
        return xp.full((), value, dtype=dtype)
    return value.astype(dtype, copy=False)


def to_device(array, device):
    """`array` placed on `device` (no copy when it is already there)."""
    device = get_device(device)
    if device.is_cuda:
        with _cupy.cuda.Device(device.index):
            return _cupy.asarray(array)
    return to_host(array)


_DTYPES = {"float32": numpy.float32, "fp32": numpy.float32,
           "float64": numpy.float64, "fp64": numpy.float64,
           "float16": numpy.float16, "fp16": numpy.float16}


_DTYPE_CHOICES = ("expected float32 or float64 (float16 and bfloat16 train as mixed precision "
                  "over float32 weights: precision fp16 or bf16)")


def get_dtype(name):
    """A NumPy dtype from `float32`, `float64` or `float16`, or a NumPy float
    dtype or type of those or bfloat16 (the 16-bit ones for a caller to refuse
    with its own hint); ValueError for anything else (None included, which
    NumPy would read as float64)."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}: {_DTYPE_CHOICES}")
        return numpy.dtype(_DTYPES[name])
    try:
        dtype = None if name is None else numpy.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or dtype not in [numpy.dtype(d) for d in _DTYPES.values()] + [BFLOAT16]:
        raise ValueError(f"dtype {name!r}: {_DTYPE_CHOICES}")
    return dtype


def is_half(dtype):
    """Whether dtype is a 16-bit float (float16 or bfloat16)."""
    return numpy.dtype(dtype) in HALF_DTYPES


def bfloat16_problem(device):
    """Why `device` cannot compute in bfloat16, or None when it can: always can
    on CPU (NumPy through ml_dtypes); on CUDA it needs compute capability 8.0 or
    later (tensor cores and the bfloat16 conversions the kernels use) and a CuPy
    that holds and computes with bfloat16 arrays (CuPy 14 with NumPy 2.1.2 or
    later; CuPy's own bfloat16 kernels compile against the CUDA headers, whose
    bfloat16 arithmetic CuPy's tests ask 12.2 or later for)."""
    device = get_device(device)
    if not device.is_cuda:
        return None
    if int(_cupy.cuda.Device(device.index).compute_capability) < 80:
        return ("it needs a GPU of compute capability 8.0 or later (A100, RTX 30xx, H100 ...): "
                "use fp16 on this one")
    try:
        with _cupy.cuda.Device(device.index):   # a cast, arithmetic, a comparison and a sum
            x = _cupy.ones(2, dtype=numpy.float32).astype(BFLOAT16)
            ((x * x + x) > x).astype(numpy.float32).sum() + x.sum(dtype=numpy.float32)
    except Exception as exc:   # CuPy before 14, NumPy before 2.1.2, or older CUDA headers
        return (f"this CuPy ({_cupy.__version__}) with NumPy {numpy.__version__} cannot compute "
                f"in bfloat16 ({type(exc).__name__}): it needs CuPy 14 or later, NumPy 2.1.2 or "
                f"later and CUDA 12.2 or later, or use fp16")
    return None


def upcast(array):
    """16-bit float arrays (float16, bfloat16) as float32 (for statistics);
    anything else unchanged."""
    if array.dtype in HALF_DTYPES:
        return array.astype(numpy.float32)
    return array


def ignore_overflow(xp):
    """A context in which float overflow to inf is expected (NumPy would warn)."""
    return numpy.errstate(over="ignore", divide="ignore") if xp is numpy else contextlib.nullcontext()


def random_generator(device, seed):
    """A seeded generator on `device` with `normal`, `random` and `integers`.

    seed: an int or a sequence of ints (mixed into one seed)."""
    device = get_device(device)
    if not isinstance(seed, (int, numpy.integer)):
        seed = int(numpy.random.SeedSequence(list(seed)).generate_state(1)[0])
    if device.is_cuda:
        with _cupy.cuda.Device(device.index):
            return _cupy.random.default_rng(seed)
    return numpy.random.default_rng(seed)


def scatter_add_rows(target, index, rows):
    """target[index[i]] += rows[i] for every i, repeated indices summed.

    target: (V, C); index: (N,) ints; rows: (N, C).
    """
    xp = array_module(target)
    if xp is numpy:
        # sort + reduceat sums each distinct index once; np.add.at is far slower
        order = numpy.argsort(index, kind="stable")
        sorted_index = index[order]
        starts = numpy.flatnonzero(numpy.r_[True, sorted_index[1:] != sorted_index[:-1]])
        sums = numpy.add.reduceat(rows[order], starts, axis=0)
        target[sorted_index[starts]] += sums.astype(target.dtype, copy=False)
    elif hasattr(xp.add, "at"):   # CuPy 14 (its cupyx.scatter_add is deprecated)
        xp.add.at(target, index, rows.astype(target.dtype, copy=False))
    else:                          # CuPy 13
        import cupyx
        cupyx.scatter_add(target, index, rows.astype(target.dtype, copy=False))


def synchronize(device):
    if get_device(device).is_cuda:
        _cupy.cuda.get_current_stream().synchronize()


def out_of_memory_errors():
    """The exception types that mean host or GPU memory ran out."""
    if _cupy is None:
        return (MemoryError,)
    return (MemoryError, _cupy.cuda.memory.OutOfMemoryError)


def gpu_name(device):
    """The GPU's marketing name, e.g. 'NVIDIA H100 80GB HBM3'."""
    device = get_device(device)
    props = _cupy.cuda.runtime.getDeviceProperties(device.index)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)
