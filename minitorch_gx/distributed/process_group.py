"""Who this process is in the MPI job, and the collectives that are not
gradient reductions: ``init`` (join the job, pick the GPU and the transport),
``Context``, ``broadcast_parameters``, and blocking metric reductions.

Every collective here waits with the Context's deadline (``ctx.timeout``, see
deadlines.py): it is issued non-blocking and polled, and a rank that does not
answer in time ends the job with one line naming it.

World size 1, or a process started without mpirun (or without mpi4py), is an
explicit no-op: ``init()`` returns a one-rank Context and every function here
returns its input or does nothing.
"""
import os
import pickle

import numpy

from .. import backend
from . import current, transports
from .deadlines import Watch, check_timeout, setup_deadline
from .transports import FlatBuffer, NoTransport

# Environment variables that MPI launchers set in every process they start:
# MPICH/Hydra and Intel MPI, Open MPI, MVAPICH.


class Context:
    """Who this process is in the job.

    rank, world_size: position in ``MPI.COMM_WORLD``.
    local_rank, local_size: position among the processes of this host (MPI's
        shared-memory split), which picks the GPU.
    comm: ``MPI.COMM_WORLD`` (None for a one-process run).
    device: "cpu" or "gpu"; gpu_id: the CUDA device in use (None on CPU).
    transport: what moves gradient buckets: "none", "mpi", "nccl",
        "mpi-cuda-aware" or "mpi-host-staged".
    timeout: seconds any collective of this package may take before the job
        is ended (None: no deadline); settable at any time.
    """

    def __init__(self, rank=0, world_size=1, local_rank=0, local_size=1, comm=None,
                 device="cpu", gpu_id=None, transport=None, timeout=600.0, watch=None):
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_size = local_rank, local_size
        self.comm, self.device, self.gpu_id = comm, device, gpu_id
        self._transport = transport if transport is not None else NoTransport()
        self._watch = watch if watch is not None else Watch(timeout)
        self._watch.ctx = self

    @property
    def timeout(self):
        """Deadline of every collective, in seconds (None: wait forever)."""
        return self._watch.timeout

    @timeout.setter
    def timeout(self, seconds):
        self._watch.timeout = check_timeout(seconds)

    @property
    def is_root(self):
        """True on rank 0, the rank that writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def transport(self):
        return self._transport.name

    # The helpers below as methods, so that a Context can stand for the
    # process group in a trainer.
    def allreduce_sum(self, value):
        return allreduce_sum(value, self)

    def allreduce_mean(self, value):
        return allreduce_mean(value, self)

    def barrier(self):
        barrier(self)

    def broadcast_object(self, obj, root=0, what=None):
        """Any picklable object from ``root`` (a run folder name, a config);
        ``obj`` is ignored on the other ranks. Two ``Ibcast``s (the length,
        then the pickled bytes) with the deadline."""
        if self.world_size == 1:
            return obj
        what = what or f"broadcast of an object from rank {root}"
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if self.rank == root else b""
        length = numpy.array([len(data)], numpy.int64)
        self._watch.collective(what, lambda: self.comm.Ibcast(length, root=root))
        if self.rank == root:
            buf = numpy.frombuffer(data, numpy.uint8).copy()
        else:
            buf = numpy.empty(int(length[0]), numpy.uint8)
        self._watch.collective(what, lambda: self.comm.Ibcast(buf, root=root))
        return obj if self.rank == root else pickle.loads(buf.tobytes())

    def __repr__(self):
        where = "cpu" if self.device == "cpu" else f"gpu:{self.gpu_id}"
        return (f"Context(rank {self.rank}/{self.world_size}, local {self.local_rank}/"
                f"{self.local_size}, {where}, transport {self.transport})")


current.set(Context())  # until init() runs: one process, everything a no-op


def get_context():
    """The Context made by the last ``init()`` (a one-rank Context before)."""
    return current.get()


def init(device="cpu", transport=None, timeout=600.0):
    """Join the MPI job (if any), pick this rank's GPU, set up the transport.

    device: "cpu" or "gpu". On "gpu", rank r of a host uses GPU ``local_rank``.
    transport: None chooses: "mpi" on CPU; on GPU "nccl" when CuPy has NCCL and
        every rank of a host has its own GPU, else "mpi-cuda-aware" when the MPI
        library accepts device buffers, else "mpi-host-staged". The environment
        variable MINITORCH_GX_TRANSPORT overrides the choice.
    timeout: seconds any later collective may take (gradient buckets,
        broadcasts, reductions, barrier) before the job is ended with a line
        naming the rank that did not answer; None: no deadline. Kept as
        ``ctx.timeout``, which may be changed later. Setting up (joining the
        job, the communicators, the transport) has the same deadline, and a
        line that cannot name the rank (deadlines.setup_deadline).
    Returns the Context, also kept as the default of every function here.
    """
    device = backend.normalize_device(device)
    timeout = check_timeout(timeout)
    with setup_deadline(timeout):
        return _init(device, transport or os.environ.get("MINITORCH_GX_TRANSPORT") or None,
                     timeout)


def _init(device, transport, timeout):
    """``init``'s work: every step here blocks until all ranks take part."""
    MPI = _import_mpi()
    if MPI is None:
        ctx = Context(device=device, gpu_id=_select_gpu(device, 0), timeout=timeout)
        current.set(ctx)
        return ctx
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    # Processes that share memory are the processes of one host.
    local_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local_comm.Get_rank(), local_comm.Get_size()
    ctx = Context(rank, world_size, local_rank, local_size, comm, device,
                  watch=Watch(timeout, comm, rank, world_size))
    current.set(ctx)  # so that a failure below is reported with the right rank
    ctx.gpu_id = _select_gpu(device, local_rank)
    if world_size > 1:
        if device == "cpu":
            if transport not in (None, "mpi"):
                raise ValueError(f"transport {transport!r} needs device='gpu'; on CPU use 'mpi'")
            ctx._transport = transports.HostMPITransport(comm, ctx._watch)
        else:
            # Compare the physical GPUs, not the ids: a launcher may give every
            # rank its own single visible GPU, which each rank calls GPU 0.
            bus_ids = local_comm.allgather(backend.cupy.cuda.runtime.deviceGetPCIBusId(ctx.gpu_id))
            shared = len(set(bus_ids)) < len(bus_ids)
            ctx._transport = transports.make_transport(comm, rank, world_size, shared, transport,
                                                       ctx._watch)
    local_comm.Free()
    return ctx


