"""Data-parallel training over MPI: one process per device, gradients averaged.

    mpirun -n 8 python train.py --run_distribute=1 ...      # 8 GPUs of one host
    mpirun -f hosts -n 16 python train.py --run_distribute=1 ...  # across hosts

Every rank holds the whole model, reads its own shard of the data, starts from
rank 0's weights (``broadcast_parameters``) and, before every optimizer step,
replaces its gradients by their mean over all ranks (``GradientAllreducer``).
All ranks then take the same step and the weights stay identical; batch-norm
statistics stay per rank, as in the original.

How the gradients travel (the design of ChainerMN's pure-NCCL communicator and
of PyTorch DDP's reducer):
* Flat buckets. Hundreds of small allreduce calls cost hundreds of latencies,
  so parameters are grouped into buckets of about ``bucket_mb`` MiB; each
  bucket owns one flat buffer, and one allreduce (a sum) moves all its
  gradients. The sum is divided by the world size once, while unpacking.
* Overlap. Backward produces gradients from the last layer to the first, so
  buckets are filled in reverse registration order. A post-accumulate-grad hook
  on every parameter counts down its bucket; when the bucket is complete it is
  packed and a non-blocking allreduce starts (MPI ``Iallreduce`` on host
  buffers, or NCCL on a side stream) while backward goes on with the earlier
  layers. ``synchronize()`` waits for the rest and unpacks.
* Same order everywhere. MPI and NCCL need every rank to issue its collectives
  in the same order, so buckets are launched strictly by index: a bucket that
  completes early waits (packed) for the buckets before it.

World size 1, or a process started without mpirun (or without mpi4py), is an
explicit no-op: ``init()`` returns a one-rank Context and every function here
returns its input or does nothing. mpi4py is imported lazily, so this module
imports without it. The GPU transports (NCCL, CUDA-aware MPI, MPI through
pinned host buffers) live in ``distributed_nccl``; failure handling (one
failing rank ends the job) in ``distributed_failures``.
"""
import contextlib
import os

import numpy

from . import backend
from .distributed_failures import abort_on_failure, describe_error, fatal, install_failure_handler

__all__ = ["Context", "init", "get_context", "GradientAllreducer", "broadcast_parameters",
           "allreduce_sum", "allreduce_mean", "allreduce_inplace", "barrier",
           "install_failure_handler", "abort_on_failure", "fatal", "describe_error"]

# Environment variables that MPI launchers set in every process they start:
# MPICH/Hydra and Intel MPI, Open MPI, MVAPICH.
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class _NoTransport:
    """One rank: nothing to reduce."""

    name = "none"

    def new_buffer(self, size, dtype, xp):
        return xp.zeros(size, dtype)

    def start(self, bucket):
        pass

    def progress(self):
        pass

    def wait(self, bucket):
        pass


class Context:
    """Who this process is in the job.

    rank, world_size: position in ``MPI.COMM_WORLD``.
    local_rank, local_size: position among the processes of this host (MPI's
        shared-memory split), which picks the GPU.
    comm: ``MPI.COMM_WORLD`` (None for a one-process run).
    device: "cpu" or "gpu"; gpu_id: the CUDA device in use (None on CPU).
    transport: what moves gradient buckets: "none", "mpi", "nccl",
        "mpi-cuda-aware" or "mpi-host-staged".
    """

    def __init__(self, rank=0, world_size=1, local_rank=0, local_size=1, comm=None,
                 device="cpu", gpu_id=None, transport=None):
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_size = local_rank, local_size
        self.comm, self.device, self.gpu_id = comm, device, gpu_id
        self._transport = transport if transport is not None else _NoTransport()

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

    def broadcast_object(self, obj, root=0):
        """Any picklable object from ``root`` (a run folder name, a config)."""
        return self.comm.bcast(obj, root=root) if self.world_size > 1 else obj

    def __repr__(self):
        where = "cpu" if self.device == "cpu" else f"gpu:{self.gpu_id}"
        return (f"Context(rank {self.rank}/{self.world_size}, local {self.local_rank}/"
                f"{self.local_size}, {where}, transport {self.transport})")


_context = Context()  # until init() runs: one process, everything a no-op


def get_context():
    """The Context made by the last ``init()`` (a one-rank Context before)."""
    return _context


