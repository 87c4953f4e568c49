"""Launchers of ``kernels/subsample.cu``: the pixels a strided 1x1 convolution
reads (every sh-th row, every sw-th column), gathered once, and their
gradient put back in place; called by ``minitorch_gx.ops.conv``.
"""
import numpy

from .device import blocks as _blocks, check_size as _check_size
from .device import check_threads as _check_threads, defines as _defines, device_for
from .device import is_cnhw as _is_cnhw, pair as _pair, stored as _stored

_i32 = numpy.int32


def _launch(kernel, src, dst, h, w, p, q, sh, sw, rows):
    dev = device_for(src)
    threads = _check_threads("EW_THREADS", "subsample.cu")  # a warp per row
    _check_size(src=src, dst=dst)
    planes = src.shape[0] * src.shape[1]
    dev.launch("subsample.cu", kernel, (_blocks(planes * rows, threads // 32),), (threads,),
               [src, dst] + [_i32(v) for v in (planes, h, w, p, q, sh, sw)],
               defines=_defines(src.dtype, "EW_THREADS"))
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
    _launch("gather_pixels", x, xs, h, w, p, q, sh, sw, rows=p)
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
    _launch("scatter_pixels", gxs, gx, h, w, p, q, sh, sw, rows=h)
    return _stored(gx, cnhw)
