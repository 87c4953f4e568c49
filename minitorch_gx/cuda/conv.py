"""Launchers of the grouped-convolution kernels: ``kernels/grouped_conv.cu``
(forward and input gradient, one implicit GEMM per group) and
``kernels/grouped_conv_bwd_weight.cu`` (weight gradient).

Each launcher takes arrays, checks shapes and dtypes, allocates its outputs
and launches; its signature is the one of the op step it implements in
``minitorch_gx.ops.conv``, which calls it directly. CuPy arrays run on the GPU,
NumPy arrays in the CPU emulator (``device_for`` picks): the same launch code.

1x1 convolutions with groups=1 (3.88 of ResNeXt50's 4.23 GMACs) are plain
matrix products: they go to cuBLAS through ``xp.matmul``/``xp.tensordot``
(NumPy's BLAS in the emulator). Every other convolution -- the grouped 3x3
convs, the 7x7 stem (an im2col buffer for it would take ~2 GB at batch 256)
and any grouped 1x1 -- runs our implicit-GEMM kernels. Kernels index with
32-bit ints; float32 is what the GPU trains in, float64 works too
(``-DREAL=double``), for gradient checks.
"""
import numpy

from .device import check_size as _check_size, check_threads as _check_threads
from .device import defines as _defines, device_for, pair as _pair
from .device import empty_planes as _empty_planes, is_cnhw as _is_cnhw, planes as _planes

GEMM_FOR_1X1 = True  # route groups=1 1x1 convolutions to cuBLAS (see the module docstring)
_i32 = numpy.int32


def _conv_geometry(x_shape, W_shape, stride, padding, groups):
    n, c, h, w = x_shape
    k, cg, r, s = W_shape
    (sh, sw), (ph, pw) = _pair(stride, "stride"), _pair(padding, "padding")
    if groups < 1 or c != cg * groups or k % groups:
        raise ValueError(f"conv2d: input channels {c} and filter shape {tuple(W_shape)} do not "
                         f"fit groups={groups} (need C = Cg * groups and K % groups == 0)")
    p, q = (h + 2 * ph - r) // sh + 1, (w + 2 * pw - s) // sw + 1
    if p < 1 or q < 1 or min(sh, sw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"conv2d: no output for input {tuple(x_shape)}, filter {r}x{s}, "
                         f"stride {(sh, sw)}, padding {(ph, pw)}")
    return (n, c, h, w, k, p, q, groups, r, s, sh, sw, ph, pw)


def _tile_rows(m):
    """BM of grouped_conv.cu: the smallest of 4, 8, 16, 32 covering m channels."""
    return min(32, max(4, 1 << (m - 1).bit_length()))


def _use_gemm(geo):
    n, c, h, w, k, p, q, groups, r, s, sh, sw, ph, pw = geo
    return GEMM_FOR_1X1 and groups == 1 and r == s == 1 and ph == pw == 0