def init(device="cpu", transport=None):
    """Join the MPI job (if any), pick this rank's GPU, set up the transport.

    device: "cpu" or "gpu". On "gpu", rank r of a host uses GPU ``local_rank``.
    transport: None chooses: "mpi" on CPU; on GPU "nccl" when CuPy has NCCL and
        every rank of a host has its own GPU, else "mpi-cuda-aware" when the MPI
        library accepts device buffers, else "mpi-host-staged". The environment
        variable MINITORCH_GX_TRANSPORT overrides the choice.
    Returns the Context, also kept as the default of every function here.
    """
    global _context
    device = backend.normalize_device(device)
    transport = transport or os.environ.get("MINITORCH_GX_TRANSPORT") or None
    MPI = _import_mpi()
    if MPI is None:
        _context = Context(device=device, gpu_id=_select_gpu(device, 0))
        return _context
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    # Processes that share memory are the processes of one host.
    local_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local_comm.Get_rank(), local_comm.Get_size()
    ctx = Context(rank, world_size, local_rank, local_size, comm, device)
    _context = ctx  # so that a failure below is reported with the right rank
    ctx.gpu_id = _select_gpu(device, local_rank)
    if world_size > 1:
        if device == "cpu":
            if transport not in (None, "mpi"):
                raise ValueError(f"transport {transport!r} needs device='gpu'; on CPU use 'mpi'")
            ctx._transport = HostMPITransport(comm)
        else:
            from . import distributed_nccl
            # Compare the physical GPUs, not the ids: a launcher may give every
            # rank its own single visible GPU, which each rank calls GPU 0.
            bus_ids = local_comm.allgather(backend.cupy.cuda.runtime.deviceGetPCIBusId(ctx.gpu_id))
            shared = len(set(bus_ids)) < len(bus_ids)
            ctx._transport = distributed_nccl.make_transport(comm, rank, world_size, shared,
                                                             transport)
    local_comm.Free()
    return ctx


