"""Launchers of the max-pooling kernels (``kernels/max_pool.cu``), called by
``minitorch_gx.ops.pool``.
"""
import numpy

from .device import LAUNCH, blocks as _blocks, check_size as _check_size
from .device import defines as _defines, device_for, pair as _pair

_i32 = numpy.int32


def _pool_geometry(x_shape, kernel_size, stride, padding):
    if len(x_shape) != 4:
        raise ValueError(f"pooling expects (N, C, H, W) input, got shape {tuple(x_shape)}")
    n, c, h, w = x_shape
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = (kh, kw) if stride is None else _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    if kh * kw > 255:
        raise ValueError(f"max_pool2d kernel keeps the winning tap in a byte: window {kh}x{kw} "
                         f"is too large")
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"padding {(ph, pw)} must be at most half the kernel {(kh, kw)}")
    p, q = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if p < 1 or q < 1:
        raise ValueError(f"max_pool2d: window {(kh, kw)} larger than the padded input {(h, w)}")
    return [n, c, h, w, p, q, kh, kw, sh, sw, ph, pw]


def max_pool2d_forward(x, kernel_size, stride, padding):
    """x (N, C, H, W) -> (y (N, C, P, Q), argmax uint8: the first winning tap i*kw+j)."""
    dev, dtype = device_for(x), x.dtype
    geo = _pool_geometry(x.shape, kernel_size, stride, padding)
    n, c, h, w, p, q = geo[:6]
    x = dev.input(x, dtype)
    y, argmax = dev.empty((n, c, p, q), dtype), dev.empty((n, c, p, q), numpy.uint8)
    _check_size(x=x, y=y)
    threads = LAUNCH["POOL_THREADS"]
    dev.launch("max_pool.cu", "max_pool2d_fwd", (_blocks(y.size, threads),), (threads,),
               [x, y, argmax] + [_i32(v) for v in geo], defines=_defines(dtype, "POOL_THREADS"))
    dev.check_written(y, argmax)
    return y, argmax


def max_pool2d_backward(gy, argmax, x_shape, kernel_size, stride, padding):
    """gx (N, C, H, W): gy routed back to each window's winning tap."""
    dev, dtype = device_for(gy), gy.dtype
    geo = _pool_geometry(tuple(x_shape), kernel_size, stride, padding)
    gy, argmax = dev.input(gy, dtype), dev.input(argmax, numpy.uint8)
    gx = dev.empty(tuple(x_shape), dtype)
    _check_size(gx=gx)
    threads = LAUNCH["POOL_THREADS"]
    dev.launch("max_pool.cu", "max_pool2d_bwd", (_blocks(gx.size, threads),), (threads,),
               [gy, argmax, gx] + [_i32(v) for v in geo], defines=_defines(dtype, "POOL_THREADS"))
    dev.check_written(gx)
    return gx
