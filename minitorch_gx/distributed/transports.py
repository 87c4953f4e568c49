"""Transports: how one flat buffer (a gradient bucket) is summed over the ranks,
without blocking. Each has ``new_buffer``, ``start(bucket)`` (begin the sum of
``bucket.flat`` in place), ``progress()`` (let pending operations advance) and
``wait(bucket)`` (the sum is in ``bucket.flat``, ordered before whatever the
caller does next).

On the CPU: ``HostMPITransport`` (``MPI_Iallreduce``); one rank: ``NoTransport``.
Three ways to sum a device bucket over the ranks, best first:
* ``NcclTransport``: NCCL (``cupy.cuda.nccl``) on a side stream. Rank 0 makes
  the NCCL unique id and MPI broadcasts it, as ChainerMN does. The side stream
  waits for an event recorded after the bucket was packed, so the reduction
  runs on the GPU while the default stream goes on with backward; the host
  never waits.
* ``DeviceMPITransport(cuda_aware=True)``: an MPI built with CUDA support
  reduces the device buffer itself.
* ``DeviceMPITransport(cuda_aware=False)``: the bucket is copied to pinned
  host memory and reduced there with ``MPI_Iallreduce``.
For both MPI variants the copy (or the packing) is asynchronous: MPI starts on
a bucket only once its CUDA event has completed, polled from the gradient hooks,
so the host does not stall the GPU queue.

Every transport has ``new_buffer``, ``start(bucket)``, ``progress()`` and
``wait(bucket)``; ``wait`` leaves the sum in ``bucket.flat``, ordered before the
next work on the current stream.

Deadlines: each transport that hands a bucket to MPI counts it with its
``watch`` (deadlines.Watch) when it issues it and waits with ``watch.wait``,
so a bucket that does not complete within ``ctx.timeout`` seconds of its start
ends the job with a line naming it (``bucket.describe()``) and the late rank.
NCCL buckets are counted but never waited for by the host.
"""
import ctypes
import os
import time
from collections import deque

import numpy

from .. import backend
from ..backend import cupy
from .deadlines import Watch


class FlatBuffer:
    """What a transport reduces: ``flat``, a contiguous array, plus the
    transport's own state (``request``; a pinned ``host`` copy when staged)."""

    def __init__(self, flat):
        self.flat = flat
        self.request = None
        self.number = self.started_at = None  # collective number and start time, set on issue

    def describe(self):
        """What this reduction is, for the line of a deadline that passed."""
        return f"allreduce_inplace of {self.flat.size} elements"


class NoTransport:
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


class HostMPITransport:
    """Host buckets summed with ``MPI_Iallreduce``, in place.

    MPICH moves a non-blocking collective forward only inside MPI calls, so
    ``progress()`` (called from every gradient hook) tests the pending requests;
    with MPIR_CVAR_ASYNC_PROGRESS=1 a helper thread does it instead.
    """

    name = "mpi"

    def __init__(self, comm, watch=None):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, comm
        self.watch = watch if watch is not None else Watch(None)
        self._inflight = []

    def new_buffer(self, size, dtype, xp):
        return numpy.zeros(size, dtype)

    def start(self, bucket):
        bucket.number, bucket.started_at = self.watch.enter(), time.monotonic()
        bucket.request = self.comm.Iallreduce(self.MPI.IN_PLACE, bucket.flat, op=self.MPI.SUM)
        self._inflight.append(bucket)

    def progress(self):
        if self._inflight:  # completed requests become MPI.REQUEST_NULL in place
            self.MPI.Request.Testall([b.request for b in self._inflight])

    def wait(self, bucket):
        self.watch.wait(bucket.request, bucket.describe, bucket.number, bucket.started_at)
        bucket.request = None
        self._inflight.remove(bucket)