def _import_mpi():
    """``mpi4py.MPI``, or None when mpi4py is missing in a one-process run."""
    try:
        from mpi4py import MPI
        return MPI
    except ImportError:
        launched = [v for v in _LAUNCHER_SIZE_VARS if int(os.environ.get(v, "1") or 1) > 1]
        if launched:
            # Without this check every process would train alone as "rank 0"
            # and all of them would write the same checkpoints.
            raise RuntimeError(f"started by an MPI launcher ({launched[0]}={os.environ[launched[0]]})"
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
# Transports: how one flat bucket is summed over the ranks, without blocking.
# Each has start(bucket) (begin the sum of bucket.flat in place), progress()
# (let pending operations advance) and wait(bucket) (the sum is in
# bucket.flat, ordered before whatever the caller does next).
# --------------------------------------------------------------------------
class HostMPITransport:
    """Host buckets summed with ``MPI_Iallreduce``, in place.

    MPICH moves a non-blocking collective forward only inside MPI calls, so
    ``progress()`` (called from every gradient hook) tests the pending requests;
    with MPIR_CVAR_ASYNC_PROGRESS=1 a helper thread does it instead.
    """

    name = "mpi"

    def __init__(self, comm):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, comm
        self._inflight = []

    def new_buffer(self, size, dtype, xp):
        return numpy.zeros(size, dtype)

    def start(self, bucket):
        bucket.request = self.comm.Iallreduce(self.MPI.IN_PLACE, bucket.flat, op=self.MPI.SUM)
        self._inflight.append(bucket)

    def progress(self):
        if self._inflight:  # completed requests become MPI.REQUEST_NULL in place
            self.MPI.Request.Testall([b.request for b in self._inflight])

    def wait(self, bucket):
        bucket.request.Wait()
        bucket.request = None
        self._inflight.remove(bucket)


# --------------------------------------------------------------------------
# Gradient buckets
# --------------------------------------------------------------------------
class _FlatBuffer:
    """What a transport reduces: ``flat``, a contiguous array, plus the
    transport's own state (``request``; a pinned ``host`` copy when staged)."""

    def __init__(self, flat):
        self.flat = flat
        self.request = None


class _Bucket(_FlatBuffer):
    """Parameters whose gradients travel together in one flat buffer.

    flat: (size,) of the parameters' dtype on their device; parameter i lives in
    ``flat[offsets[i]:offsets[i] + params[i].size]``.
    """

    def __init__(self, index, params, transport):
        self.index, self.params = index, params
        self.offsets, size = [], 0
        for p in params:
            self.offsets.append(size)
            size += p.size
        xp = backend.get_array_module(params[0].data)
        super().__init__(transport.new_buffer(size, params[0].dtype, xp))  # (size,)
        self.reset()

    def reset(self):
        self.pending = len(self.params)  # gradients not yet complete this step
        self.packed = False
        self.started = False

    def pack(self):
        for p, off in zip(self.params, self.offsets):
            view = self.flat[off:off + p.size]
            if p.grad is None:  # unused this step: contributes zeros
                view.fill(0)
            else:
                view[...] = p.grad.reshape(-1)
        self.packed = True

    def unpack(self, world_size):
        xp = backend.get_array_module(self.flat)
        for p, off in zip(self.params, self.offsets):
            total = self.flat[off:off + p.size].reshape(p.shape)
            # In place when possible: the optimizer may hold p.grad as a view
            # into its own flat gradient.
            if p.grad is None or p.grad.shape != p.shape:
                p.grad = total / world_size
            else:
                xp.divide(total, world_size, out=p.grad)


class GradientAllreducer:
    """Averages the gradients of ``params`` over all ranks, overlapping backward.

        reducer = GradientAllreducer(model.parameters(), bucket_mb=25)
        loss.backward()          # buckets start reducing as they fill
        reducer.synchronize()    # wait, divide by world size, unpack into p.grad
        optimizer.step()

    Call ``synchronize()`` after every backward. To accumulate gradients over
    several backward passes, run all but the last inside ``no_sync()``.
    A parameter whose gradient is still None at ``synchronize()`` (unused
    this step) counts as zeros and receives the mean of the others.
    With one rank, nothing is registered and ``synchronize()`` returns at once.
    """

    def __init__(self, params, bucket_mb=25.0, ctx=None):
        self.ctx = ctx or get_context()
        self.world_size = self.ctx.world_size
        self.params = [p for p in params if p.requires_grad]
        self._sync_enabled = True
        self._ready = set()  # id of each parameter whose gradient is complete this step
        self._next = 0       # index of the next bucket to launch
        self.buckets = self._make_buckets(int(bucket_mb * 2 ** 20))
        self._where = {}     # id(param) -> its bucket
        for b in self.buckets:
            for p in b.params:
                self._where[id(p)] = b
        if self.world_size > 1:
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _make_buckets(self, cap_bytes):
        """Reverse registration order (the order backward completes them),
        closing a bucket once it holds ``cap_bytes`` or the dtype/device changes."""
        buckets, current, nbytes = [], [], 0
        for p in reversed(self.params):
            if current and (p.dtype != current[0].dtype
                            or backend.device_of(p.data) != backend.device_of(current[0].data)):
                buckets.append(current)
                current, nbytes = [], 0
            current.append(p)
            nbytes += p.data.nbytes
            if nbytes >= cap_bytes:
                buckets.append(current)
                current, nbytes = [], 0
        if current:
            buckets.append(current)
        return [_Bucket(i, ps, self.ctx._transport) for i, ps in enumerate(buckets)]

    @property
    def bucket_sizes(self):
        """Elements per bucket, in launch order (for logs and tests)."""
        return [b.flat.size for b in self.buckets]

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate locally; the first backward after
        the block reduces the accumulated gradients."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def _on_grad_ready(self, p):
        if not self._sync_enabled:
            return
        if id(p) in self._ready:
            raise RuntimeError("a gradient became ready twice before synchronize(): call "
                               "GradientAllreducer.synchronize() after every backward, or run "
                               "accumulating backward passes inside reducer.no_sync()")
        self._ready.add(id(p))
        bucket = self._where[id(p)]
        bucket.pending -= 1
        if bucket.pending == 0:
            bucket.pack()
            self._launch_in_order()
        self.ctx._transport.progress()

    def _launch_in_order(self):
        while self._next < len(self.buckets) and self.buckets[self._next].packed:
            bucket = self.buckets[self._next]
            self.ctx._transport.start(bucket)
            bucket.started = True
            self._next += 1

    def synchronize(self):
        """Wait for every bucket and leave the mean gradient in each ``p.grad``."""
        if self.world_size == 1:
            return
        for b in self.buckets:
            if not b.packed:  # unused parameters, or backward ran inside no_sync()
                b.pack()
        self._launch_in_order()
        try:
            for b in self.buckets:
                self.ctx._transport.wait(b)
                b.unpack(self.world_size)
        finally:
            for b in self.buckets:
                b.reset()
            self._ready.clear()
            self._next = 0


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
    root_layout = ctx.comm.bcast(layout, root=root)
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
        ctx.comm.Bcast(flat, root=root)
        off = 0
        for a in group:
            xp = backend.get_array_module(a)
            a[...] = xp.asarray(flat[off:off + a.size].reshape(a.shape))
            off += a.size


def allreduce_sum(value, ctx=None):
    """Sum of ``value`` over the ranks: a Python/NumPy number, or an array
    (NumPy or CuPy, any shape; returned on its own device). For metrics such as
    eval counts, losses and throughputs; blocking."""
    ctx = ctx or get_context()
    if hasattr(value, "requires_grad"):  # a Tensor
        value = value.data
    if ctx.world_size == 1:
        return value
    if numpy.isscalar(value) or isinstance(value, (int, float)):
        return ctx.comm.allreduce(value)  # pickled: keeps int as int
    xp = backend.get_array_module(value)
    host = numpy.ascontiguousarray(backend.to_numpy(value))
    total = numpy.empty_like(host)
    ctx.comm.Allreduce(host, total)
    return total if xp is numpy else xp.asarray(total)


def allreduce_inplace(array, ctx=None):
    """Sum a contiguous array over the ranks, in place, through the transport
    the gradients use (NCCL for a CuPy array when available). Blocking.
    Call it between steps, not while a backward pass is reducing buckets:
    every rank must issue its collectives in the same order."""
    ctx = ctx or get_context()
    if ctx.world_size == 1:
        return array
    if not array.flags.c_contiguous:
        raise ValueError("allreduce_inplace needs a C-contiguous array")
    buffer = _FlatBuffer(array)
    ctx._transport.start(buffer)
    ctx._transport.wait(buffer)
    return array


def allreduce_mean(value, ctx=None):
    """Mean of ``value`` over the ranks (see ``allreduce_sum``)."""
    ctx = ctx or get_context()
    total = allreduce_sum(value, ctx)
    return total / ctx.world_size if ctx.world_size > 1 else total


def barrier(ctx=None):
    ctx = ctx or get_context()
    if ctx.world_size > 1:
        ctx.comm.Barrier()
