"""Data-parallel training across processes: one rank per GPU, or per CPU process.

`mpirun -n K xpmodel train ...` starts K copies of the same program. Each
builds the same model; `broadcast_` hands every rank rank 0's weights; each
rank trains on its `shard` of every global batch; after backward one
`allreduce_mean_` over the flat gradient buffer gives every rank the gradient
of the whole batch, so every rank takes the same optimizer step and keeps the
same weights. Only rank 0 (`is_main`) prints, logs, samples and saves.

Transport: MPI (mpi4py) between CPU processes; NCCL (`cupy.cuda.nccl`)
between GPUs, with MPI only handing out NCCL's unique id; MPI through host
memory when NCCL is missing or XPMODEL_NCCL=0.

Faults: a dead or stuck rank must stop the job, never hang it. Open MPI's
mpirun ends the job when a rank exits without finalizing. Beyond that, every
collective has a deadline (XPMODEL_COLLECTIVE_TIMEOUT seconds, default 300;
0 waits forever): a rank that passes it raises `CollectiveTimeout`, and when
that process exits the MPI job is aborted instead of finalized, since
finalizing would wait for the missing rank. A rank that exits normally first
waits, up to the same deadline, for the others to exit too, and aborts the
job if they do not. `abort` and `abort_on_error` end the whole job at once;
an uncaught exception on any rank does the same. On GPUs the deadline makes
each NCCL collective wait for its stream (one host sync per call).

Without an MPI launcher in the environment, `init_distributed` returns a
single-process `Distributed` whose collectives do nothing, and mpi4py is
never imported.
"""
import atexit
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback

import numpy

from . import backend
from .backend import array_module, cuda_available, is_cuda_array, to_host
from .checks import POSITIVE, check_integer
from .cpu_threads import thread_count
from .errors import UsageError, XpmodelError

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "XPMODEL_COLLECTIVE_TIMEOUT"
NCCL_ENV = "XPMODEL_NCCL"
_MPI_HINT = "pip install 'xpmodel[mpi]'"
_SIZE_ENVS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")            # Open MPI; MPICH / Hydra
_LOCAL_RANK_ENVS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
# Waiting on a collective: spin on Test() briefly (a healthy all-reduce is
# usually done by then), then sleep between tests, doubling up to 1 ms.
_SPIN_S = 0.02
_MIN_PAUSE_S, _MAX_PAUSE_S = 1e-5, 1e-3


class CollectiveTimeout(XpmodelError):
    """A collective that did not complete before its deadline."""


def launched_world_size():
    """Ranks the MPI launcher started, read from its environment: 1 without a
    launcher, None under a PMIx launcher that does not say."""
    for name in _SIZE_ENVS:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None if "PMIX_RANK" in os.environ else 1


