"""Launchers of the grouped-convolution kernels: ``kernels/grouped_conv.cu``
(forward and input gradient: each block convolves a tile of input rows held
in shared memory) and ``kernels/grouped_conv_bwd_weight.cu`` (weight gradient).
``_conv_plan`` and ``_wgrad_plan`` size their tiles and grids as the kernels'
headers describe.

Each launcher takes arrays, checks shapes and dtypes, allocates its outputs
and launches; its signature is the one of the op step it implements in
``minitorch_gx.ops.conv``, which calls it directly. CuPy arrays run on the GPU,
NumPy arrays in the CPU emulator (``device_for`` picks): the same launch code.

1x1 convolutions with groups=1 (3.88 of ResNeXt50's 4.23 GMACs) are plain
matrix products: they go to cuBLAS through ``xp.matmul``/``xp.tensordot``
(NumPy's BLAS in the emulator). Every other convolution -- the grouped 3x3
convs, the 7x7 stem (an im2col buffer for it would take ~2 GB at batch 256)
and any grouped 1x1 -- runs our kernels. Kernels index with
32-bit ints; float32 is what the GPU trains in, float64 works too
(``-DREAL=double``), for gradient checks.
"""
import functools

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


# --------------------------------------------------------------------------
# The shared-memory tiles of grouped_conv.cu and grouped_conv_bwd_weight.cu,
# as their headers describe them; the constants mirror the files' defaults.
# --------------------------------------------------------------------------
CONV_TN = 8                    # TN: pixels per thread
CONV_POOL_BYTES = 47 * 1024    # CONV_POOL_BYTES: input tile + weight tile
WGRAD_SUMS = 9                 # SUMS: combos summed per round at the end
WGRAD_BOX_MAX = 1024           # BOX_MAX: pixels per box
WGRAD_POOL_BYTES = 40 * 1024   # WGRAD_POOL_BYTES: gy tile + input tile
# The files' defaults of the defines the launchers may pass; a launch passes
# only those that differ, so that the usual builds are device.builds()'s.
# (Tests shrink the pools, to reach several chunks and column tiles.)
_FILE_DEFAULTS = {"CONV_TM": 8, "CONV_POOL_BYTES": 47 * 1024,
                  "WGRAD_TK": 8, "WGRAD_POOL_BYTES": 40 * 1024}


def _nondefault(**defines):
    return tuple((name, v) for name, v in defines.items() if v != _FILE_DEFAULTS[name])