# --------------------------------------------------------------------------
# GPU transports
# --------------------------------------------------------------------------
def make_transport(comm, rank, world_size, gpus_shared, choice=None, watch=None):
    """The transport named by ``choice`` ("nccl", "mpi-cuda-aware",
    "mpi-host-staged"), or the best one available when ``choice`` is None.
    ``gpus_shared``: some ranks of this host share a GPU, which NCCL refuses.
    ``watch``: the Context's deadlines (none when omitted)."""
    nccl = nccl_module()
    if choice is None:
        # Decided together: ranks that picked different transports would wait
        # for each other forever (hosts may differ in what they have).
        can = comm.allgather((nccl is not None and not gpus_shared, mpi_is_cuda_aware()))
        if all(c[0] for c in can):
            choice = "nccl"
        elif all(c[1] for c in can):
            choice = "mpi-cuda-aware"
        else:
            choice = "mpi-host-staged"
    if choice == "nccl":
        if nccl is None:
            raise RuntimeError("transport 'nccl' asked for, but this CuPy has no NCCL "
                               "(install the nvidia-nccl wheel for your CUDA version)")
        if gpus_shared:
            raise RuntimeError("more ranks than GPUs on this host: NCCL needs one GPU per rank; "
                               "start fewer ranks or use transport 'mpi-host-staged'")
        return NcclTransport(comm, rank, world_size, nccl, watch)
    if choice in ("mpi-cuda-aware", "mpi-host-staged"):
        return DeviceMPITransport(comm, cuda_aware=(choice == "mpi-cuda-aware"), watch=watch)
    raise ValueError(f"unknown GPU transport {choice!r}: use 'nccl', 'mpi-cuda-aware' "
                     "or 'mpi-host-staged'")


def nccl_module():
    """``cupy.cuda.nccl`` when CuPy was built with NCCL and can load it, else None."""
    nccl = backend.nccl()
    return nccl if getattr(nccl, "available", False) else None


def mpi_is_cuda_aware():
    """Whether the MPI library mpi4py uses accepts device pointers.

    Asks the library (``MPIX_Query_cuda_support``, in Open MPI and MPICH);
    MINITORCH_GX_CUDA_AWARE_MPI=0/1 overrides. The PyPI mpich wheel says no."""
    forced = os.environ.get("MINITORCH_GX_CUDA_AWARE_MPI")
    if forced in ("0", "1"):
        return forced == "1"
    from mpi4py import MPI
    try:
        lib = ctypes.CDLL(MPI.__file__)  # the extension's handle also finds libmpi's symbols
        query = lib.MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return False
    query.restype = ctypes.c_int
    return bool(query())


class NcclTransport:
    """Device buckets summed in place by ``ncclAllReduce`` on a side stream."""

    name = "nccl"

    def __init__(self, comm, rank, world_size, nccl, watch=None):
        self.nccl = nccl
        self.watch = watch if watch is not None else Watch(None)
        uid = nccl.get_unique_id() if rank == 0 else None
        uid = comm.bcast(uid, root=0)  # NCCL finds its peers through this id
        self.comm = nccl.NcclCommunicator(world_size, uid, rank)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self._types = {numpy.dtype(numpy.float16): nccl.NCCL_FLOAT16,
                       numpy.dtype(numpy.float32): nccl.NCCL_FLOAT32,
                       numpy.dtype(numpy.float64): nccl.NCCL_FLOAT64,
                       numpy.dtype(numpy.int32): nccl.NCCL_INT32,
                       numpy.dtype(numpy.int64): nccl.NCCL_INT64}

    def new_buffer(self, size, dtype, xp):
        if numpy.dtype(dtype) not in self._types:
            raise TypeError(f"NCCL cannot reduce {dtype} gradients")
        return cupy.zeros(size, dtype)

    def start(self, bucket):
        # Counted, so that the numbers of later MPI collectives match on every
        # rank; the host never waits for it, so it has no deadline.
        bucket.number, bucket.started_at = self.watch.enter(), time.monotonic()
        packed = cupy.cuda.Event(disable_timing=True)
        packed.record()                      # on the current stream, after pack()
        self.stream.wait_event(packed)
        flat = bucket.flat
        self.comm.allReduce(flat.data.ptr, flat.data.ptr, flat.size, self._types[flat.dtype],
                            self.nccl.NCCL_SUM, self.stream.ptr)
        bucket.request = cupy.cuda.Event(disable_timing=True)
        bucket.request.record(self.stream)

    def progress(self):
        pass  # NCCL runs by itself on the GPU

    def wait(self, bucket):
        cupy.cuda.get_current_stream().wait_event(bucket.request)
        bucket.request = None