def collective_timeout():
    """Seconds a collective may take, from XPMODEL_COLLECTIVE_TIMEOUT (0: no limit)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV}={text!r}: expected a number of seconds "
                         f"(0 for no limit)") from None
    if value < 0 or value != value:
        raise UsageError(f"{TIMEOUT_ENV}={text!r}: expected a number of seconds "
                         f"(0 for no limit)")
    return value


def init_distributed(device_spec="cpu"):
    """The process group this program was launched into (see the module doc);
    call it once per process, before building the model.

    device_spec: the device the user asked for; the result's `device_spec`
    is the one this rank must use (`cuda` becomes `cuda:{local_rank}`).
    """
    size = launched_world_size()
    if size == 1:
        return Distributed(device_spec)
    try:
        from mpi4py import MPI
    except ImportError:
        raise UsageError(f"launched by mpirun with {size or 'several'} ranks, but mpi4py "
                         f"is not installed: {_MPI_HINT}") from None
    except Exception as exc:   # mpi4py present, but no MPI library it can load
        raise UsageError(f"mpi4py cannot load an MPI library ({exc}); install Open MPI "
                         f"(apt-get install openmpi-bin) and {_MPI_HINT}") from None
    if MPI.COMM_WORLD.Get_size() == 1:
        return Distributed(device_spec)
    return MPIDistributed(MPI, MPI.COMM_WORLD, device_spec)


class Distributed:
    """A single process: rank 0 of 1, with collectives that change nothing.

    `MPIDistributed` has the same interface over several ranks, so training
    code calls the same methods either way.
    """
    rank = 0
    world_size = 1
    local_rank = 0
    backend = "none"   # "mpi"; for CuPy arrays "nccl", or "mpi-host" without NCCL

    def __init__(self, device_spec="cpu"):
        self.timeout = collective_timeout()
        self.device_spec = self._rank_device_spec(device_spec)

    @property
    def is_main(self):
        """True on the rank that prints, logs, samples and writes files."""
        return self.rank == 0

    def _rank_device_spec(self, spec):
        text = str(spec).strip().lower()
        return "cuda:0" if text == "cuda" else text

    # ---- collectives ------------------------------------------------------------
    def allreduce_mean_(self, flat, timeout=None):
        """Replace `flat` (a contiguous float array, NumPy or CuPy) by its mean
        over the ranks, in place; returns it."""
        return flat

    def broadcast_(self, flat, root=0, timeout=None):
        """Overwrite `flat` on every rank with rank `root`'s values; returns it."""
        return flat

    def barrier(self, timeout=None):
        """Wait until every rank gets here. After a phase only rank 0 runs
        (evaluation, sampling, saving), pass a timeout that covers it."""

    def agree(self, value, timeout=None):
        """True when every rank passes an equal Python value (a config, a seed)."""
        return True

    def in_sync(self, array, timeout=None):
        """True when `array` holds the same bytes on every rank (copies it to
        the host to hash it, so a check to run now and then, not every step)."""
        return True

    # ---- work split and checks ----------------------------------------------------
    def shard(self, batch_size):
        """(start, stop): the rows of a global batch of `batch_size` this rank takes."""
        batch_size = check_integer("batch size", batch_size, POSITIVE)
        if batch_size % self.world_size:
            raise UsageError(f"global batch size {batch_size} does not divide by the "
                             f"{self.world_size} ranks: use a multiple of {self.world_size}")
        per_rank = batch_size // self.world_size
        return self.rank * per_rank, (self.rank + 1) * per_rank

    # ---- failure ----------------------------------------------------------------
    def abort(self, message, code=1):
        """Print `message` as one line on stderr and end the whole job with `code`."""
        _flush_stdio()
        print(self._line(message), file=sys.stderr, flush=True)
        raise SystemExit(code)

    @contextlib.contextmanager
    def abort_on_error(self):
        """Turn an exception on any rank into the end of the whole job, so the
        other ranks do not wait for this one. A single process re-raises."""
        yield

    def _line(self, message):
        text = " ".join(str(message).split()) or "error"
        return text if self.world_size == 1 or text.startswith("rank ") \
            else f"rank {self.rank}: {text}"

    def __repr__(self):
        return (f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, "
                f"local_rank={self.local_rank}, device_spec={self.device_spec!r})")