def _axes(geo, backward):
    """Per phase, the (count, taps, step) of the rows and of the columns of the
    correlation a block computes (struct Axis of grouped_conv.cu)."""
    n, c, h, w, k, p, q, groups, r, s, sh, sw, ph, pw = geo
    if not backward:
        return [((p, r, sh), (q, s, sw))]

    def axis(size, taps, stride, pad, phase):
        r0 = (phase + pad) % stride
        count = -(-(size - phase) // stride) if size > phase else 0
        return count, -(-(taps - r0) // stride) if r0 < taps else 0, 1
    return [(axis(h, r, sh, ph, fh), axis(w, s, sw, pw, fw))
            for fh in range(sh) for fw in range(sw)]


def _tile_rows_needed(n, rows, cols, row_step, row_taps, box):
    """The most virtual rows (see grouped_conv.cu) a box of ``box`` consecutive
    pixels of an (n, rows, cols) output needs, over all boxes."""
    total = n * rows * cols
    first = numpy.arange(0, total, box, dtype=numpy.int64)
    last = numpy.minimum(first + box, total) - 1
    hv = (rows - 1) * row_step + row_taps

    def virtual_row(j):
        return j // (rows * cols) * hv + j // cols % rows * row_step
    return int((virtual_row(last) - virtual_row(first)).max()) + row_taps


def _column_tiles(widths_fit, most):
    """The fewest column tiles (1 .. most) for which ``widths_fit(tiles)``."""
    for tiles in range(1, most + 1):
        if widths_fit(tiles):
            return tiles
    raise ValueError("conv2d: the filter and its input rows do not fit in the kernels' shared "
                     "memory even one output column at a time")


def _tile_widths(count, tiles):
    """The widths of the column tiles of grouped_conv.cu: TQ = ceil(count / tiles)."""
    tq = -(-count // tiles)
    return {width for width in (min(tq, count - i * tq) for i in range(tiles)) if width > 0}


@functools.lru_cache(maxsize=512)
def _conv_plan(kernel, geo, rows, threads, itemsize, pool_bytes):
    """(BM, CONV_TM, grid) of grouped_conv.cu (see its header) for ``rows``
    output channels per group and a shared pool of ``pool_bytes``; memoized
    (a training step asks for the same few shapes every time)."""
    bm = _tile_rows(rows)
    tm = 4 if bm == 4 else 8
    bn = threads // (bm // tm) * CONV_TN           # pixels per block
    n, c, h, w, k, p, q, groups = geo[:8]
    pool = pool_bytes // itemsize
    phases = _axes(geo, kernel.endswith("data"))

    def fits(tiles):
        """Every block finds room for one channel of its input rows and its filter taps."""
        for (rcount, rtaps, rstep), (ccount, ctaps, cstep) in phases:
            if rcount == 0 or rtaps == 0 or ctaps == 0:
                continue  # (a phase no tap reaches: its blocks write zeros)
            for width in _tile_widths(ccount, tiles):
                pitch = _tile_rows_needed(n, rcount, width, rstep, rtaps, bn) * \
                    ((width - 1) * cstep + ctaps)
                if (pool - 3) // (pitch + rtaps * ctaps * bm) < 1:
                    return False
        return True
    ncol = _column_tiles(fits, max(1, max(cc for _, (cc, _, _) in phases)))
    pixels = max(n * rc * -(-cc // ncol) for (rc, _, _), (cc, _, _) in phases)
    grid = (max(1, -(-pixels // bn)), groups * -(-rows // bm), len(phases) * ncol)
    if grid[1] > 65535 or grid[2] > 65535:
        raise ValueError(f"conv2d: {groups} groups is more than this kernel's grid allows")
    return bm, tm, grid


def _conv_tile_launch(kernel, src, W, dst, geo, rows, strides):
    dev = device_for(src)
    threads = _check_threads("CONV_THREADS", "grouped_conv.cu", 32, 256, powers_of_two=True)
    bm, tm, grid = _conv_plan(kernel, geo, rows, threads, src.itemsize, CONV_POOL_BYTES)
    args = [src, W, dst] + [_i32(v) for v in geo] + [_i32(bm)] + [_i32(v) for v in strides]
    dev.launch("grouped_conv.cu", kernel, grid, (threads,), args,
               defines=tuple(sorted(_defines(src.dtype, "CONV_THREADS") + _nondefault(
                   CONV_TM=tm, CONV_POOL_BYTES=CONV_POOL_BYTES))))


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
    _conv_tile_launch("grouped_conv2d_fwd", x, W, y_memory, geo, k // g, (xsn, xsc, ysn, ysc))
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
    _conv_tile_launch("grouped_conv2d_bwd_data", gy, W, gx_memory, geo, c // g,
                      (gysn, gysc, gxsn, gxsc))
    dev.check_written(gx)
    return gx


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
    # the final sums (SUMS * 9/8 values per thread) reuse the shared pool
    threads = _check_threads("WGRAD_THREADS", "grouped_conv_bwd_weight.cu",
                             most=min(1024, WGRAD_POOL_BYTES * 8 // (WGRAD_SUMS * 9 * gy.itemsize)))
    grid, args, tk = _wgrad_plan(geo, threads, gy.itemsize, WGRAD_POOL_BYTES)
    dev.launch("grouped_conv_bwd_weight.cu", "grouped_conv2d_bwd_weight", grid, (threads,),
               [gy, x, gW] + [_i32(v) for v in geo + (gysn, gysc, xsn, xsc) + args],
               defines=tuple(sorted(_defines(dtype, "WGRAD_THREADS") + _nondefault(
                   WGRAD_TK=tk, WGRAD_POOL_BYTES=WGRAD_POOL_BYTES))))
    return gW


def _largest_divisor(n, most):
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


@functools.lru_cache(maxsize=512)
def _wgrad_plan(geo, threads, itemsize, pool_bytes):
    """(grid, (AGK, AGC, box, tile_rows), TK) of grouped_conv_bwd_weight.cu (see
    its header) with a shared pool of ``pool_bytes``; memoized."""
    n, c, h, w, k, p, q, groups, r, s, sh, sw, ph, pw = geo
    kg, cgrs, rs = k // groups, c // groups * r * s, r * s
    tk = 4 if kg <= 4 else 8
    tx = 72 // tk                                         # TX: combos per thread
    warps = threads // 32
    agk = _largest_divisor(warps, -(-kg // tk))           # thread groups along k ...
    agc = _largest_divisor(warps // agk, -(-cgrs // tx))  # ... and along the combos
    bk, nc = agk * tk, agc * tx
    gld = bk if bk // 4 % 2 else bk + 4                   # the gy tile's row
    ktiles, ctiles = -(-kg // bk), -(-cgrs // nc)
    # the most channels one piece's combos touch
    nch = max((min(ci + nc, cgrs) - 1) // rs - ci // rs + 1 for ci in range(0, cgrs, nc))
    pool = pool_bytes // itemsize

    def plan(tiles):
        """The largest box (pixels) whose tiles fit, and its tile_rows; None if none does."""
        box = WGRAD_BOX_MAX
        while box >= 32:
            rows_needed = [(_tile_rows_needed(n, p, width, sh, r, box), width)
                           for width in _tile_widths(q, tiles)]
            tile_rows = max(rows for rows, _ in rows_needed)
            if all(gld * box + nch * tile_rows * ((width - 1) * sw + s) <= pool
                   for width in _tile_widths(q, tiles)):
                return box, tile_rows
            box //= 2
        return None
    tiles = _column_tiles(lambda t: plan(t) is not None, q)
    box, tile_rows = plan(tiles)
    box = min(box, n * p * -(-q // tiles))                # (a small problem: one box)
    tile_rows = max(_tile_rows_needed(n, p, width, sh, r, box) for width in _tile_widths(q, tiles))
    pieces = groups * ktiles * ctiles
    boxes = -(-(n * p * -(-q // tiles)) // box)
    # Enough blocks to fill the GPU (~1024), but each lane should still sum
    # some 32 pixels or more before the block's final sums.
    lanes = threads // (agk * agc)
    most_splits = -(-boxes // -(-32 * lanes // box))
    splits = max(1, min(most_splits, -(-1024 // pieces), 65535))
    return (pieces, splits, tiles), (agk, agc, box, tile_rows), tk


def _pixels(xp, a, sh, sw):
    """A CNHW array as the (C, N*P*Q) matrix of its channels, taking every
    (sh, sw)-th pixel: a view at stride 1, a copy of the kept pixels otherwise."""
    memory = a.transpose(1, 0, 2, 3)  # (C, N, H, W), C-contiguous
    if sh != 1 or sw != 1:
        memory = xp.ascontiguousarray(memory[:, :, ::sh, ::sw])
    return memory.reshape(memory.shape[0], -1)
