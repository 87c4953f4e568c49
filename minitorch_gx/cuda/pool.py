"""Launchers of the pooling kernels, called by ``minitorch_gx.ops.pool``:
max pooling (``kernels/max_pool.cu``) and the global average pool
(``kernels/avg_pool.cu``).
"""
import numpy

from .device import LAUNCH, blocks as _blocks, check_size as _check_size
from .device import check_threads as _check_threads
from .device import defines as _defines, device_for, is_cnhw as _is_cnhw, pair as _pair
from .device import stored as _stored

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
    """x (N, C, H, W) -> (y (N, C, P, Q), argmax uint8: the first winning tap i*kw+j).
    The kernels see only planes: CNHW memory is pooled as it is (its (C, N)
    planes), and y and argmax come out in x's layout."""
    dev, dtype = device_for(x), x.dtype
    geo = _pool_geometry(x.shape, kernel_size, stride, padding)
    cnhw = _is_cnhw(x)
    x = dev.input(_stored(x, cnhw), dtype)  # planes in memory order
    geo[:2] = x.shape[:2]
    shape = tuple(x.shape[:2]) + tuple(geo[4:6])
    y, argmax = dev.empty(shape, dtype), dev.empty(shape, numpy.uint8)
    _check_size(x=x, y=y)
    threads = LAUNCH["POOL_THREADS"]
    dev.launch("max_pool.cu", "max_pool2d_fwd", (_blocks(y.size, threads),), (threads,),
               [x, y, argmax] + [_i32(v) for v in geo], defines=_defines(dtype, "POOL_THREADS"))
    dev.check_written(y, argmax)
    return _stored(y, cnhw), _stored(argmax, cnhw)


def max_pool2d_backward(gy, argmax, x_shape, kernel_size, stride, padding):
    """gx (N, C, H, W): gy routed back to each window's winning tap, in the
    layout of the forward's argmax (gy is brought to it)."""
    dev, dtype = device_for(gy), gy.dtype
    geo = _pool_geometry(tuple(x_shape), kernel_size, stride, padding)
    cnhw = _is_cnhw(argmax)
    gy = dev.input(_stored(gy, cnhw), dtype)
    argmax = dev.input(_stored(argmax, cnhw), numpy.uint8)
    geo[:2] = gy.shape[:2]
    gx = dev.empty(tuple(gy.shape[:2]) + tuple(x_shape[2:]), dtype)
    _check_size(gx=gx)
    threads = LAUNCH["POOL_THREADS"]
    dev.launch("max_pool.cu", "max_pool2d_bwd", (_blocks(gx.size, threads),), (threads,),
               [gy, argmax, gx] + [_i32(v) for v in geo], defines=_defines(dtype, "POOL_THREADS"))
    dev.check_written(gx)
    return _stored(gx, cnhw)


# --------------------------------------------------------------------------
# The global average pool (kernels/avg_pool.cu).
# --------------------------------------------------------------------------
def _avg_launch(kernel, src, dst, n, c, hw, cnhw):
    dev, dtype = device_for(src), src.dtype
    threads = _check_threads("POOL_THREADS", "avg_pool.cu")  # a warp per plane
    _check_size(src=src, dst=dst)
    dev.launch("avg_pool.cu", kernel, (_blocks(n * c, threads // 32),), (threads,),
               [src, dst, _i32(n), _i32(c), _i32(hw), _i32(int(cnhw)), dtype.type(1.0 / hw)],
               defines=_defines(dtype, "POOL_THREADS"))
    dev.check_written(dst)


def global_avg_pool_forward(x):
    """x (N, C, H, W) -> its mean over (H, W), (N, C, 1, 1), NCHW (the
    classifier's matrix) whatever x's layout."""
    dev, dtype = device_for(x), x.dtype
    if x.ndim != 4:
        raise ValueError(f"global_avg_pool: expected (N, C, H, W), got {tuple(x.shape)}")
    n, c, h, w = x.shape
    cnhw = _is_cnhw(x)
    memory = dev.input(_stored(x, cnhw), dtype)
    y = dev.empty((n, c, 1, 1), dtype)
    _avg_launch("global_avg_pool_fwd", memory, y, n, c, h * w, cnhw)
    return y


def global_avg_pool_backward(gy, x_shape, cnhw):
    """gx (N, C, H, W): gy (N, C, 1, 1) / (H W) spread over each plane, in CNHW
    memory when ``cnhw`` (the forward's input layout), else NCHW."""
    dev, dtype = device_for(gy), gy.dtype
    n, c, h, w = x_shape
    gy = dev.input(gy, dtype)
    gx = dev.empty((c, n, h, w) if cnhw else (n, c, h, w), dtype)
    _avg_launch("global_avg_pool_bwd", gy, gx, n, c, h * w, cnhw)
    return _stored(gx, cnhw)