class MPIDistributed(Distributed):
    """K ranks launched by mpirun, talking over MPI (and NCCL between GPUs)."""

    def __init__(self, MPI, comm, device_spec="cpu"):
        self._MPI = MPI
        self._comm = comm
        self._exit_comm = comm.Dup()   # for the exit barrier, apart from training's collectives
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        self._failed = None         # the CollectiveTimeout or MPI error that ended us
        self._nccl = None           # cupy.cuda.nccl, once NCCL is set up
        self._nccl_comms = {}       # GPU index -> NcclCommunicator
        self._nccl_decided = False
        self._host_note_shown = False
        self.backend = "mpi"
        self.timeout = collective_timeout()
        self._install_exit_hooks()
        self.local_rank = self._find_local_rank()
        self._share_cpu_threads()
        super().__init__(device_spec)

    def _share_cpu_threads(self):
        """Split this node's cores between its ranks for xpmodel's CPU threads,
        unless the user chose a thread count."""
        if any(os.environ.get(name) for name in
               ("XPMODEL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")):
            return
        node = self._comm.Split_type(self._MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            ranks_here = node.Get_size()
        finally:
            node.Free()
        os.environ["XPMODEL_NUM_THREADS"] = str(max(1, thread_count() // ranks_here))

    def _find_local_rank(self):
        for name in _LOCAL_RANK_ENVS:
            value = os.environ.get(name, "").strip()
            if value.isdigit():
                return int(value)
        node = self._comm.Split_type(self._MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            return node.Get_rank()
        finally:
            node.Free()

    def _rank_device_spec(self, spec):
        text = str(spec).strip().lower()
        if text == "auto":
            text = "cuda" if cuda_available() else "cpu"
        if text.startswith("cuda:"):
            raise UsageError(f"device {spec!r} names one GPU, but {self.world_size} ranks run: "
                             f"use --device cuda, and each rank takes the GPU of its local rank")
        if text != "cuda":
            return text
        if cuda_available():
            count = backend.import_cupy().cuda.runtime.getDeviceCount()
            if self.local_rank >= count:
                raise UsageError(f"rank {self.rank}: local rank {self.local_rank} needs GPU "
                                 f"{self.local_rank}, but this node shows {count} GPU(s): "
                                 f"start at most {count} ranks per node")
        return f"cuda:{self.local_rank}"

    # ---- collectives ------------------------------------------------------------
    def allreduce_mean_(self, flat, timeout=None):
        _check_contiguous(flat, "allreduce_mean_")
        if is_cuda_array(flat):
            self._allreduce_cuda(flat, timeout)
        else:
            self._wait(self._comm.Iallreduce(self._MPI.IN_PLACE, flat, self._MPI.SUM),
                       "all-reduce", timeout)
        flat /= self.world_size
        return flat

    def broadcast_(self, flat, root=0, timeout=None):
        _check_contiguous(flat, "broadcast_")
        if not is_cuda_array(flat):
            self._wait(self._comm.Ibcast(flat, root=root), "broadcast", timeout)
            return flat
        nccl_comm = self._nccl_comm(flat)
        if nccl_comm is None:
            host = to_host(flat)
            self._wait(self._comm.Ibcast(host, root=root), "broadcast", timeout)
            flat.set(host)
        else:
            stream = array_module(flat).cuda.get_current_stream()
            nccl_comm.bcast(flat.data.ptr, flat.size, _nccl_dtype(self._nccl, flat.dtype),
                            root, stream.ptr)
            self._wait_stream(flat, stream, nccl_comm, "broadcast", timeout)
        return flat

    def barrier(self, timeout=None):
        self._wait(self._comm.Ibarrier(), "barrier", timeout)

    def agree(self, value, timeout=None):
        blobs = self._allgather_blobs(_canonical_bytes(value), "agreement check", timeout)
        return all(blob == blobs[0] for blob in blobs[1:])

    def in_sync(self, array, timeout=None):
        digest = hashlib.sha256(numpy.ascontiguousarray(to_host(array)).tobytes()).hexdigest()
        return self.agree(digest, timeout)

    # ---- failure ----------------------------------------------------------------
    def abort(self, message, code=1):
        _flush_stdio()
        print(self._line(message), file=sys.stderr, flush=True)
        self._comm.Abort(code)
        raise SystemExit(code)   # not reached: Abort ends this process too

    @contextlib.contextmanager
    def abort_on_error(self):
        try:
            yield
        except XpmodelError as err:
            self.abort(str(err), err.exit_code)
        except KeyboardInterrupt:
            self.abort("interrupted", 130)
        except SystemExit as exit_:
            if exit_.code in (None, 0):
                raise
            self.abort(f"exited with status {exit_.code}",
                       exit_.code if isinstance(exit_.code, int) else 1)
        except BaseException as err:
            traceback.print_exc()
            self.abort(f"{type(err).__name__}: {err}", 1)

    def _install_exit_hooks(self):
        """Never let a rank that ends early hang the job. MPI's finalize waits
        for every rank, while the others wait in a collective for this one; so
        an uncaught exception or a failed collective aborts the job, and any
        other exit first waits (up to the collective timeout) for the other
        ranks to exit too, and aborts the job if they do not."""
        previous_hook = sys.excepthook

        def abort_after_traceback(kind, value, tb):
            previous_hook(kind, value, tb)
            _flush_stdio()
            self._comm.Abort(1)

        sys.excepthook = abort_after_traceback
        atexit.register(self._exit)   # runs before mpi4py finalizes MPI

    def _exit(self):
        if self._failed is None:
            try:
                self._wait(self._exit_comm.Ibarrier(), "exit barrier", None)
                return
            except XpmodelError:
                _flush_stdio()
                print(f"rank {self.rank}: this rank is exiting, but the other ranks did not "
                      f"also finish within {self.timeout:g} s; ending the job",
                      file=sys.stderr, flush=True)
        _flush_stdio()
        self._comm.Abort(getattr(self._failed, "exit_code", 1))

    def _fail(self, error):
        self._failed = error
        raise error

    def _timeout_error(self, what, limit):
        return CollectiveTimeout(f"rank {self.rank}: {what} did not complete in {limit:g} s; "
                                 f"another rank probably died (the limit is {TIMEOUT_ENV})")

    def _wait(self, request, what, timeout):
        """Complete an MPI request, or fail once the deadline passes."""
        limit = self.timeout if timeout is None else timeout
        try:
            if not limit or limit <= 0:
                request.Wait()
                return
            start = time.monotonic()
            pause = _MIN_PAUSE_S
            while not request.Test():
                elapsed = time.monotonic() - start
                if elapsed > limit:
                    self._fail(self._timeout_error(what, limit))
                if elapsed > _SPIN_S:
                    time.sleep(pause)
                    pause = min(2 * pause, _MAX_PAUSE_S)
        except self._MPI.Exception as err:
            self._fail(XpmodelError(f"rank {self.rank}: {what} failed: {err}"))

    def _wait_stream(self, flat, stream, nccl_comm, what, timeout):
        """Wait for NCCL work queued on `stream`, or abort NCCL and fail at the deadline."""
        limit = self.timeout if timeout is None else timeout
        if not limit or limit <= 0:
            return   # stays asynchronous; a hang then surfaces at the next sync
        event = array_module(flat).cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        start = time.monotonic()
        pause = _MIN_PAUSE_S
        while not event.done:
            elapsed = time.monotonic() - start
            if elapsed > limit:
                nccl_comm.abort()   # frees the GPU from the stuck kernel
                self._fail(self._timeout_error(what, limit))
            if elapsed > _SPIN_S:
                time.sleep(pause)
                pause = min(2 * pause, _MAX_PAUSE_S)

    # ---- byte-string collectives (with the same deadline) ---------------------------
    def _allgather_blobs(self, data, what, timeout):
        """Every rank's `data` (bytes), in rank order."""
        blob = numpy.frombuffer(data, dtype=numpy.uint8)
        sizes = numpy.zeros(self.world_size, dtype=numpy.int64)
        self._wait(self._comm.Iallgather(numpy.array([blob.size], dtype=numpy.int64), sizes),
                   what, timeout)
        displacements = numpy.concatenate([[0], numpy.cumsum(sizes)[:-1]])
        gathered = numpy.empty(int(sizes.sum()), dtype=numpy.uint8)
        self._wait(self._comm.Iallgatherv(blob, [gathered, sizes, displacements,
                                                 self._MPI.BYTE]), what, timeout)
        return [gathered[start:start + size].tobytes() for start, size in zip(displacements, sizes)]

    def _broadcast_json(self, value, what, root=0, timeout=None):
        """Rank `root`'s JSON-serialisable `value` on every rank."""
        blob = numpy.frombuffer(_canonical_bytes(value), dtype=numpy.uint8)
        size = numpy.array([blob.size], dtype=numpy.int64)
        self._wait(self._comm.Ibcast(size, root=root), what, timeout)
        buffer = blob.copy() if self.rank == root else numpy.empty(int(size[0]), numpy.uint8)
        self._wait(self._comm.Ibcast(buffer, root=root), what, timeout)
        return json.loads(buffer.tobytes())

    def _all_true(self, flag, what):
        buffer = numpy.array([1 if flag else 0], dtype=numpy.int32)
        self._wait(self._comm.Iallreduce(self._MPI.IN_PLACE, buffer, self._MPI.MIN),
                   what, None)
        return bool(buffer[0])

    # ---- GPUs ---------------------------------------------------------------------
    def _allreduce_cuda(self, flat, timeout):
        nccl_comm = self._nccl_comm(flat)
        if nccl_comm is None:
            host = to_host(flat)
            self._wait(self._comm.Iallreduce(self._MPI.IN_PLACE, host, self._MPI.SUM),
                       "all-reduce", timeout)
            flat.set(host)
            return
        stream = array_module(flat).cuda.get_current_stream()
        nccl_comm.allReduce(flat.data.ptr, flat.data.ptr, flat.size,
                            _nccl_dtype(self._nccl, flat.dtype), self._nccl.NCCL_SUM, stream.ptr)
        self._wait_stream(flat, stream, nccl_comm, "all-reduce", timeout)

    def _nccl_comm(self, flat):
        """The NCCL communicator for `flat`'s GPU, or None for MPI through host
        memory. Every rank reaches the same answer, since the choice is agreed."""
        if not self._nccl_decided:
            self._nccl_decided = True
            nccl, reason = _import_nccl()
            if not self._all_true(nccl is not None, "NCCL setup"):
                self._use_host_staging(reason or "NCCL is missing on another rank")
                return None
            self._nccl = nccl
        if self._nccl is None:
            return None
        device = flat.device.id
        if device not in self._nccl_comms:
            unique_id, reason = None, "ncclGetUniqueId failed on rank 0"
            if self.rank == 0:
                try:
                    unique_id = self._nccl.get_unique_id()
                except Exception as exc:
                    reason = f"ncclGetUniqueId failed: {exc}"
            # bytes from CuPy 14 on, a tuple of ints before: each rank's communicator
            # takes the id in the type rank 0's get_unique_id gave it
            shared = self._broadcast_json(None if unique_id is None else
                                          [isinstance(unique_id, bytes), list(unique_id)],
                                          "NCCL setup")
            if shared is not None:
                unique_id = bytes(shared[1]) if shared[0] else tuple(shared[1])
            if unique_id is None:
                self._nccl = None
                self._use_host_staging(reason)
                return None
            try:
                with array_module(flat).cuda.Device(device):
                    self._nccl_comms[device] = self._nccl.NcclCommunicator(
                        self.world_size, unique_id, self.rank)
            except Exception as exc:   # the other ranks are waiting inside NCCL's init
                self._fail(XpmodelError(f"rank {self.rank}: NCCL communicator setup on GPU "
                                        f"{device} failed: {exc}"))
            self.backend = "nccl"
        return self._nccl_comms[device]

    def _use_host_staging(self, reason):
        self.backend = "mpi-host"
        if self.is_main and not self._host_note_shown:
            self._host_note_shown = True
            print(f"note: {reason}; GPU gradients are averaged over MPI through host memory "
                  f"(slower)", file=sys.stderr, flush=True)


def local_mpirun(ranks, argv, mpirun="mpirun"):
    """(command, environment) that start `argv` as `ranks` MPI ranks on this
    machine, for tests and benchmarks. With Open MPI it may place more ranks
    than cores, run as root, and skips the shared-memory single-copy path,
    which containers without ptrace rights refuse."""
    path = shutil.which(mpirun)
    if path is None:
        raise UsageError(f"{mpirun} not found: install Open MPI (apt-get install openmpi-bin "
                         f"libopenmpi-dev) and {_MPI_HINT}")
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    command, env = [path, "-n", str(ranks)], dict(os.environ)
    if "Open MPI" in version or "OpenRTE" in version:
        command += ["--map-by", ":OVERSUBSCRIBE"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.append("--allow-run-as-root")
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")   # Open MPI 4
        env.setdefault("OMPI_MCA_btl_sm_single_copy_mechanism", "none")      # Open MPI 5
    return command + [str(arg) for arg in argv], env


def _import_nccl():
    """(cupy.cuda.nccl, None) when NCCL can be used, else (None, the reason)."""
    if os.environ.get(NCCL_ENV, "").strip() == "0":
        return None, f"{NCCL_ENV}=0"
    try:
        from cupy.cuda import nccl
    except Exception as exc:
        return None, f"NCCL is not available to CuPy ({exc})"
    if not getattr(nccl, "available", True):
        return None, ("NCCL is not available to CuPy (install it: pip install "
                      "nvidia-nccl-cu12, or python -m cupyx.tools.install_library "
                      "--library nccl)")
    return nccl, None


def _nccl_dtype(nccl, dtype):
    codes = {"float16": nccl.NCCL_FLOAT16, "float32": nccl.NCCL_FLOAT32,
             "float64": nccl.NCCL_FLOAT64, "int32": nccl.NCCL_INT32, "int64": nccl.NCCL_INT64}
    name = numpy.dtype(dtype).name
    if name not in codes:
        raise TypeError(f"NCCL collectives take float16/32/64 or int32/64 arrays, not {name}")
    return codes[name]


def _check_contiguous(array, what):
    if not array.flags.c_contiguous:
        raise ValueError(f"{what} needs a contiguous array (the flat buffer or a copy)")


def _flush_stdio():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _canonical_bytes(value):
    """A value as canonical JSON bytes, so equal values compare equal across ranks
    (nothing is pickled)."""
    return json.dumps(value, sort_keys=True, default=repr).encode()