class DeviceMPITransport:
    """Device buckets summed with ``MPI_Iallreduce``: on the device buffer when
    the MPI is CUDA-aware, else on a pinned host copy."""

    def __init__(self, comm, cuda_aware, watch=None):
        from mpi4py import MPI
        self.MPI, self.comm, self.cuda_aware = MPI, comm, cuda_aware
        self.watch = watch if watch is not None else Watch(None)
        self.name = "mpi-cuda-aware" if cuda_aware else "mpi-host-staged"
        self._waiting = deque()  # buckets whose copy/pack is queued on the GPU, in launch order
        self._inflight = []      # buckets handed to MPI, not yet waited for

    def new_buffer(self, size, dtype, xp):
        return cupy.zeros(size, dtype)

    @staticmethod
    def _host_buffer(bucket):
        """The bucket's pinned host copy (flat's shape), made on first use."""
        if getattr(bucket, "host", None) is None:
            flat = bucket.flat
            mem = cupy.cuda.alloc_pinned_memory(flat.nbytes)
            bucket.host = numpy.frombuffer(mem, flat.dtype, flat.size).reshape(flat.shape)
        return bucket.host

    def start(self, bucket):
        stream = cupy.cuda.get_current_stream()
        if not self.cuda_aware:
            _copy_async(self._host_buffer(bucket).ctypes.data, bucket.flat.data.ptr,
                        bucket.flat.nbytes, "DeviceToHost", stream)
        bucket.ready = cupy.cuda.Event(disable_timing=True)
        bucket.ready.record(stream)
        bucket.request = None
        self._waiting.append(bucket)
        self.progress()

    def _launch(self, bucket):
        buf = bucket.flat if self.cuda_aware else self._host_buffer(bucket)
        bucket.number, bucket.started_at = self.watch.enter(), time.monotonic()
        bucket.request = self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        self._inflight.append(bucket)

    def progress(self):
        # In order: MPI needs every rank to issue its collectives alike.
        while self._waiting and self._waiting[0].ready.done:
            self._launch(self._waiting.popleft())
        if self._inflight:  # MPICH advances non-blocking collectives only inside MPI calls
            self.MPI.Request.Testall([b.request for b in self._inflight])

    def wait(self, bucket):
        while bucket.request is None:  # not yet handed to MPI: its GPU work must finish first
            head = self._waiting.popleft()
            head.ready.synchronize()
            self._launch(head)
        self.watch.wait(bucket.request, bucket.describe, bucket.number, bucket.started_at)
        bucket.request = None
        self._inflight.remove(bucket)
        if not self.cuda_aware:
            _copy_async(bucket.flat.data.ptr, self._host_buffer(bucket).ctypes.data,
                        bucket.flat.nbytes, "HostToDevice", cupy.cuda.get_current_stream())


def _copy_async(dst, src, nbytes, kind, stream):
    """cudaMemcpyAsync between a device buffer and pinned host memory, queued on ``stream``."""
    runtime = cupy.cuda.runtime
    direction = {"DeviceToHost": runtime.memcpyDeviceToHost,
                 "HostToDevice": runtime.memcpyHostToDevice}[kind]
    runtime.memcpyAsync(dst, src, nbytes, direction, stream.ptr)
