"""Launchers of the element-wise kernels (``kernels/add_relu.cu``): the
residual add + ReLU that ends every bottleneck, and its backward; the sum of
two gradients; called by ``minitorch_gx.ops.basic``.
"""
import numpy

from .device import LAUNCH, blocks as _blocks, defines as _defines, device_for
from .device import is_cnhw as _is_cnhw, stored as _stored

_i64 = numpy.int64


def add_relu_forward(a, b):
    """max(a + b, 0) in one pass (a and b of one shape), in a's layout (NCHW or
    CNHW: element-wise, the kernel runs over the memory as it is)."""
    dev, dtype = device_for(a), a.dtype
    if a.shape != b.shape:
        raise ValueError(f"add_relu: shapes {a.shape} and {b.shape} differ")
    cnhw = _is_cnhw(a)
    a, b = dev.input(_stored(a, cnhw), dtype), dev.input(_stored(b, cnhw), dtype)
    y = dev.empty(a.shape, dtype)
    threads = LAUNCH["EW_THREADS"]
    dev.launch("add_relu.cu", "add_relu_fwd", (_blocks(a.size, threads),), (threads,),
               [a, b, y, _i64(a.size)], defines=_defines(dtype, "EW_THREADS"))
    dev.check_written(y)
    return _stored(y, cnhw)


def relu_backward(gy, y):
    """gy where y > 0, else 0: the gradient through ReLU (and through add_relu to
    a and b), in y's layout."""
    dev, dtype = device_for(gy), gy.dtype
    cnhw = _is_cnhw(y)
    gy, y = dev.input(_stored(gy, cnhw), dtype), dev.input(_stored(y, cnhw), dtype)
    gx = dev.empty(gy.shape, dtype)
    threads = LAUNCH["EW_THREADS"]
    dev.launch("add_relu.cu", "relu_bwd", (_blocks(gy.size, threads),), (threads,),
               [gy, y, gx, _i64(gy.size)], defines=_defines(dtype, "EW_THREADS"))
    dev.check_written(gx)
    return _stored(gx, cnhw)


def add(a, b):
    """a + b (one shape, one dtype) in one pass, in a's layout (NCHW or CNHW)."""
    dev, dtype = device_for(a), a.dtype
    if a.shape != b.shape or b.dtype != dtype:
        raise ValueError(f"add: {a.dtype} {a.shape} and {b.dtype} {b.shape} differ")
    cnhw = _is_cnhw(a)
    a, b = dev.input(_stored(a, cnhw), dtype), dev.input(_stored(b, cnhw), dtype)
    y = dev.empty(a.shape, dtype)
    threads = LAUNCH["EW_THREADS"]
    dev.launch("add_relu.cu", "add_arrays", (_blocks(a.size, threads),), (threads,),
               [a, b, y, _i64(a.size)], defines=_defines(dtype, "EW_THREADS"))
    dev.check_written(y)
    return _stored(y, cnhw)