def _conv_gemm_launch(kernel, src, W, dst, geo, rows, strides):
    dev = device_for(src)
    threads = _check_threads("CONV_THREADS", "grouped_conv.cu", 32, 256, powers_of_two=True)
    bm = _tile_rows(rows)
    bn = threads * 16 // bm
    n, c, h, w, k, p, q, groups = geo[:8]
    cols = n * (h * w if kernel.endswith("data") else p * q)
    grid = (-(-cols // bn), groups * -(-rows // bm))
    if grid[1] > 65535:
        raise ValueError(f"conv2d: {groups} groups is more than this kernel's grid allows")
    args = [src, W, dst] + [_i32(v) for v in geo] + [_i32(bm)] + [_i32(v) for v in strides]
    dev.launch("grouped_conv.cu", kernel, grid, (threads,), args,
               defines=_defines(src.dtype, "CONV_THREADS"))


def conv2d_forward(x, W, stride, padding, groups):
    """y (N, K, P, Q) = grouped convolution of x (N, C, H, W) with W (K, C/groups, R, S)."""
    dev = device_for(x)
    geo = _conv_geometry(x.shape, W.shape, stride, padding, groups)
    n, c, h, w, k, p, q, g, r, s, sh, sw = geo[:12]
    if _use_gemm(geo):
        xp = dev.xp
        if _is_cnhw(x):  # one GEMM, Y (K, N*P*Q) = W (K, C) X (C, N*P*Q), no copy at stride 1
            y = xp.matmul(W.reshape(k, c), _pixels(xp, x, sh, sw))
            return y.reshape(k, n, p, q).transpose(1, 0, 2, 3)
        xs = xp.ascontiguousarray(x[:, :, ::sh, ::sw]).reshape(n, c, p * q)
        return xp.matmul(W.reshape(k, c), xs).reshape(n, k, p, q)  # cuBLAS, batched over n
    dtype = x.dtype
    cnhw = _is_cnhw(x)
    x, xsn, xsc = _planes(dev, x, dtype)
    W = dev.input(W, dtype)
    y, y_memory, ysn, ysc = _empty_planes(dev, (n, k, p, q), dtype, cnhw)
    _check_size(x=x, y=y)
    _conv_gemm_launch("grouped_conv2d_fwd", x, W, y_memory, geo, k // g, (xsn, xsc, ysn, ysc))
    dev.check_written(y)
    return y


def conv2d_backward_data(gy, W, x_shape, stride, padding, groups):
    """gx (N, C, H, W): the gradient of conv2d_forward with respect to x."""
    dev = device_for(gy)
    geo = _conv_geometry(tuple(x_shape), W.shape, stride, padding, groups)
    n, c, h, w, k, p, q, g, r, s, sh, sw = geo[:12]
    if tuple(gy.shape) != (n, k, p, q):
        raise ValueError(f"conv2d backward: gy has shape {tuple(gy.shape)}, "
                         f"expected {(n, k, p, q)}")
    if _use_gemm(geo):
        xp = dev.xp
        if _is_cnhw(gy):  # one GEMM, GX (C, N*P*Q) = W^T (C, K) GY (K, N*P*Q)
            gxs = xp.matmul(W.reshape(k, c).T, _pixels(xp, gy, 1, 1))
            if sh == sw == 1:
                return gxs.reshape(c, n, h, w).transpose(1, 0, 2, 3)
            gx = xp.zeros((c, n, h, w), gy.dtype)
            gx[:, :, ::sh, ::sw] = gxs.reshape(c, n, p, q)  # where the strided filter read
            return gx.transpose(1, 0, 2, 3)
        gxs = xp.matmul(W.reshape(k, c).T, gy.reshape(n, k, p * q)).reshape(n, c, p, q)
        if sh == sw == 1:
            return gxs
        gx = xp.zeros((n, c, h, w), gy.dtype)
        gx[:, :, ::sh, ::sw] = gxs  # the positions the strided 1x1 filter read
        return gx
    dtype = gy.dtype
    cnhw = _is_cnhw(gy)
    gy, gysn, gysc = _planes(dev, gy, dtype)
    W = dev.input(W, dtype)
    gx, gx_memory, gxsn, gxsc = _empty_planes(dev, (n, c, h, w), dtype, cnhw)
    _check_size(gy=gy, gx=gx)
    _conv_gemm_launch("grouped_conv2d_bwd_data", gy, W, gx_memory, geo, c // g,
                      (gysn, gysc, gxsn, gxsc))
    dev.check_written(gx)
    return gx


WGRAD_KT, WGRAD_TAPS = 4, 9  # as KT and TAPS in grouped_conv_bwd_weight.cu


def conv2d_backward_weight(gy, x, W_shape, stride, padding, groups, out=None):
    """gW (K, C/groups, R, S): the gradient of conv2d_forward with respect to W.
    ``out``: a C-contiguous array of zeros of that shape to accumulate gW into
    (the parameter's own gradient, Function.grad_buffer), returned; else a new one."""
    dev = device_for(gy)
    geo = _conv_geometry(x.shape, tuple(W_shape), stride, padding, groups)
    n, c, h, w, k, p, q, g, r, s, sh, sw = geo[:12]
    if tuple(gy.shape) != (n, k, p, q):
        raise ValueError(f"conv2d backward: gy has shape {tuple(gy.shape)}, "
                         f"expected {(n, k, p, q)}")
    if out is not None and (tuple(out.shape) != tuple(W_shape) or out.dtype != gy.dtype
                            or not out.flags.c_contiguous):
        raise ValueError(f"conv2d backward: out must be C-contiguous {gy.dtype} "
                         f"{tuple(W_shape)}, got {out.dtype} {tuple(out.shape)}")
    if _use_gemm(geo):
        xp = dev.xp
        if _is_cnhw(gy) and _is_cnhw(x):  # one GEMM, GW (K, C) = GY (K, NPQ) X^T (NPQ, C)
            gW = xp.matmul(_pixels(xp, gy, 1, 1), _pixels(xp, x, sh, sw).T,
                           out=None if out is None else out.reshape(k, c))
            return out if out is not None else gW.reshape(k, c, 1, 1)
        xs = xp.ascontiguousarray(x[:, :, ::sh, ::sw]).reshape(n, c, p * q)
        gW = xp.tensordot(gy.reshape(n, k, p * q), xs, axes=([0, 2], [0, 2]))  # (K, C)
        gW = gW.reshape(k, c, 1, 1).astype(gy.dtype, copy=False)
        if out is None:
            return gW
        out[...] = gW
        return out
    dtype = gy.dtype
    gy, gysn, gysc = _planes(dev, gy, dtype)
    x, xsn, xsc = _planes(dev, x, dtype)
    gW = dev.zeros(tuple(W_shape), dtype) if out is None else out  # accumulated into
    _check_size(gy=gy, x=x)
    # red[TAPS][WGRAD_THREADS] of shared memory must fit in 48 KiB
    threads = _check_threads("WGRAD_THREADS", "grouped_conv_bwd_weight.cu",
                             most=min(1024, 48 * 1024 // (WGRAD_TAPS * gy.itemsize)))
    pieces = g * (c // g) * -(-(k // g) // WGRAD_KT) * -(-(r * s) // WGRAD_TAPS)
    pixels = n * p * q
    # Each thread should sum a few dozen pixels before the block's reduction,
    # but keep ~2 blocks per GPU core slot in flight when the pieces are few.
    splits = -(-pixels // (threads * 32))
    if pieces * splits < 1024:
        splits = max(splits, min(-(-pixels // (threads * 4)), -(-1024 // pieces)))
    splits = max(1, min(splits, 65535))
    dev.launch("grouped_conv_bwd_weight.cu", "grouped_conv2d_bwd_weight", (pieces, splits),
               (threads,), [gy, x, gW] + [_i32(v) for v in geo + (gysn, gysc, xsn, xsc)],
               defines=_defines(dtype, "WGRAD_THREADS"))
    return gW


def _pixels(xp, a, sh, sw):
    """A CNHW array as the (C, N*P*Q) matrix of its channels, taking every
    (sh, sw)-th pixel: a view at stride 1, a copy of the kept pixels otherwise."""
    memory = a.transpose(1, 0, 2, 3)  # (C, N, H, W), C-contiguous
    if sh != 1 or sw != 1:
        memory = xp.ascontiguousarray(memory[:, :, ::sh, ::sw])
    return memory.reshape(memory.shape[0], -1)
