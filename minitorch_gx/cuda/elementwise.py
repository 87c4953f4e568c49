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
    if a.shape != b.shape:
        raise ValueError(f"add_relu: shapes {a.shape} and {b.shape} differ")
    return _launch("add_relu_fwd", a, b, layout_of=a)


def relu_backward(gy, y):
    """gy where y > 0, else 0: the gradient through ReLU (and through add_relu to
    a and b), in y's layout."""
    return _launch("relu_bwd", gy, y, layout_of=y)


def add(a, b):
    """a + b (one shape, one dtype) in one pass, in a's layout (NCHW or CNHW)."""
    if a.shape != b.shape or b.dtype != a.dtype:
        raise ValueError(f"add: {a.dtype} {a.shape} and {b.dtype} {b.shape} differ")
    return _launch("add_arrays", a, b, layout_of=a)


def _launch(kernel, a, b, layout_of):
    """One add_relu.cu kernel over the memory of a and b (both brought to the
    layout of ``layout_of``), writing a new array of a's dtype in that layout."""
    dev, dtype = device_for(a), a.dtype
    cnhw = _is_cnhw(layout_of)
    a, b = dev.input(_stored(a, cnhw), dtype), dev.input(_stored(b, cnhw), dtype)
    out = dev.empty(a.shape, dtype)
    threads = LAUNCH["EW_THREADS"]
    dev.launch("add_relu.cu", kernel, (_blocks(a.size, threads),), (threads,),
               [a, b, out, _i64(a.size)], defines=_defines(dtype, "EW_THREADS"))
    dev.check_written(out)
    return _stored(out, cnhw)
