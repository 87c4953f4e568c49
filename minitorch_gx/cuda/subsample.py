"""Launchers of ``kernels/subsample.cu``: the pixels a strided 1x1 convolution
reads (every sh-th row, every sw-th column), gathered once, and their
gradient put back in place, alone or added to another gradient; called by
``minitorch_gx.ops.conv``.
"""
import numpy

from .device import blocks as _blocks, check_size as _check_size
from .device import check_threads as _check_threads, defines as _defines, device_for
from .device import is_cnhw as _is_cnhw, pair as _pair, stored as _stored

_i32 = numpy.int32


def _launch(kernel, arrays, dst, h, w, p, q, sh, sw, rows):
    dev = device_for(dst)
    threads = _check_threads("EW_THREADS", "subsample.cu")  # a warp per row
    _check_size(dst=dst, **{f"array{i}": a for i, a in enumerate(arrays)})
    planes = dst.shape[0] * dst.shape[1]
    dev.launch("subsample.cu", kernel, (_blocks(planes * rows, threads // 32),), (threads,),
               [*arrays, dst] + [_i32(v) for v in (planes, h, w, p, q, sh, sw)],
               defines=_defines(dst.dtype, "EW_THREADS"))
    dev.check_written(dst)


def gather_pixels(x, stride):
    """x[:, :, ::sh, ::sw] of a logical (N, C, H, W) array, as a new array in
    x's memory layout (NCHW or CNHW)."""
    dev, dtype = device_for(x), x.dtype
    sh, sw = _pair(stride, "stride")
    cnhw = _is_cnhw(x)
    x = dev.input(_stored(x, cnhw), dtype)  # planes in memory order
    a, b, h, w = x.shape
    p, q = -(-h // sh), -(-w // sw)
    xs = dev.empty((a, b, p, q), dtype)
    _launch("gather_pixels", [x], xs, h, w, p, q, sh, sw, rows=p)
    return _stored(xs, cnhw)


def scatter_pixels(gxs, x_shape, stride):
    """The gradient of ``gather_pixels``: a (N, C, H, W) array holding gxs at
    every (sh, sw)-th pixel and 0 elsewhere, in gxs's memory layout, each
    element written once."""
    dev, dtype = device_for(gxs), gxs.dtype
    sh, sw = _pair(stride, "stride")
    n, c, h, w = x_shape
    p, q = -(-h // sh), -(-w // sw)
    if tuple(gxs.shape) != (n, c, p, q):
        raise ValueError(f"scatter_pixels: gradient {tuple(gxs.shape)} does not match input "
                         f"{tuple(x_shape)} with stride {(sh, sw)}")
    cnhw = _is_cnhw(gxs)
    gxs = dev.input(_stored(gxs, cnhw), dtype)
    gx = dev.empty(tuple(gxs.shape[:2]) + (h, w), dtype)
    _launch("scatter_pixels", [gxs], gx, h, w, p, q, sh, sw, rows=h)
    return _stored(gx, cnhw)


def add_scattered(a, gxs, stride):
    """a + scatter_pixels(gxs, a.shape, stride) in one pass, a new array in a's
    memory layout (gxs is brought to it)."""
    dev, dtype = device_for(a), a.dtype
    sh, sw = _pair(stride, "stride")
    n, c, h, w = a.shape
    p, q = -(-h // sh), -(-w // sw)
    if tuple(gxs.shape) != (n, c, p, q) or gxs.dtype != dtype:
        raise ValueError(f"add_scattered: gradient {gxs.dtype} {tuple(gxs.shape)} does not match "
                         f"{dtype} {tuple(a.shape)} with stride {(sh, sw)}")
    cnhw = _is_cnhw(a)
    a, gxs = dev.input(_stored(a, cnhw), dtype), dev.input(_stored(gxs, cnhw), dtype)
    out = dev.empty(a.shape, dtype)
    _launch("add_scattered", [a, gxs], out, h, w, p, q, sh, sw, rows=h)
    return _stored(out, cnhw)
