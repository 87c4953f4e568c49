"""Launchers of ``kernels/linear.cu``: the classifier's bias, added after the
GEMM and summed for its gradient; called by ``minitorch_gx.ops.basic`` Linear.
"""
import numpy

from .device import LAUNCH, defines as _defines, device_for
from .device import inplace as _inplace, write_back as _write_back

_i32 = numpy.int32


def _matrix(a, name):
    if a.ndim != 2:
        raise ValueError(f"{name} must be a matrix (N, K), got shape {tuple(a.shape)}")
    if a.shape[0] > 65535:
        raise ValueError(f"{name}: at most 65535 rows per launch, got {a.shape[0]}")


def add_bias(y, b):
    """y[i, :] += b for every row i of a C-contiguous (N, K) y, in place; returns y."""
    dev = device_for(y)
    _matrix(y, "add_bias: y")
    n, k = y.shape
    if tuple(b.shape) != (k,):
        raise ValueError(f"add_bias: b must be ({k},), got {tuple(b.shape)}")
    b, yy = dev.input(b, y.dtype), _inplace(dev, y, y.dtype, "add_bias: y")
    threads = LAUNCH["EW_THREADS"]
    if n and k:
        dev.launch("linear.cu", "add_bias", (-(-k // threads), n), (threads,),
                   [yy, b, _i32(n), _i32(k)], defines=_defines(y.dtype, "EW_THREADS"))
    _write_back(y, yy)
    return y


def sum_columns(a, out=None, scale=1.0):
    """scale * a.sum(axis=0) of a (N, K), rows added in order; into ``out``
    (K,) when given (a parameter's gradient array), which is returned."""
    dev, dtype = device_for(a), a.dtype
    _matrix(a, "sum_columns: a")
    n, k = a.shape
    a = dev.input(a, dtype)
    if out is not None and tuple(out.shape) != (k,):
        raise ValueError(f"sum_columns: out must be ({k},), got {tuple(out.shape)}")
    written = dev.empty(k, dtype) if out is None else _inplace(dev, out, dtype, "sum_columns: out")
    threads = LAUNCH["EW_THREADS"]
    if k:
        dev.launch("linear.cu", "sum_columns", (-(-k // threads),), (threads,),
                   [a, written, _i32(n), _i32(k), dtype.type(scale)],
                   defines=_defines(dtype, "EW_THREADS"))
        dev.check_written(written)
    if out is None:
        return written
    _write_back(out, written)
    return out
