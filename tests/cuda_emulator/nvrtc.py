"""NVRTC, the compiler CuPy's RawKernel uses, called through ctypes: it
compiles kernel source for a GPU architecture without a GPU, and ptxas
reports each kernel's registers and spills."""
import ctypes
import re
from pathlib import Path


def library():
    """libnvrtc from the nvidia-cuda-nvrtc wheel, or None."""
    try:
        import nvidia.cuda_nvrtc
    except ImportError:
        return None
    for directory in nvidia.cuda_nvrtc.__path__:
        for candidate in sorted(Path(directory, "lib").glob("libnvrtc.so*")):
            return ctypes.CDLL(str(candidate))
    return None


def compile_kernel(lib, code, arch):
    """Compile `code` for sm_`arch`; returns (ok, log), the log holding
    ptxas's resource report for every kernel."""
    program = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(program), code.encode(), b"kernel.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        options = [f"--gpu-architecture=sm_{arch}".encode(), b"--ptxas-options=-v"]
        status = lib.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(program, log)
        return status == 0, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def ptx(lib, code, arch):
    """The PTX NVRTC makes of `code` for sm_`arch` (raises if it does not compile)."""
    program = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(program), code.encode(), b"kernel.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        option = f"--gpu-architecture=compute_{arch}".encode()
        if lib.nvrtcCompileProgram(program, 1, (ctypes.c_char_p * 1)(option)):
            raise RuntimeError("the kernel does not compile")
        size = ctypes.c_size_t()
        lib.nvrtcGetPTXSize(program, ctypes.byref(size))
        text = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(program, text)
        return text.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def spills(log):
    """Bytes of spill stores and loads ptxas reports, summed over the kernels."""
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))


def registers(log):
    """{kernel name: registers a thread} of every kernel the log reports."""
    found, name = {}, None
    for line in log.splitlines():
        entry = re.search(r"(?:Compiling entry function|Function properties for) '?(\w+)'?", line)
        if entry:
            name = entry.group(1)
        used = re.search(r"Used (\d+) registers", line)
        if used and name:
            found[name] = int(used.group(1))
    return found


def fits_a_multiprocessor(registers_a_thread, threads):
    """Whether a block of `threads` fits the 65,536 registers of an sm_80 /
    sm_90 multiprocessor, registers allocated a warp at a time in units of 256
    (8 a thread); a launch that does not fails on a GPU with too many resources
    requested."""
    warps = -(-threads // 32)
    return warps * 32 * -(-registers_a_thread // 8) * 8 <= 65536


def unfused_sums(code, arch=80):
    """{kernel name: its float32 adds and subtractions that take a separately
    rounded float32 product} in the PTX of `code`: where NVRTC left a product
    and a sum apart, which it may fuse in one kernel and not in another (the
    emulator fuses nothing). PTX writes a register in several places (a loop's
    value, both sides of a branch), so an operand counts as a product when the
    last instruction before the sum, in the text, to write it was a multiply:
    a screen, not a proof, since a product that reaches a sum through a join
    or a `selp` is not seen."""
    instruction = re.compile(r"^\s*(?:@!?%p\d+\s+)?(\w+)[.\w]*\s+(%f\d+)"
                             r"(?:, (%f\d+|[^,;]+))?(?:, (%f\d+|[^,;]+))?")
    found = {}
    for kernel in ptx(library(), code, arch).split(".entry ")[1:]:
        last_written, sums = {}, []
        for line in kernel.splitlines():
            match = instruction.match(line)
            if not match:
                continue
            op, target, *operands = match.groups()
            if op in ("add", "sub") and ".f32" in line and \
                    any(last_written.get(a) == "mul" for a in operands):
                sums.append(line.strip())
            last_written[target] = op
        found[kernel.split("(")[0].strip()] = sums
    return found
