"""Launcher of the fused SGD update (``kernels/sgd.cu``), called by
``minitorch_gx.optim.sgd``: one launch updates every parameter group.
"""
import numpy

from .. import backend
from .device import LAUNCH, blocks as _blocks, defines as _defines, device_for
from .device import inplace as _inplace, write_back as _write_back

_i32, _i64 = numpy.int32, numpy.int64


def sgd_momentum_update(p, g, buf, group_end, lrs, wds, momenta, skip=None):
    """One fused SGD step over flat buffers, in place on p and buf.

    p, g, buf: flat (n,) arrays of one dtype. group_end: int64 (G,), the end
    offset of each contiguous parameter group (the last is n); pass the small
    per-group tables as NumPy arrays, they are copied to the device. lrs, wds,
    momenta: (G,) each group's learning rate, weight decay, momentum (cast to
    the parameters' dtype). skip: None, or a one-element array (any dtype, on
    the device) that makes the launch change nothing when it is nonzero; the
    kernel reads it, so skipping needs no read-back to the host.
    """
    dev, dtype = device_for(p), p.dtype
    n = p.size
    if g.size != n or buf.size != n:
        raise ValueError(f"sgd: p, g and buf must have the same size, got {n}, {g.size}, "
                         f"{buf.size}")
    groups = len(group_end)
    if groups < 1 or not len(lrs) == len(wds) == len(momenta) == groups:
        raise ValueError("sgd: group_end, lrs, wds and momenta need one entry per group")
    if backend.get_array_module(group_end) is numpy and int(group_end[-1]) != n:
        # checked on the host only: reading a device array back would stall every step
        raise ValueError(f"sgd: the last group ends at {int(group_end[-1])}, the buffers hold {n}")
    group_end = dev.input(group_end, numpy.int64)
    lrs, wds, momenta = (dev.input(v, dtype) for v in (lrs, wds, momenta))
    pp, bb = _inplace(dev, p, dtype, "p"), _inplace(dev, buf, dtype, "buf")
    g = dev.input(g, dtype)
    skip = dev.zeros(1, dtype) if skip is None else dev.input(skip, dtype)
    if skip.size != 1:
        raise ValueError(f"sgd: skip must hold one element, it has {skip.size}")
    threads = LAUNCH["SGD_THREADS"]
    dev.launch("sgd.cu", "sgd_momentum_update", (_blocks(n, threads, 4096),), (threads,),
               [pp, g, bb, group_end, lrs, wds, momenta, skip, _i32(groups), _i64(n)],
               defines=_defines(dtype, "SGD_THREADS"))
    _write_back(p, pp)
    _write_back(buf, bb)


def count_nonfinite(g, loss):
    """How many values of the flat gradient ``g`` and the one-element ``loss``
    are NaN or infinite, as a 0-d array of g's dtype on its device (nothing is
    read back): one launch over g, after a one-element memset."""
    dev, dtype = device_for(g), g.dtype
    n = g.size
    if loss.size != 1:
        raise ValueError(f"count_nonfinite: loss must hold one value, it has {loss.size}")
    g, loss = dev.input(g.reshape(-1), dtype), dev.input(loss.reshape(1), dtype)
    flag = dev.zeros(1, dtype)
    threads = LAUNCH["SGD_THREADS"]
    dev.launch("sgd.cu", "count_nonfinite", (_blocks(max(n, 1), threads, 4096),), (threads,),
               [g, _i64(n), loss, flag], defines=_defines(dtype, "SGD_THREADS"))
    return flag.reshape(())