def _import_mpi():
    """``mpi4py.MPI``, or None when mpi4py is missing in a one-process run."""
    try:
        from mpi4py import MPI
        return MPI
    except ImportError:
        size, var = current.launcher_size()
        if size > 1:
            # Without this check every process would train alone as "rank 0"
            # and all of them would write the same checkpoints.
            raise RuntimeError(f"started by an MPI launcher ({var}={size})"
                               " but mpi4py is not installed: pip install mpi4py mpich") from None
        return None


def _select_gpu(device, local_rank):
    """Make GPU ``local_rank`` current (wrapping round when ranks outnumber GPUs)."""
    if device == "cpu":
        return None
    if not backend.gpu_available():
        raise RuntimeError("device='gpu' but CuPy sees no CUDA device on this host")
    count = backend.cupy.cuda.runtime.getDeviceCount()
    gpu_id = local_rank % count  # more ranks than GPUs share them (then not through NCCL)
    backend.cupy.cuda.Device(gpu_id).use()
    return gpu_id


# --------------------------------------------------------------------------
# Whole-model broadcast and metric reductions (blocking, through the host)
# --------------------------------------------------------------------------
def broadcast_parameters(module_or_arrays, root=0, ctx=None):
    """Copy every parameter and buffer of ``root`` into the other ranks, in place.

    Accepts a Module (all parameters and buffers: BN running statistics and
    counters too) or a list of Tensors/arrays. Arrays of one dtype travel in one
    flat message. Raises if the ranks' models differ in names, shapes or dtypes.
    """
    ctx = ctx or get_context()
    if hasattr(module_or_arrays, "named_parameters"):
        m = module_or_arrays
        named = list(m.named_parameters()) + list(m.named_buffers())
    else:
        named = [(str(i), a) for i, a in enumerate(module_or_arrays)]
    arrays = [(name, a.data if hasattr(a, "requires_grad") else a) for name, a in named]
    if ctx.world_size == 1:
        return
    layout = [(name, tuple(a.shape), str(a.dtype)) for name, a in arrays]
    what = f"broadcast of the parameters from rank {root}"
    root_layout = ctx.broadcast_object(layout, root=root, what=what)
    if root_layout != layout:
        i = next(i for i in range(max(len(layout), len(root_layout)))
                 if i >= min(len(layout), len(root_layout)) or layout[i] != root_layout[i])
        mine = layout[i] if i < len(layout) else "nothing"
        theirs = root_layout[i] if i < len(root_layout) else "nothing"
        raise RuntimeError(f"this rank's model differs from rank {root}'s at entry {i}: "
                           f"{mine} here, {theirs} on rank {root}")
    for dtype in sorted({a.dtype.str for _, a in arrays}):
        group = [a for _, a in arrays if a.dtype.str == dtype]
        flat = numpy.concatenate([backend.to_numpy(a).reshape(-1) for a in group])  # (total,)
        ctx._watch.collective(what, lambda: ctx.comm.Ibcast(flat, root=root))
        off = 0
        for a in group:
            xp = backend.get_array_module(a)
            a[...] = xp.asarray(flat[off:off + a.size].reshape(a.shape))
            off += a.size


