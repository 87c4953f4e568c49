"""Launchers of the element-wise kernels (``kernels/add_relu.cu``): the
residual add + ReLU that ends every bottleneck, and its backward; called by
``minitorch_gx.ops.basic``.
"""
import numpy

from .device import LAUNCH, blocks as _blocks, defines as _defines, device_for

_i64 = numpy.int64


def add_relu_forward(a, b):
    """max(a + b, 0) in one pass (a and b of one shape)."""
    dev, dtype = device_for(a), a.dtype
    if a.shape != b.shape:
        raise ValueError(f"add_relu: shapes {a.shape} and {b.shape} differ")
    a, b = dev.input(a, dtype), dev.input(b, dtype)
    y = dev.empty(a.shape, dtype)
    threads = LAUNCH["EW_THREADS"]
    dev.launch("add_relu.cu", "add_relu_fwd", (_blocks(a.size, threads),), (threads,),
               [a, b, y, _i64(a.size)], defines=_defines(dtype, "EW_THREADS"))
    dev.check_written(y)
    return y


def relu_backward(gy, y):
    """gy where y > 0, else 0: the gradient through ReLU (and through add_relu to a and b)."""
    dev, dtype = device_for(gy), gy.dtype
    gy, y = dev.input(gy, dtype), dev.input(y, dtype)
    gx = dev.empty(gy.shape, dtype)
    threads = LAUNCH["EW_THREADS"]
    dev.launch("add_relu.cu", "relu_bwd", (_blocks(gy.size, threads),), (threads,),
               [gy, y, gx, _i64(gy.size)], defines=_defines(dtype, "EW_THREADS"))
    dev.check_written(gx)
    return gx
