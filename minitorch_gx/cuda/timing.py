"""The measured time of each device operation of a GPU step: a pair of CUDA
events around every one of them.

    with timing.timed() as records:
        step()
    per_row = timing.milliseconds(records)   # {(kind, name): ms}

It brackets the same operations ``trace`` records, under the same names, so
that ``benchmarks/gpu_step.py`` can print the measured time of each row
beside its floor: every kernel launch (``CupyDevice.launch``), cuBLAS GEMM
(``cupy.matmul``), memset (``cupy.zeros``, ``CupyDevice.zero_fill``) and
host-to-device copy (``cupy.asarray`` of a NumPy array). An operation CuPy
runs by any other route is not bracketed; ``trace`` lists none in a training
step (tests/cuda/test_small_kernels.py). Events are recorded on the current
stream, and their pairs add a little time of their own: the step timed
without them is the figure to quote for the step.
"""
import collections
import contextlib

import numpy

from .. import backend
from . import device as cuda_device


@contextlib.contextmanager
def timed(event=None):
    """Inside, each device operation is bracketed by two events; yields the
    list of (kind, name, start, end) it fills. ``event``: the event class
    (``cupy.cuda.Event``; tests pass a stand-in)."""
    cupy, dev = backend.cupy, cuda_device.CUPY_DEVICE
    Event = event or cupy.cuda.Event
    records = []

    def bracketed(kind, name, run, *args, **kwargs):
        start = Event()
        start.record()
        out = run(*args, **kwargs)
        end = Event()
        end.record()
        records.append((kind, name, start, end))
        return out

    launch, zero_fill = dev.launch, dev.zero_fill
    matmul, zeros, asarray = cupy.matmul, cupy.zeros, cupy.asarray

    def timed_asarray(a, *args, **kwargs):
        if type(a) is numpy.ndarray:
            return bracketed("h2d", "host -> device copy", asarray, a, *args, **kwargs)
        return asarray(a, *args, **kwargs)

    dev.launch = lambda file, kernel, *a, **k: bracketed("kernel", kernel, launch, file, kernel,
                                                         *a, **k)
    dev.zero_fill = lambda a: bracketed("memset", "memset", zero_fill, a)
    cupy.matmul = lambda *a, **k: bracketed("gemm", "cuBLAS GEMM (matmul)", matmul, *a, **k)
    cupy.zeros = lambda *a, **k: bracketed("memset", "memset (zeros)", zeros, *a, **k)
    cupy.asarray = timed_asarray
    try:
        yield records
    finally:
        del dev.launch, dev.zero_fill  # back to the class's methods
        cupy.matmul, cupy.zeros, cupy.asarray = matmul, zeros, asarray


def milliseconds(records, elapsed=None):
    """{(kind, name): (count, total ms)} of ``records``; waits for the last
    event. ``elapsed(start, end)``: ms between two events
    (``cupy.cuda.get_elapsed_time``)."""
    elapsed = elapsed or backend.cupy.cuda.get_elapsed_time
    if records:
        records[-1][3].synchronize()
    rows = collections.OrderedDict()
    for kind, name, start, end in records:
        count, ms = rows.get((kind, name), (0, 0.0))
        rows[(kind, name)] = (count + 1, ms + elapsed(start, end))
    return rows