def allreduce_sum(value, ctx=None):
    """Sum of ``value`` over the ranks: a Python/NumPy number (an int stays an
    int), or an array (NumPy or CuPy, any shape; returned on its own device).
    For metrics such as eval counts, losses and throughputs; blocking, with
    the deadline."""
    ctx = ctx or get_context()
    if hasattr(value, "requires_grad"):  # a Tensor
        value = value.data
    if ctx.world_size == 1:
        return value
    from mpi4py import MPI
    if isinstance(value, (bool, numpy.bool_)):
        value = int(value)  # as Python sums them
    if isinstance(value, (int, float, complex, numpy.generic)):
        host = numpy.array([value])  # (1,): int64, float64, or the NumPy scalar's dtype
        if host.dtype == object:
            raise TypeError(f"allreduce_sum cannot sum {value!r} (out of int64's range?)")
        ctx._watch.collective("allreduce_sum", lambda: ctx.comm.Iallreduce(MPI.IN_PLACE, host))
        total = host[0]
        return type(value)(total) if type(value) in (int, float, complex) else total
    xp = backend.get_array_module(value)
    host = numpy.ascontiguousarray(backend.to_numpy(value))
    total = numpy.empty_like(host)
    ctx._watch.collective("allreduce_sum", lambda: ctx.comm.Iallreduce(host, total))
    return total if xp is numpy else xp.asarray(total)


def allreduce_inplace(array, ctx=None):
    """Sum a contiguous array over the ranks, in place, through the transport
    the gradients use (NCCL for a CuPy array when available). Blocking, with
    the deadline (except on NCCL, where the host does not wait).
    Call it between steps, not while a backward pass is reducing buckets:
    every rank must issue its collectives in the same order."""
    ctx = ctx or get_context()
    if ctx.world_size == 1:
        return array
    if not array.flags.c_contiguous:
        raise ValueError("allreduce_inplace needs a C-contiguous array")
    buffer = FlatBuffer(array)
    ctx._transport.start(buffer)
    ctx._transport.wait(buffer)
    return array


def allreduce_mean(value, ctx=None):
    """Mean of ``value`` over the ranks (see ``allreduce_sum``)."""
    ctx = ctx or get_context()
    total = allreduce_sum(value, ctx)
    return total / ctx.world_size if ctx.world_size > 1 else total


def barrier(ctx=None):
    """Wait until every rank is here (an ``Ibarrier`` with the deadline)."""
    ctx = ctx or get_context()
    if ctx.world_size > 1:
        ctx._watch.collective("barrier", ctx.comm.Ibarrier)
