"""2-D convolution with stride, padding, groups and an optional bias.

Read top-down: ``conv2d`` and its Function ``Conv2d`` (forward, backward;
on the NumPy path a kernel larger than 1x1 computes gx and gW side by side,
one on each core: ``_side_by_side``);
the three array-level steps it is made of, ``conv2d_forward`` (y from x, W),
``conv2d_backward_data`` (gx from gy, W) and ``conv2d_backward_weight`` (gW
from gy, x), each choosing one of three implementations with
``backend.choose``; then those implementations:
  - ``*_reference``: im2col + one matmul per group, the specification;
  - the NumPy fast path, in the input's memory layout (NCHW, or CNHW: the
    layout train.py's activations take, as on the GPU): 1x1 convolutions are
    matmuls over channels, on CNHW one GEMM over the whole batch; grouped
    convolutions on CNHW maps of 7x7 or less with >= 8 outputs per group,
    the strided ones, and the stem, are one im2col GEMM per group over the
    whole batch ("folded"; a strided im2col is read from x's stride phases,
    each tap one shifted copy); on maps of at most half the kernel's taps
    (3x3 kernels on 2x2 maps) each group's convolution is one dense matrix
    from a whole image to its outputs, one GEMM per group over the batch
    with no im2col ("whole map"); other kernels are lowered along
    the width only and finished with one matmul per kernel row over
    row-shifted views (MEC, Cho & Brand, ICML 2017), chunk by chunk of the
    batch so the lowered block stays in cache;
  - the CUDA kernels, through their launchers in ``minitorch_gx.cuda.conv``
    (``kernels/grouped_conv.cu``, ``kernels/grouped_conv_bwd_weight.cu``).
"""
import threading

import numpy

from .. import backend, cpu
from ..autograd import Function, LazyGradient
from ..cuda import conv as cuda_conv
from ..cuda import subsample as cuda_subsample
from ..cuda.device import in_layout as _in_layout, is_cnhw as _is_cnhw
from ..cuda.device import new_in_layout, stored as _stored

# --------------------------------------------------------------------------
# Grouped convolution, the shape names used below (Chainer's legend):
#   N        batch size
#   C, H, W  input channels, height, width
#   G        groups; iCg = C / G input and oCg = K / G output channels per group
#   K        output channels
#   R, S     kernel height, width
#   P, Q     output height, width: P = (H + 2 * pad_h - R) // stride_h + 1
# Weights are (K, iCg, R, S); output channel k of group g = k // oCg sees only
# the input channels g * iCg ... (g + 1) * iCg - 1:
#   y[n, k, p, q] = sum_{i, r, s} W[k, i, r, s]
#                   * x[n, g * iCg + i, p * stride_h + r - pad_h, q * stride_w + s - pad_w]
# with x taken as 0 outside the image.
# --------------------------------------------------------------------------


def _pair(v):
    return (int(v), int(v)) if numpy.isscalar(v) else (int(v[0]), int(v[1]))


def _own_layout(a):
    """a itself when its memory is C-contiguous NCHW or CNHW, else an NCHW copy."""
    xp = backend.get_array_module(a)
    return a if a.flags.c_contiguous or _is_cnhw(a) else xp.ascontiguousarray(a)


def _view_as(a, shape):
    """a reshaped to ``shape`` as a view of the same memory: raises where
    that is impossible rather than copying (writes into it must land in a)."""
    v = a.view()
    v.shape = shape
    return v


def output_size(H, W, R, S, stride, padding):
    """(P, Q) of a convolution; stride and padding are (h, w) pairs."""
    P = (H + 2 * padding[0] - R) // stride[0] + 1
    Q = (W + 2 * padding[1] - S) // stride[1] + 1
    return P, Q


# ==========================================================================
# The op: conv2d and its Function.
# ==========================================================================

def conv2d(x, W, b=None, stride=1, padding=0, groups=1):
    """2-D cross-correlation, as ``torch.nn.functional.conv2d``.

    x: (N, C, H, W) input.        W: (K, C / groups, R, S) weight.
    b: (K,) bias or None.         stride, padding: int or (h, w) pair.
    groups: C and K are split into ``groups`` equal parts; output group g
    sees only input group g (ResNeXt's cardinality, 32).
    Returns y (N, K, P, Q), P = (H + 2 pad_h - R) // stride_h + 1, Q likewise:
      y[n, k, p, q] = b[k] + sum_{i, r, s} W[k, i, r, s]
                      * x[n, g iCg + i, p stride_h + r - pad_h, q stride_w + s - pad_w]
    with g = k // (K / groups), iCg = C / groups and x zero outside the image.
    """
    _check(x, W, b, _pair(stride), _pair(padding), groups)
    f = Conv2d(stride, padding, groups)
    return f(x, W) if b is None else f(x, W, b)


class Conv2d(Function):
    """y = conv(x, W) + b; inputs (x, W) or (x, W, b)."""

    def __init__(self, stride=1, padding=0, groups=1):
        self.stride, self.padding, self.groups = _pair(stride), _pair(padding), int(groups)

    def forward(self, x, W, b=None):
        self.x_shape, self.W = x.shape, W  # gx needs W
        stride = self.stride
        if W.shape[2:] == (1, 1) and self.padding == (0, 0) and stride != (1, 1):
            # a strided 1x1 filter reads every sh-th row and sw-th column only:
            # gather those pixels once, here, and run a stride-1 filter on them
            # in both directions (gW reads the same gathered pixels)
            x, stride = _every_other_pixel(x, stride), (1, 1)
        self.x, self.run_stride = x, stride  # gW needs x (as gathered)
        y = conv2d_forward(x, W, stride, self.padding, self.groups)
        if b is not None:
            y += b.reshape(1, -1, 1, 1)                                 # b as (1, K, 1, 1)
        return y

    def backward(self, gy):
        x_in, W_in = self.inputs[0], self.inputs[1]
        args = (self.run_stride, self.padding, self.groups)
        # The network's input image needs no gradient: skip the stem's gx.
        need_gx = x_in.requires_grad or x_in.creator is not None
        need_gW = W_in.requires_grad or W_in.creator is not None
        out = self.grad_buffer(1)  # W's own gradient array when it awaits its first (no copy after)

        def data():
            return conv2d_backward_data(gy, self.W, self.x.shape, *args)

        def weight():
            return conv2d_backward_weight(gy, self.x, self.W.shape, *args, out=out)

        if need_gx and need_gW and _side_by_side(gy, self.W):
            gx, gW = cpu.side_by_side(data, weight)
        else:
            gx, gW = data() if need_gx else None, weight() if need_gW else None
        if gx is not None and self.x.shape != self.x_shape:
            gx = _StridedGradient(gx, self.x_shape, self.stride)  # the gathered pixels' gradient,
            #                                                       put back in place when needed
        if len(self.inputs) == 3:
            return gx, gW, gy.sum(axis=(0, 2, 3))
        return gx, gW


# A kernel larger than 1x1 on the NumPy fast path computes gx and gW side
# by side, gW on a second core (``cpu.side_by_side``): the two read gy, W
# and x and write only their own results, and each runs as a block does
# (its GEMMs on one BLAS thread), so the bits depend neither on which
# finishes first nor on the thread count (with one thread they run in
# turn, the same way). Their blocks are mostly small GEMMs and copies, and
# one after the other, each on one core then, they left the other idle. Whole
# training steps inside ``cpu.cores_awake``, side by side and in turn
# alternating in one process (benchmarks/bench_side_by_side.py), the
# backward of ResNeXt's kernels larger than 1x1 took, medians:
#   batch 32, 64x64:   157.0 against 184.3 ms (faster in 10 of 12 rounds);
#   batch 16, 224x224: 489.8 against 618.1 ms (faster in 5 of 5);
# and against the two in turn with each one's blocks split over the
# threads (THREADED_MIN_MACS): 133.4 against 152.5 ms (7 of 10) and 428.9
# against 455.5 ms (3 of 5).
# 1x1 convolutions stay in turn: their GEMMs already use both cores
# through OpenBLAS's threads; side by side, each on one BLAS thread, their
# backward took 372.0 against 367.8 ms at 64x64 (faster in 5 of 10; --with-1x1).
def _side_by_side(gy, W):
    """Whether Conv2d.backward runs gx and gW side by side (see above)."""
    fast = backend.choose(gy, reference=False, fast=True, kernel=False)
    return fast and backend.get_array_module(gy) is numpy and W.shape[2:] != (1, 1)


def _every_other_pixel(x, stride):
    """x[:, :, ::sh, ::sw] as a new array in x's memory layout (NCHW or CNHW)."""
    xp = backend.get_array_module(x)
    if backend.use_kernels(xp):  # one launch (kernels/subsample.cu)
        return cuda_subsample.gather_pixels(x, stride)
    sh, sw = stride
    return _in_layout(x[:, :, ::sh, ::sw], _is_cnhw(x))


def _scatter_pixels(gxs, x_shape, stride):
    """The gradient of ``_every_other_pixel``: gxs at every (sh, sw)-th pixel, zeros
    elsewhere, in gxs's memory layout."""
    xp = backend.get_array_module(gxs)
    if backend.use_kernels(xp):  # one launch writing values and zeros together
        return cuda_subsample.scatter_pixels(gxs, x_shape, stride)
    sh, sw = stride
    gx = new_in_layout(xp, x_shape, gxs.dtype, _is_cnhw(gxs), zeros=True)
    gx[:, :, ::sh, ::sw] = gxs
    return gx


class _StridedGradient(LazyGradient):
    """The input gradient of a strided 1x1 convolution: gxs at every (sh, sw)-th
    pixel of x, zero elsewhere, kept as gxs. Joined to the input's other
    gradient (a ResNeXt downsample's input also feeds the block's conv1) in
    one pass, with no zero-filled full-size array made."""

    def __init__(self, gxs, x_shape, stride):
        self.gxs, self.x_shape, self.stride = gxs, x_shape, stride

    def dense(self):
        return _scatter_pixels(self.gxs, self.x_shape, self.stride)

    def added_to(self, a):
        xp = backend.get_array_module(a)
        if backend.use_kernels(xp):  # one launch (kernels/subsample.cu add_scattered)
            return cuda_subsample.add_scattered(a, self.gxs, self.stride)
        out = xp.array(a, order="K", dtype=numpy.result_type(a, self.gxs))  # a's layout
        sh, sw = self.stride
        out[:, :, ::sh, ::sw] += self.gxs
        return out


def _check(x, W, b, stride, padding, groups):
    """Raise one ValueError saying what does not fit."""
    problem = None
    if len(x.shape) != 4 or len(W.shape) != 4:
        problem = "x must be (N, C, H, W) and W (K, C/groups, R, S)"
    elif groups < 1 or x.shape[1] % groups or W.shape[0] % groups:
        problem = f"input channels {x.shape[1]} and output channels {W.shape[0]} " \
                  f"must both be divisible by groups={groups}"
    elif W.shape[1] != x.shape[1] // groups:
        problem = f"W has {W.shape[1]} input channels per group, x gives " \
                  f"{x.shape[1]} / groups={groups} = {x.shape[1] // groups}"
    elif b is not None and tuple(b.shape) != (W.shape[0],):
        problem = f"bias must be ({W.shape[0]},), got {tuple(b.shape)}"
    elif min(stride) < 1 or min(padding) < 0:
        problem = f"stride must be >= 1 and padding >= 0, got stride={stride} padding={padding}"
    elif min(output_size(x.shape[2], x.shape[3], W.shape[2], W.shape[3], stride, padding)) < 1:
        problem = "the kernel is larger than the padded input"
    elif x.dtype != W.dtype or (b is not None and b.dtype != W.dtype):
        problem = f"x, W (and b) must share one dtype, got x {x.dtype}, W {W.dtype}" + \
                  ("" if b is None else f", b {b.dtype}")
    if problem:
        raise ValueError(f"conv2d: x {tuple(x.shape)}, W {tuple(W.shape)}, groups={groups}, "
                         f"stride={stride}, padding={padding}: {problem}")


# ==========================================================================
# The array-level steps: reference, NumPy fast path or CUDA kernel.
# ==========================================================================

def conv2d_forward(x, W, stride, padding, groups):
    """y (N, K, P, Q) from x (N, C, H, W) and W (K, C/groups, R, S); no bias."""
    impl = backend.choose(x, reference=conv2d_forward_reference, fast=_forward_fast,
                          kernel=cuda_conv.conv2d_forward)
    return impl(x, W, stride, padding, groups)


def conv2d_backward_data(gy, W, x_shape, stride, padding, groups):
    """gx (N, C, H, W) from gy (N, K, P, Q) and W."""
    impl = backend.choose(gy, reference=conv2d_backward_data_reference, fast=_backward_data_fast,
                          kernel=cuda_conv.conv2d_backward_data)
    return impl(gy, W, x_shape, stride, padding, groups)


def conv2d_backward_weight(gy, x, W_shape, stride, padding, groups, out=None):
    """gW (K, C/groups, R, S) from gy (N, K, P, Q) and x. ``out``: zeros of
    gW's shape to put it in (and return), e.g. W's own gradient array."""
    impl = backend.choose(gy, reference=_written_into(conv2d_backward_weight_reference),
                          fast=_backward_weight_fast,  # (a 1x1's GEMM writes into out itself)
                          kernel=cuda_conv.conv2d_backward_weight)  # accumulates into out itself
    return impl(gy, x, W_shape, stride, padding, groups, out=out)


def _written_into(step):
    """``step`` taking ``out=``: its result copied into ``out`` when given, and returned."""
    def step_into(*args, out=None):
        result = step(*args)
        if out is None:
            return result
        out[...] = result
        return out
    return step_into


# ==========================================================================
# Reference: im2col + one matmul per group. Simple, slow, the specification.
# ==========================================================================

def _im2col(x, R, S, stride, padding, P, Q):
    """cols[n, c, r, s, p, q] = x[n, c, p * sh + r - ph, q * sw + s - pw] (0 outside)."""
    xp = backend.get_array_module(x)
    (sh, sw), (ph, pw) = stride, padding
    x_pad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = xp.empty(x.shape[:2] + (R, S, P, Q), x.dtype)  # (N, C, R, S, P, Q)
    for r in range(R):
        for s in range(S):
            cols[:, :, r, s] = x_pad[:, :, r:r + sh * P:sh, s:s + sw * Q:sw]
    return cols


def _col2im(cols, x_shape, stride, padding):
    """The adjoint of _im2col: add every cols entry back where it was read from."""
    xp = backend.get_array_module(cols)
    N, C, R, S, P, Q = cols.shape
    (sh, sw), (ph, pw) = stride, padding
    H, W = x_shape[2:]
    # room for the last window even when it overhangs the padded image
    x_pad = xp.zeros((N, C, max(H + 2 * ph, sh * P + R), max(W + 2 * pw, sw * Q + S)), cols.dtype)
    for r in range(R):
        for s in range(S):
            x_pad[:, :, r:r + sh * P:sh, s:s + sw * Q:sw] += cols[:, :, r, s]
    return x_pad[:, :, ph:ph + H, pw:pw + W]


def conv2d_forward_reference(x, W, stride, padding, groups):
    """y (N, K, P, Q) = conv(x (N, C, H, W), W (K, C/groups, R, S)), no bias."""
    xp = backend.get_array_module(x)
    stride, padding, G = _pair(stride), _pair(padding), groups
    N, C, H, Wd = x.shape
    K, iCg, R, S = W.shape
    P, Q = output_size(H, Wd, R, S, stride, padding)
    cols = _im2col(x, R, S, stride, padding, P, Q)          # (N, C, R, S, P, Q)
    cols = cols.reshape(N, G, iCg * R * S, P * Q)           # (N, G, iCg*R*S, P*Q)
    Wg = W.reshape(G, K // G, iCg * R * S)                  # (G, oCg, iCg*R*S)
    y = xp.matmul(Wg, cols)                                 # (N, G, oCg, P*Q)
    return y.reshape(N, K, P, Q)                            # (N, K, P, Q)


def conv2d_backward_data_reference(gy, W, x_shape, stride, padding, groups):
    """gx (N, C, H, W) from gy (N, K, P, Q): W^T times gy, then col2im."""
    xp = backend.get_array_module(gy)
    stride, padding, G = _pair(stride), _pair(padding), groups
    N, K, P, Q = gy.shape
    _, iCg, R, S = W.shape
    Wg_t = W.reshape(G, K // G, iCg * R * S).transpose(0, 2, 1)          # (G, iCg*R*S, oCg)
    gcols = xp.matmul(Wg_t, gy.reshape(N, G, K // G, P * Q))            # (N, G, iCg*R*S, P*Q)
    gcols = gcols.reshape(N, G * iCg, R, S, P, Q)                       # (N, C, R, S, P, Q)
    return _col2im(gcols, x_shape, stride, padding)


def conv2d_backward_weight_reference(gy, x, W_shape, stride, padding, groups):
    """gW (K, C/groups, R, S) = sum over n, p, q of gy times the matching x window."""
    xp = backend.get_array_module(gy)
    stride, padding, G = _pair(stride), _pair(padding), groups
    N, K, P, Q = gy.shape
    _, iCg, R, S = W_shape
    cols = _im2col(x, R, S, stride, padding, P, Q)          # (N, C, R, S, P, Q)
    cols = cols.reshape(N, G, iCg * R * S, P * Q)           # (N, G, iCg*R*S, P*Q)
    gyg = gy.reshape(N, G, K // G, P * Q)                                # (N, G, oCg, P*Q)
    gW = xp.matmul(gyg, cols.transpose(0, 1, 3, 2)).sum(axis=0)         # (G, oCg, iCg*R*S)
    return gW.reshape(W_shape)                              # (K, iCg, R, S)


# ==========================================================================
# Fast path.
#
# 1x1 kernels: y[n] = W @ x[n] with x[n] seen as (C, H*W), one matmul per
# image and group reading x in place (a stride first copies every stride-th
# row and column; tiny maps fold the batch into the pixels, see THIN_PIXELS).
#
# Other kernels, lowering along the width only (MEC). For every column tap s
# and every row phase f (the rows h = h2 * stride_h + f, so that a strided
# kernel still sees contiguous memory) the lowered block holds
#   low[n, c, s, f, h2, q] = x[n, c, h2 * stride_h + f - pad_h, q * stride_w + s - pad_w]
# which is S (not R * S) times the input. Kernel row r then reads phase
# f = r % stride_h starting at row h2 = r // stride_h, and within one group the
# rows (i, s) of that view are equally spaced in memory, so
#   y[n, g] += W[g, :, :, r, :] (oCg, iCg*S) @ low[n, g, (i, s), f, h2.., :] (iCg*S, P*Q)
# is one plain matmul per (n, g, r) that BLAS reads in place. gW uses the same
# views (gy @ view^T). gx of a stride-1 convolution is a stride-1 convolution
# of gy with the flipped kernel; with a stride, W^T @ gy fills a lowered
# gradient that is added back where the forward read it.
# ==========================================================================

# The batch is handled in chunks whose lowered block is about this size: small
# enough to stay in cache between the copy that writes it and the matmuls that
# read it (measured on a 1 MiB-L2 / 32 MiB-L3 CPU; see benchmarks/bench_conv.py).
CHUNK_BYTES = 2 << 20

_scratch_buffers = {}  # (thread id, name) -> flat uint8 buffer; see release_scratch


def _scratch(name, shape, dtype, xp):
    """A reusable, uninitialised buffer per (thread, name): the lowered blocks
    are rewritten for every chunk, and fresh large arrays cost page faults."""
    if xp is not numpy:
        return xp.empty(shape, dtype)  # CuPy's memory pool already reuses blocks
    dtype = numpy.dtype(dtype)
    nbytes = int(numpy.prod(shape)) * dtype.itemsize
    key = (threading.get_ident(), name)
    buf = _scratch_buffers.get(key)
    if buf is None or buf.nbytes < nbytes:
        buf = _scratch_buffers[key] = numpy.empty(nbytes, numpy.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


def release_scratch():
    """Free the reusable buffers (they are kept between calls)."""
    _scratch_buffers.clear()


def _map_chunks(fn, g, itemsize, xp):
    """[fn(n0, m) for each chunk x[n0:n0 + m] of the batch], in order. The
    chunks depend only on the sizes; they run over the NumPy path's threads
    in fixed blocks (``minitorch_gx.cpu``), each thread with its own scratch
    buffers, each chunk writing only its own images (or returning a partial
    sum, added in chunk order by the caller): the result is the same bits
    whatever the thread count."""
    if xp is not numpy:  # a GPU takes the whole batch at once
        return [fn(0, g.N)]
    per_image = g.C * g.S * g.phases * g.H2 * g.Q * itemsize
    n = max(1, min(g.N, CHUNK_BYTES // per_image))
    chunks = [(n0, min(n, g.N - n0)) for n0 in range(0, g.N, n)]
    parts = _run_blocks(lambda a, b: [fn(*chunks[i]) for i in range(a, b)], len(chunks), g)
    return [result for part in parts for result in part]


# A convolution of at least THREADED_MIN_MACS multiply-adds splits its
# blocks (the chunks of images above, the folded path's blocks of groups
# and images below) over the threads, each block's GEMMs on one BLAS
# thread. In a backward the input and weight gradients run side by side,
# one on each core (``_side_by_side``), and the blocks inside each run in
# place; so what this splits is the forward, and a weight gradient computed
# alone (the stem's: the image needs no gradient). Whole training steps,
# every convolution's blocks split and none, alternating in ABBA rounds in
# one process (benchmarks/bench_conv_threads.py), the forward of the
# grouped convolutions and of the stem took, medians:
#   batch 32, 64x64:   67.2 against 79.3 ms (faster in 10 of 12 rounds),
#                      13.3 against 14.9 (9 of 12);
#   batch 16, 224x224: 167.3 against 252.2 ms (4 of 4), 51.6 against 82.3 (4 of 4);
#   the demo's resnext_mini, batch 32, 48x48: 4.5 against 4.4 ms (25 of 60),
#                      3.0 against 3.6 (41 of 60), and its whole step 71
#                      against 65 ms (faster in 33 of 100 rounds).
# Hence the bound: the demo's grouped convolutions (5 to 9M multiply-adds
# there) stay on the calling thread, and with it its step took 68 against
# 65 ms (49 of 100: no difference). ResNeXt50's have 37.7M at batch 32,
# 64x64. (Before, only blocks whose GEMMs had 8M multiply-adds or more were
# split: of ResNeXt50's convolutions, the stem's.)
THREADED_MIN_MACS = 1 << 24


def _run_blocks(fn, n, g):
    """cpu.run_blocks over the n blocks of convolution g, split over the
    threads when g has THREADED_MIN_MACS multiply-adds or more."""
    return cpu.run_blocks(fn, n, min_rows=1 if g.macs >= THREADED_MIN_MACS else n)


class _Geometry:
    """Every size of one convolution, named as in the legend above."""

    def __init__(self, x_shape, W_shape, stride, padding, groups):
        self.N, self.C, self.H, self.W = x_shape
        self.K, self.iCg, self.R, self.S = W_shape
        self.G, self.oCg = groups, self.K // groups
        (self.sh, self.sw), (self.ph, self.pw) = _pair(stride), _pair(padding)
        self.P, self.Q = output_size(self.H, self.W, self.R, self.S, (self.sh, self.sw),
                                     (self.ph, self.pw))
        self.phases = min(self.sh, self.R)             # row phases some kernel row reads
        self.H2 = self.P + (self.R - 1) // self.sh     # rows kept per phase
        self.macs = self.N * self.K * self.P * self.Q * self.iCg * self.R * self.S

    def is_pointwise(self):
        return self.R == self.S == 1 and self.ph == self.pw == 0

    def lowered_shape(self, n):
        return (n, self.C, self.S, self.phases, self.H2, self.Q)

    def row_view(self, low, r):
        """Rows (i, s) of kernel row r, per group: (n, G, iCg*S, P*Q), a strided view."""
        n = low.shape[0]
        low = low.reshape(n, self.G, self.iCg * self.S, self.phases, self.H2 * self.Q)
        # (n, G, iCg*S, phases, H2*Q): the rows (i, s) are equally spaced
        start = (r // self.sh) * self.Q
        return low[:, :, :, r % self.sh, start:start + self.P * self.Q]


def _valid(n_out, offset, stride, n_in):
    """Output indices i in [lo, hi) whose input index i * stride + offset is in
    [0, n_in), and the slice of those input indices."""
    lo = max(0, -(offset // stride))
    hi = max(lo, min(n_out, (n_in - 1 - offset) // stride + 1))
    return lo, hi, slice(lo * stride + offset, (hi - 1) * stride + offset + 1, stride)


def _lowered_windows(g):
    """For each (s, f): the destination rows/cols of low[:, :, s, f] that lie
    inside the image, and the matching strided slices of x."""
    for s in range(g.S):
        q0, q1, cols = _valid(g.Q, s - g.pw, g.sw, g.W)
        for f in range(g.phases):
            h0, h1, rows = _valid(g.H2, f - g.ph, g.sh, g.H)
            yield s, f, (h0, h1, q0, q1), (rows, cols)


def _lower(x, g, low):
    """Fill low (n, C, S, phases, H2, Q) from the chunk x (n, C, H, W); 0 for padding."""
    if _shifts_along_rows(x, g):
        return _lower_by_shifts(x, g, low)
    for s, f, (h0, h1, q0, q1), (rows, cols) in _lowered_windows(g):
        dst = low[:, :, s, f]                            # (n, C, H2, Q)
        if h1 > h0 and q1 > q0:
            dst[:, :, h0:h1, q0:q1] = x[:, :, rows, cols]
        _zero_outside(dst, h0, h1, q0, q1)


def _shifts_along_rows(x, g):
    """A stride-1 convolution whose output rows are as wide as the input's
    (ResNeXt's 3x3 with padding 1), on contiguous planes (NCHW or CNHW
    memory): then tap s of low is x itself, moved by whole rows and by
    s - pw elements."""
    return (g.sh == g.sw == 1 and g.Q == g.W and 0 <= g.pw < g.S and g.phases == 1
            and x.strides[3] == x.itemsize and x.strides[2] == g.W * x.itemsize)


def _lower_by_shifts(x, g, low):
    """_lower for ``_shifts_along_rows``: per tap s, one long copy of the
    flattened images (low[.., h, q] = x[.., h - ph, q + s - pw] is x shifted by
    ph rows and s - pw elements), then zeros where a shift wrapped a value
    across a row end, and in the padding rows. Short-row copies run several
    times slower in NumPy than these."""
    n, hw = x.shape[0], g.H * g.W
    flat = _view_as(x, (n, g.C, hw))                      # each plane flat, in place
    for s in range(g.S):
        shift = s - g.pw                                  # low column q reads x column q + shift
        dst = low[:, :, s, 0]                             # (n, C, H2, Q)
        dst_flat = dst.reshape(n, g.C, g.H2 * g.Q)
        start = g.ph * g.Q
        lo, hi = max(0, -shift), hw - max(0, shift)       # low's flat positions written
        dst_flat[:, :, start + lo:start + hi] = flat[:, :, lo + shift:hi + shift]
        body = dst[:, :, g.ph:g.ph + g.H]
        if shift > 0:    # the last `shift` columns read past the row's end
            body[:, :, :, g.W - shift:] = 0
        elif shift < 0:  # the first -shift columns read before its start
            body[:, :, :, :-shift] = 0
    if g.ph:  # the padding rows, of every tap at once
        low[:, :, :, 0, :g.ph] = 0
    if g.H2 > g.ph + g.H:
        low[:, :, :, 0, g.ph + g.H:] = 0


def _unlower_add(glow, g, gx):
    """The adjoint of _lower: add glow (n, C, S, phases, H2, Q) into gx (n, C, H, W)."""
    for s, f, (h0, h1, q0, q1), (rows, cols) in _lowered_windows(g):
        if h1 > h0 and q1 > q0:
            gx[:, :, rows, cols] += glow[:, :, s, f, h0:h1, q0:q1]


def _weight_rows(W, g):
    """W (K, iCg, R, S) as one (oCg, iCg*S) matrix per kernel row and group."""
    return W.transpose(2, 0, 1, 3).reshape(g.R, g.G, g.oCg, g.iCg * g.S)  # (R, G, oCg, iCg*S)


# 1x1 kernels. In CNHW memory (the layout the NumPy path's activations take,
# as the GPU path's: ``resnext.transforms.normalize`` writes it) x is already
# the (C, N*H*W) matrix of its channels, so a 1x1 convolution is one GEMM per
# group over every pixel of the batch, y (K, N*P*Q) = W (K, C) @ x (C, N*P*Q),
# read and written in place. NCHW input takes one matmul per image, except
# with few pixels per image (7x7 maps and smaller), where the per-image
# matrices are too thin for BLAS: the batch is then folded into the pixel
# axis at the price of two transposing copies.
THIN_PIXELS = 64


def _channel_matrix(a, G):
    """(N, C, P, Q) -> (G, C/G, N*P*Q): a view of CNHW memory, else a copy."""
    return a.transpose(1, 0, 2, 3).reshape(G, a.shape[1] // G, -1)      # (G, C/G, N*P*Q)


def _from_channel_matrix(a, shape, cnhw):
    """(G, K/G, N*P*Q) -> (N, K, P, Q): the CNHW view of a's memory when
    ``cnhw``, else an NCHW copy."""
    xp = backend.get_array_module(a)
    n, k, p, q = shape
    y = a.reshape(k, n, p, q).transpose(1, 0, 2, 3)                    # (N, K, P, Q)
    return y if cnhw else xp.ascontiguousarray(y)


def _one_gemm(a, g):
    """Whether a 1x1 convolution on ``a`` runs as one GEMM per group over the batch."""
    return _is_cnhw(a) or g.P * g.Q < THIN_PIXELS


def _pointwise_forward(x, W, g):
    xp = backend.get_array_module(x)
    Wg = W.reshape(g.G, g.oCg, g.iCg)                                   # (G, oCg, iCg)
    xs = x[:, :, ::g.sh, ::g.sw]                                        # (N, C, P, Q), a view
    if _one_gemm(x, g):
        y = xp.matmul(Wg, _channel_matrix(xs, g.G))                     # (G, oCg, N*P*Q)
        return _from_channel_matrix(y, (g.N, g.K, g.P, g.Q), _is_cnhw(x))
    y = xp.matmul(Wg, xs.reshape(g.N, g.G, g.iCg, g.P * g.Q))         # (N, G, oCg, P*Q)
    return y.reshape(g.N, g.K, g.P, g.Q)                    # (N, K, P, Q)


def _pointwise_backward_data(gy, W, g):
    xp = backend.get_array_module(gy)
    Wg_t = W.reshape(g.G, g.oCg, g.iCg).transpose(0, 2, 1)             # (G, iCg, oCg)
    if _one_gemm(gy, g):
        gxs = xp.matmul(Wg_t, _channel_matrix(gy, g.G))                 # (G, iCg, N*P*Q)
        gxs = _from_channel_matrix(gxs, (g.N, g.C, g.P, g.Q), _is_cnhw(gy))
    else:
        gxs = xp.matmul(Wg_t, gy.reshape(g.N, g.G, g.oCg, g.P * g.Q))  # (N, G, iCg, P*Q)
        gxs = gxs.reshape(g.N, g.C, g.P, g.Q)                           # (N, C, P, Q)
    if g.sh == g.sw == 1:
        return gxs
    return _scatter_pixels(gxs, (g.N, g.C, g.H, g.W), (g.sh, g.sw))     # in gxs's layout


def _pointwise_backward_weight(gy, x, g, out=None):
    """gW (K, iCg, 1, 1). Given ``out`` (gW's shape, contiguous), the one
    GEMM over the batch writes into it, the gradient array itself, and out is
    returned; otherwise a new array (the caller copies it into out)."""
    xp = backend.get_array_module(gy)
    xs = x[:, :, ::g.sh, ::g.sw]                                        # (N, C, P, Q), a view
    # NCHW: summing per-image products goes through an (N, K, iCg)
    # temporary; folding the batch into the pixel axis copies gy and x
    # instead. Take the smaller of the two. CNHW folds without a copy.
    if _is_cnhw(x) or g.K * g.iCg > (g.K + g.C) * g.P * g.Q:
        into = out is not None and out.flags.c_contiguous  # then its (G, oCg, iCg) is a view
        gW = xp.matmul(_channel_matrix(gy, g.G), _channel_matrix(xs, g.G).transpose(0, 2, 1),
                       out=out.reshape(g.G, g.oCg, g.iCg) if into else None)  # (G, oCg, iCg)
        if into:
            return out
    else:
        x_g = xs.reshape(g.N, g.G, g.iCg, g.P * g.Q)                    # (N, G, iCg, P*Q)
        gy_g = gy.reshape(g.N, g.G, g.oCg, g.P * g.Q)                   # (N, G, oCg, P*Q)
        gW = xp.matmul(gy_g, x_g.transpose(0, 1, 3, 2)).sum(axis=0)     # (G, oCg, iCg)
    return gW.reshape(g.K, g.iCg, 1, 1)                                 # (K, iCg, 1, 1)


# Convolutions on CNHW memory, the batch folded into each GEMM. The MEC
# matmuls above are one per image, group and kernel row: on maps of 7x7 or
# smaller (ResNeXt's last stage; its last two at 64x64) that is thousands of
# products of at most 49 columns, whose calls cost more than their
# arithmetic. With x in CNHW memory the classic im2col matrix of a group,
#   cols[i, r, s, n, p, q] = x[n, g * iCg + i, p * sh + r - ph, q * sw + s - pw]
# (0 outside the image), is (iCg*R*S, N*P*Q) with every image of the batch
# side by side, and one GEMM per group gives that group's rows of y's CNHW
# memory:  y[g] (oCg, N*P*Q) = W[g] (oCg, iCg*R*S) @ cols.  Groups and
# images go in blocks whose cols fit in FOLD_BYTES, and the threads take
# fixed runs of those blocks (THREADED_MIN_MACS, above: disjoint rows of y
# and gx; gW's partial sums added in order). On
# larger maps MEC is faster: cols is R times its lowered block. Strided
# kernels are the exception: MEC's strided copies and its gradient's strided
# adds ran 8 elements at a time on 8x8 outputs. When x splits into stride
# phases of the output's size (``_tiles``: even maps), cols is read from
# those phases, each tap one long shifted copy (``_im2col_by_shifts``), and
# the input gradient goes back the same way (``_col2im_by_shifts``).
# Forward + input gradient + weight gradient of ResNeXt's strided grouped
# convs, ms, folded so against MEC, the two alternating in one process
# (medians of 9 at 64x64, of 5 at 224x224, in one of this VM's slow hours):
#   batch 32, 64x64:  layer2's first (16x16 -> 8x8, 8 per group) 27.6 against 38.7,
#     layer3's first 21.1 against 37.8, layer4's first 18.1 against 45.1 (in
#     another hour 28.2 against 32.4, 15.3 against 25.7, 15.0 against 36.5);
#   batch 16, 224x224: layer2's first (56x56 -> 28x28) 102 against 162,
#     layer3's first 54 against 85, layer4's first 58 against 101.
# In whole steps (per-op timers, the tree before against this one) the
# grouped convolutions of a batch-32 64x64 step took 261 against 305 ms.
# Strided kernels on odd maps fold (copying every other pixel per tap) only
# with >= 16 outputs per group onto maps of at most 14x14, where that was
# measured faster: layer3's first at 64x64, before the phases, 5.6/8.7/5.5
# against MEC's 6.5/9.5/7.7 ms. The stem (``_stem_like``) also folds on its
# phases: 3 channels, so MEC's products have 21 rows; folded (on padded
# phases, whose windows took as long as these shifts) against MEC, its
# forward and weight gradient took 25 against 38 ms at batch 32, 64x64 and
# 117 against 138 ms at batch 16, 224x224; with the demo's 16 outputs
# (batch 32, 48x48) 8.2 against 6.1 ms, and with 32 outputs 8.7 against 7.0
# (hence STEM_MIN_OUT_CHANNELS). Stride-1 maps of 8x8 to 28x28 run faster
# with MEC.
# Whole resnext50 training steps on this repository's 2-core machine,
# alternating the setting in one process (measured while the stem was folded
# too, before OpenBLAS ran on one thread inside blocks):
#   batch 32, 64x64: fold maps <= 4x4 906 ms, no grouped conv 1010 ms, <= 16x16 965 ms;
#   batch 16, 224x224: fold maps <= 7x7 4115 ms, <= 4x4 4342 ms, <= 14x14 4391 ms.
FOLD_BYTES = 4 << 20
FOLD_MIN_OUT_CHANNELS = 8   # thinner GEMMs gain nothing from the fold (layer1: 4)
FOLD_MAX_PIXELS = 49        # fold on input maps of at most 7x7
FOLD_STRIDED_MIN_OUT_CHANNELS = 16  # strided convs on odd maps fold with >= 16 outputs per group
FOLD_STRIDED_MAX_OUT_PIXELS = 196   # and outputs of at most 14x14
STEM_MAX_CHANNELS = 16              # C * sh * sw of a strided one-group conv (the stem: 12)
STEM_MIN_OUT_CHANNELS = 64          # the stem's 64; the demo's 16 run faster with MEC


def _folds(x, g):
    """Whether the convolution runs folded: CNHW memory, and small maps with
    >= 8 outputs per group, strided grouped kernels whose input splits into
    phases of the output's size (``_tiles``) or with >= 16 outputs per group
    onto maps of at most 14x14, or the stem's kind of kernel (``_stem_like``)."""
    strided = (g.sh, g.sw) != (1, 1)
    return _is_cnhw(x) and (
        g.oCg >= FOLD_MIN_OUT_CHANNELS and g.H * g.W <= FOLD_MAX_PIXELS
        or strided and g.G > 1 and _tiles(g)
        or strided and g.oCg >= FOLD_STRIDED_MIN_OUT_CHANNELS
        and g.P * g.Q <= FOLD_STRIDED_MAX_OUT_PIXELS
        or _stem_like(g))


def _stem_like(g):
    """A strided kernel over few channels in one group: few channels even
    once split into their stride phases, an image that splits into them
    (``_tiles``), and enough outputs for the GEMM to outweigh cols, R * S
    times MEC's lowered block."""
    return (g.G == 1 and (g.sh, g.sw) != (1, 1) and g.R * g.S > 1 and _tiles(g)
            and g.C * g.sh * g.sw <= STEM_MAX_CHANNELS
            and g.K >= STEM_MIN_OUT_CHANNELS)


def _fold_blocks(g, itemsize):
    """(groups per block, images per block): a block's cols about FOLD_BYTES."""
    per_image_group = g.iCg * g.R * g.S * g.P * g.Q * itemsize
    images = max(1, min(g.N, FOLD_BYTES // per_image_group))
    groups = max(1, FOLD_BYTES // (per_image_group * images)) if images == g.N else 1
    return groups, images


def _folded_blocks(fn, g, itemsize):
    """[fn(g0, g1, n0, m) for every block of groups and images], groups
    major and images in order within them; the list is split over the
    threads in fixed contiguous runs (so one group's image blocks, as in
    the stem's, also go to both), each block writing only its own groups
    and images or returning a partial sum for the caller to add in order."""
    per_groups, images = _fold_blocks(g, itemsize)
    work = [(a, min(a + per_groups, g.G), n0, min(images, g.N - n0))
            for a in range(0, g.G, per_groups) for n0 in range(0, g.N, images)]
    parts = _run_blocks(lambda i, j: [fn(*work[k]) for k in range(i, j)], len(work), g)
    return [result for part in parts for result in part]


def _taps(g):
    """For each (r, s): the output rows/cols [p0, p1) x [q0, q1) whose tap lies
    inside the image, and the matching strided slices of x's rows and cols."""
    for r in range(g.R):
        p0, p1, rows = _valid(g.P, r - g.ph, g.sh, g.H)
        for s in range(g.S):
            q0, q1, cols = _valid(g.Q, s - g.pw, g.sw, g.W)
            yield r, s, (p0, p1, q0, q1), (rows, cols)


def _im2col_block(x_mem, g, cols):
    """cols (c, R, S, m, P, Q) from x_mem (c, m, H, W), a block of x's CNHW memory."""
    if _tiles(g):
        return _im2col_by_shifts(x_mem, g, cols)
    for r, s, (p0, p1, q0, q1), (rows, cols_x) in _taps(g):
        if p1 > p0 and q1 > q0:
            cols[:, r, s, :, p0:p1, q0:q1] = x_mem[:, :, rows, cols_x]
    _zero_outside_taps(cols, g)


def _zero_outside(dst, p0, p1, q0, q1):
    """Zeros in dst (c, m, P, Q) outside rows [p0, p1) and cols [q0, q1)."""
    P, Q = dst.shape[2:]
    if p0 > 0:
        dst[:, :, :p0] = 0
    if p1 < P:
        dst[:, :, p1:] = 0
    if q0 > 0:
        dst[:, :, p0:p1, :q0] = 0
    if q1 < Q:
        dst[:, :, p0:p1, q1:] = 0


def _zero_outside_taps(cols, g):
    """Zeros in cols (c, R, S, m, P, Q) wherever tap (r, s) lies outside the
    image: a position does when its row does for r or its column for s, so
    the rows go per kernel row and the columns per kernel column (at most
    2 * (R + S) writes, against 4 * R * S tap by tap: the calls, not the
    bytes, were the cost on 4x4 maps)."""
    for r in range(g.R):
        p0, p1, _ = _valid(g.P, r - g.ph, g.sh, g.H)
        if p0 > 0:
            cols[:, r, :, :, :p0] = 0
        if p1 < g.P:
            cols[:, r, :, :, p1:] = 0
    for s in range(g.S):
        q0, q1, _ = _valid(g.Q, s - g.pw, g.sw, g.W)
        if q0 > 0:
            cols[:, :, s, :, :, :q0] = 0
        if q1 < g.Q:
            cols[:, :, s, :, :, q1:] = 0


def _tiles(g):
    """Whether x splits into its sh * sw stride phases, each exactly the
    output's size (H = P * sh and W = Q * sw: ResNeXt's 3x3 convolutions,
    stride 1 or 2, and its stem, on maps of even size). Then
      phase[a, b][n, i, j] = x[n, i * sh + a, j * sw + b]
    and tap (r, s) reads one phase moved by whole rows and columns: output
    (p, q) reads input row p * sh + r - ph = (p + di) * sh + a, with
    (di, a) = divmod(r - ph, sh), so phase a's row p + di (and likewise
    column q + dj of phase b); outside the phase is outside the image."""
    return g.H == g.P * g.sh and g.W == g.Q * g.sw


def _shifted_taps(g):
    """For each tap (r, s): the phase (a, b) it reads and its shift in that
    phase's flattened (n, i, j) index, di * Q + dj (see ``_tiles``)."""
    for r in range(g.R):
        di, a = divmod(r - g.ph, g.sh)
        for s in range(g.S):
            dj, b = divmod(s - g.pw, g.sw)
            yield r, s, (a, b), di * g.Q + dj


def _phase_view(a_mem, g):
    """a_mem (c, m, H, W), a block of CNHW memory, as its stride phases
    (c, sh, sw, m, P, Q): a strided view (``_tiles`` must hold)."""
    c, m = a_mem.shape[:2]
    return _view_as(a_mem, (c, m, g.P, g.sh, g.Q, g.sw)).transpose(0, 3, 5, 1, 2, 4)


def _phase_rows(a_mem, g, dtype):
    """Room for the stride phases of a_mem (c, m, H, W) as (c, sh, sw, m*P*Q)
    rows: a_mem itself for stride 1 (its one phase), else a scratch buffer
    (filled or read back by the caller through ``_phase_view``)."""
    c, m = a_mem.shape[:2]
    if g.sh == g.sw == 1:
        return _view_as(a_mem, (c, 1, 1, m * g.P * g.Q))
    xp = backend.get_array_module(a_mem)
    return _scratch("phases", (c, g.sh, g.sw, m * g.P * g.Q), dtype, xp)


def _shift_ranges(shift, length):
    """The positions [lo, hi) of a flat row whose position + shift is in [0, length)."""
    return max(0, -shift), length - max(0, shift)


def _im2col_by_shifts(x_mem, g, cols):
    """_im2col_block when ``_tiles`` holds: x split once into its stride
    phases (a stride-1 convolution's one phase is x itself), then tap (r, s)
    is its phase's row of m*P*Q values shifted by di * Q + dj: one long copy.
    What the shift carried across a row's or an image's edge lies outside
    the image and is zeroed after. Copies of the 4- to 16-wide rows of
    small maps, tap by tap, cost several times more (the stem's 49 taps, a
    strided grouped conv's 9 of every other pixel)."""
    c, m = x_mem.shape[:2]
    length = m * g.P * g.Q
    phases = _phase_rows(x_mem, g, x_mem.dtype)                    # (c, sh, sw, m*P*Q)
    if (g.sh, g.sw) != (1, 1):  # one copy (its destination contiguous: long inner loops)
        phases.reshape(c, g.sh, g.sw, m, g.P, g.Q)[...] = _phase_view(x_mem, g)
    for r, s, (a, b), shift in _shifted_taps(g):
        flat = _view_as(cols[:, r, s], (c, length))               # (c, m*P*Q)
        lo, hi = _shift_ranges(shift, length)  # (the rest lies outside: zeroed below)
        flat[:, lo:hi] = phases[:, a, b, lo + shift:hi + shift]
    _zero_outside_taps(cols, g)


def _col2im_block(gcols, g, gx_mem):
    """The adjoint of _im2col_block: gx_mem (c, m, H, W) = every gcols
    (c, R, S, m, P, Q) entry added back where it was read from (gx_mem's
    old values are overwritten; gcols is clobbered)."""
    if _tiles(g):
        return _col2im_by_shifts(gcols, g, gx_mem)
    gx_mem[...] = 0
    for r, s, (p0, p1, q0, q1), (rows, cols_x) in _taps(g):
        if p1 > p0 and q1 > q0:
            gx_mem[:, :, rows, cols_x] += gcols[:, r, s, :, p0:p1, q0:q1]


def _col2im_by_shifts(gcols, g, gx_mem):
    """_col2im_block when ``_tiles`` holds, the adjoint of _im2col_by_shifts:
    gcols' entries outside the image zeroed (so that what a shift carries
    across an edge adds nothing), each tap added into its phase with one long
    shifted add, the phases then put back in place (stride 1: gx itself)."""
    _zero_outside_taps(gcols, g)
    c, m = gx_mem.shape[:2]
    length = m * g.P * g.Q
    phases = _phase_rows(gx_mem, g, gcols.dtype)                   # (c, sh, sw, m*P*Q)
    phases[...] = 0
    for r, s, (a, b), shift in _shifted_taps(g):
        lo, hi = _shift_ranges(shift, length)
        phases[:, a, b, lo + shift:hi + shift] += _view_as(gcols[:, r, s], (c, length))[:, lo:hi]
    if (g.sh, g.sw) != (1, 1):  # phase by phase: as one copy NumPy ran 2-wide inner loops
        gx_phases, phases = _phase_view(gx_mem, g), phases.reshape(c, g.sh, g.sw, m, g.P, g.Q)
        for a in range(g.sh):
            for b in range(g.sw):
                gx_phases[:, a, b] = phases[:, a, b]


def _group_rows(a_mem, G):
    """CNHW memory (C, N, H, W) as (G, C/G, N, H*W): each group's rows, a view."""
    c, n, h, w = a_mem.shape
    return a_mem.reshape(G, c // G, n, h * w)


def _folded_forward(x, W, g):
    xp = backend.get_array_module(x)
    Wg = W.reshape(g.G, g.oCg, g.iCg * g.R * g.S)                      # (G, oCg, iCg*R*S)
    x_mem = _stored(x, True)                                       # (C, N, H, W)
    y = new_in_layout(xp, (g.N, g.K, g.P, g.Q), x.dtype, True)
    y_rows = _group_rows(_stored(y, True), g.G)                   # (G, oCg, N, P*Q)

    def block(g0, g1, n0, m):
        cols = _scratch("cols", ((g1 - g0) * g.iCg, g.R, g.S, m, g.P, g.Q), x.dtype, xp)
        _im2col_block(x_mem[g0 * g.iCg:g1 * g.iCg, n0:n0 + m], g, cols)
        out = _view_as(y_rows[g0:g1, :, n0:n0 + m], (g1 - g0, g.oCg, m * g.P * g.Q))
        xp.matmul(Wg[g0:g1], cols.reshape(g1 - g0, g.iCg * g.R * g.S, m * g.P * g.Q), out=out)

    _folded_blocks(block, g, x.dtype.itemsize)
    return y


def _folded_backward_data(gy, W, g):
    xp = backend.get_array_module(gy)
    Wg_t = W.reshape(g.G, g.oCg, g.iCg * g.R * g.S).transpose(0, 2, 1)  # (G, iCg*R*S, oCg)
    gy_rows = _group_rows(_stored(gy, True), g.G)                 # (G, oCg, N, P*Q)
    gx = new_in_layout(xp, (g.N, g.C, g.H, g.W), gy.dtype, True)  # every block writes its own
    gx_mem = _stored(gx, True)                                     # (C, N, H, W)

    def block(g0, g1, n0, m):
        gcols = _scratch("cols", ((g1 - g0) * g.iCg, g.R, g.S, m, g.P, g.Q), gy.dtype, xp)
        gy_block = _view_as(gy_rows[g0:g1, :, n0:n0 + m], (g1 - g0, g.oCg, m * g.P * g.Q))
        xp.matmul(Wg_t[g0:g1], gy_block,
                  out=gcols.reshape(g1 - g0, g.iCg * g.R * g.S, m * g.P * g.Q))
        _col2im_block(gcols, g, gx_mem[g0 * g.iCg:g1 * g.iCg, n0:n0 + m])

    _folded_blocks(block, g, gy.dtype.itemsize)
    return gx


# The weight gradient's GEMM, gy (oCg, pixels) @ cols^T (pixels, iCg*R*S),
# reads both of its operands along their rows: OpenBLAS's "NT" case, which
# with few rows ran at 60% of the speed of the "NN" case here or less
# (layer3's 4x4 maps at 64x64: 16.3 against 25.8 GMAC/s per block;
# benchmarks/bench_gemm_orientation.py). With at most this many outputs per
# group (ResNeXt's grouped convolutions: 8 to 32) the product is taken the
# other way round, gW^T = cols @ gy^T, after copying gy^T (a small copy: oCg
# values per pixel). The backward of the folded convolutions as
# Conv2d.backward runs it, either way alternating in one process, medians:
#   batch 16, 224x224: 56x56 stride 2 44.0 against 50.5 ms, 28x28 stride 2
#     26.9 against 38.8, 14x14 stride 2 24.4 against 29.9, 7x7 13.3 against
#     21.0; a step's 122 against 161 ms;
#   batch 32, 64x64: a step's 68.7 against 75.7 ms (4x4 maps 5.44 against 6.47);
# the stem's, with 64 outputs, took 15.5 against 11.7 ms at 64x64 taken
# the other way round: hence the bound. (NumPy only: measured on OpenBLAS.)
TRANSPOSED_WEIGHT_GRADIENT_MAX_OUT_CHANNELS = 32


def _folded_backward_weight(gy, x, g):
    xp = backend.get_array_module(gy)
    x_mem = _stored(x, True)                                       # (C, N, H, W)
    gy_rows = _group_rows(_stored(gy, True), g.G)                 # (G, oCg, N, P*Q)
    gW = xp.zeros((g.G, g.oCg, g.iCg * g.R * g.S), gy.dtype)           # (G, oCg, iCg*R*S)
    transposed = xp is numpy and g.oCg <= TRANSPOSED_WEIGHT_GRADIENT_MAX_OUT_CHANNELS

    def block(g0, g1, n0, m):
        cols = _scratch("cols", ((g1 - g0) * g.iCg, g.R, g.S, m, g.P, g.Q), x.dtype, xp)
        _im2col_block(x_mem[g0 * g.iCg:g1 * g.iCg, n0:n0 + m], g, cols)
        cols = cols.reshape(g1 - g0, g.iCg * g.R * g.S, m * g.P * g.Q)
        gy_block = _view_as(gy_rows[g0:g1, :, n0:n0 + m], (g1 - g0, g.oCg, m * g.P * g.Q))
        if transposed:
            gy_t = xp.ascontiguousarray(gy_block.transpose(0, 2, 1))  # (groups, pixels, oCg)
            return g0, g1, xp.matmul(cols, gy_t).transpose(0, 2, 1)
        return g0, g1, xp.matmul(gy_block, cols.transpose(0, 2, 1))

    for g0, g1, partial in _folded_blocks(block, g, x.dtype.itemsize):
        gW[g0:g1] += partial   # each group's image blocks added in order
    return gW.reshape(g.K, g.iCg, g.R, g.S)


# Maps of at most half the kernel's taps (H * W <= R * S / 2: 2x2 maps
# under 3x3 kernels, layer4's at 64x64; a 1x1 map; a kernel wider than its
# image). There, per group, a convolution is one dense linear map from an
# image's iCg*H*W values to its oCg*P*Q outputs,
#   y[n, (o, p, q)] = sum over (i, h, w) of Wmap[(o, p, q), (i, h, w)] * x[n, (i, h, w)],
#   Wmap[(o, p, q), (i, h, w)] = W[o, i, r, s] where (h, w) is tap (r, s)
#                                of output (p, q), else 0,
# and each direction is one GEMM per group over the batch with no im2col:
# y rows = x rows @ Wmap^T (Wmap^T built in its own memory), gx rows =
# gy rows @ Wmap, gWmap = gy rows^T @ x rows. Its N*oCg*P*Q*iCg*H*W
# multiply-adds are H*W / (R*S) of im2col's N*P*Q*oCg*iCg*R*S, and
# im2col's cost on such maps is not its GEMM but its
# copies and zero fill-ins, runs of one or two values. Wmap is zeros with
# each tap's weights written along a diagonal (``_tap_diagonals``), and gW
# is gWmap summed along the same diagonals. Forward + input gradient +
# weight gradient, this path against the folded one, alternating in one
# process inside ``cpu.cores_awake`` (medians of 25, batch 32, CNHW):
# layer4's 2x2 maps at 64x64 (1024 channels, 32 groups) 7.65 against 12.16
# ms, faster in 25 of 25. On 3x3 maps (H*W = R*S) it gained nothing: 7.77
# against 7.19 ms (512 channels, stride 1), 16.90 against 17.11 (1024,
# stride 2 onto 2x2), 4.77 against 4.18 (the demo's layer4: 256, 8 groups).
# With few images Wmap outweighs their im2col (K*iCg*P*Q*H*W against
# N*C*R*S*P*Q values): at batch 4 the 2x2 maps took 2.15 against 1.92 ms.
def _whole_map(g):
    """Whether the convolution runs as the dense map of whole images: a
    kernel other than 1x1 on maps of at most half its taps, whose Wmap is
    no larger than the batch's im2col (K*iCg*P*Q*H*W <= N*C*R*S*P*Q)."""
    return (not g.is_pointwise() and 2 * g.H * g.W <= g.R * g.S
            and g.oCg * g.H * g.W <= g.N * g.R * g.S)


def _tap_diagonals(Wmap, g):
    """For each tap (r, s) some output reads inside the image: (r, s) and
    the view of Wmap (G, oCg, P, Q, iCg, H, W) holding it, (G, oCg, p, q, iCg)
    over the outputs (p, q) that read inside, each at the input
    (h, w) = (p*sh + r - ph, q*sw + s - pw). As (p, q) steps by one, (h, w)
    steps by (sh, sw): the view runs along a diagonal of Wmap's (P, H) and
    (Q, W) planes, a strided view NumPy's slicing cannot express, hence
    as_strided, its strides those of Wmap (in bounds: every (h, w) it
    reaches is inside the image)."""
    as_strided = backend.get_array_module(Wmap).lib.stride_tricks.as_strided
    st = Wmap.strides
    for r, s, (p0, p1, q0, q1), (rows, cols) in _taps(g):
        if p1 > p0 and q1 > q0:
            first = Wmap[:, :, p0, q0, :, rows.start, cols.start]          # (G, oCg, iCg)
            yield r, s, as_strided(
                first, (g.G, g.oCg, p1 - p0, q1 - q0, g.iCg),
                (st[0], st[1], st[2] + g.sh * st[5], st[3] + g.sw * st[6], st[4]))


def _image_rows(a, G):
    """(N, C, H, W) -> (G, N, C/G*H*W): each group's images as rows (a view
    of NCHW memory, a copy of CNHW memory)."""
    xp = backend.get_array_module(a)
    n, c, h, w = a.shape
    if _is_cnhw(a):
        rows = _group_rows(_stored(a, True), G).transpose(0, 2, 1, 3)   # (G, N, C/G, H*W)
        return xp.ascontiguousarray(rows).reshape(G, n, c // G * h * w)
    return xp.ascontiguousarray(a).reshape(n, G, c // G * h * w).transpose(1, 0, 2)


def _from_image_rows(rows, shape, cnhw):
    """rows (G, N, C/G*H*W) -> (N, C, H, W), in CNHW memory when ``cnhw``."""
    xp = backend.get_array_module(rows)
    n, c, h, w = shape
    G = rows.shape[0]
    a = new_in_layout(xp, shape, rows.dtype, cnhw)
    if cnhw:
        _group_rows(_stored(a, True), G)[...] = rows.reshape(G, n, c // G, h * w).transpose(
            0, 2, 1, 3)
    else:
        a.reshape(n, G, c // G * h * w)[...] = rows.transpose(1, 0, 2)
    return a


def _weight_map(W, g, transposed=False):
    """Wmap (G, oCg*P*Q, iCg*H*W) of W (K, iCg, R, S): zeros, and each tap's
    weights written along its diagonal; ``transposed``: Wmap^T
    (G, iCg*H*W, oCg*P*Q), in memory of its own (a GEMM with a transposed
    view of Wmap as its right operand ran at half speed: as for
    ``TRANSPOSED_WEIGHT_GRADIENT_MAX_OUT_CHANNELS``)."""
    xp = backend.get_array_module(W)
    if transposed:
        memory = xp.zeros((g.G, g.iCg, g.H, g.W, g.oCg, g.P, g.Q), W.dtype)
        Wmap = memory.transpose(0, 4, 5, 6, 1, 2, 3)                 # (G, oCg, P, Q, iCg, H, W)
    else:
        memory = Wmap = xp.zeros((g.G, g.oCg, g.P, g.Q, g.iCg, g.H, g.W), W.dtype)
    Wg = W.reshape(g.G, g.oCg, g.iCg, g.R, g.S)
    for r, s, diagonal in _tap_diagonals(Wmap, g):
        diagonal[...] = Wg[:, :, None, None, :, r, s]   # the same weight at every (p, q)
    outputs, inputs = g.oCg * g.P * g.Q, g.iCg * g.H * g.W
    return memory.reshape((g.G, inputs, outputs) if transposed else (g.G, outputs, inputs))


def _whole_map_forward(x, W, g):
    y_rows = _image_rows(x, g.G) @ _weight_map(W, g, transposed=True)   # (G, N, oCg*P*Q)
    return _from_image_rows(y_rows, (g.N, g.K, g.P, g.Q), _is_cnhw(x))


def _whole_map_backward_data(gy, W, g):
    gx_rows = _image_rows(gy, g.G) @ _weight_map(W, g)               # (G, N, iCg*H*W)
    return _from_image_rows(gx_rows, (g.N, g.C, g.H, g.W), _is_cnhw(gy))


def _whole_map_backward_weight(gy, x, g):
    xp = backend.get_array_module(gy)
    gWmap = _image_rows(gy, g.G).transpose(0, 2, 1) @ _image_rows(x, g.G)  # (G, oCg*P*Q, iCg*H*W)
    gWmap = gWmap.reshape(g.G, g.oCg, g.P, g.Q, g.iCg, g.H, g.W)
    gW = xp.zeros((g.G, g.oCg, g.iCg, g.R, g.S), gy.dtype)  # (a tap no output reads: 0)
    for r, s, diagonal in _tap_diagonals(gWmap, g):
        gW[:, :, :, r, s] = diagonal.sum(axis=(2, 3))   # the tap's entries, summed over (p, q)
    return gW.reshape(g.K, g.iCg, g.R, g.S)


def _forward_fast(x, W, stride, padding, groups):
    xp = backend.get_array_module(x)
    x, W = _own_layout(x), xp.ascontiguousarray(W)  # y takes x's layout, NCHW or CNHW
    g = _Geometry(x.shape, W.shape, stride, padding, groups)
    if g.is_pointwise():
        return _pointwise_forward(x, W, g)
    if _whole_map(g):
        return _whole_map_forward(x, W, g)
    if _folds(x, g):
        return _folded_forward(x, W, g)
    W_rows = _weight_rows(W, g)                                   # (R, G, oCg, iCg*S)
    y = new_in_layout(xp, (g.N, g.K, g.P, g.Q), x.dtype, _is_cnhw(x))

    def chunk(n0, m):
        low = _scratch("lowered", g.lowered_shape(m), x.dtype, xp)
        _lower(x[n0:n0 + m], g, low)
        y_chunk = _view_as(y[n0:n0 + m], (m, g.G, g.oCg, g.P * g.Q))  # (m, G, oCg, P*Q)
        partial = _scratch("partial", y_chunk.shape, x.dtype, xp)
        for r in range(g.R):
            out = y_chunk if r == 0 else partial
            xp.matmul(W_rows[r], g.row_view(low, r), out=out)
            if r > 0:
                y_chunk += partial

    _map_chunks(chunk, g, x.dtype.itemsize, xp)
    return y


def _flipped_weight(W, g):
    """The weight of the stride-1 convolution that maps gy back to gx: per group
    the in/out channels swapped and the kernel rotated by 180 degrees."""
    Wg = W.reshape(g.G, g.oCg, g.iCg, g.R, g.S)                      # (G, oCg, iCg, R, S)
    Wg = Wg.transpose(0, 2, 1, 3, 4)[:, :, :, ::-1, ::-1]           # (G, iCg, oCg, R, S)
    return Wg.reshape(g.C, g.oCg, g.R, g.S)                 # (C, oCg, R, S)


def _backward_data_fast(gy, W, x_shape, stride, padding, groups):
    xp = backend.get_array_module(gy)
    gy, W = _own_layout(gy), xp.ascontiguousarray(W)  # gx takes gy's layout
    g = _Geometry(x_shape, W.shape, stride, padding, groups)
    if g.is_pointwise():
        return _pointwise_backward_data(gy, W, g)
    if _whole_map(g):
        return _whole_map_backward_data(gy, W, g)
    if _folds(gy, g) and (g.sh, g.sw) != (1, 1):  # (stride 1: the forward below, folded too)
        return _folded_backward_data(gy, W, g)
    if g.sh == g.sw == 1 and g.ph < g.R and g.pw < g.S:
        # A stride-1 convolution's input gradient is itself a stride-1
        # convolution of gy, with the flipped weight and the complementary padding.
        W_flip = xp.ascontiguousarray(_flipped_weight(W, g))
        return _forward_fast(gy, W_flip, 1, (g.R - 1 - g.ph, g.S - 1 - g.pw), groups)
    # General case: per kernel row, W^T @ gy fills the lowered gradient, which
    # is then added back onto the image positions it was read from.
    W_rows_t = _weight_rows(W, g).transpose(0, 1, 3, 2)             # (R, G, iCg*S, oCg)
    gy_g = _view_as(gy, (g.N, g.G, g.oCg, g.P * g.Q))                   # (N, G, oCg, P*Q)
    gx = new_in_layout(xp, x_shape, gy.dtype, _is_cnhw(gy), zeros=True)

    def chunk(n0, m):
        glow = _scratch("lowered", g.lowered_shape(m), gy.dtype, xp)
        glow[...] = 0
        partial = _scratch("partial", (m, g.G, g.iCg * g.S, g.P * g.Q), gy.dtype, xp)
        for r in range(g.R):
            xp.matmul(W_rows_t[r], gy_g[n0:n0 + m], out=partial)   # (m, G, iCg*S, P*Q)
            g.row_view(glow, r)[...] += partial
        _unlower_add(glow, g, gx[n0:n0 + m])

    _map_chunks(chunk, g, gy.dtype.itemsize, xp)
    return gx


def _backward_weight_fast(gy, x, W_shape, stride, padding, groups, out=None):
    x = _own_layout(x)
    gy = _in_layout(gy, _is_cnhw(x))  # gy in x's layout, NCHW or CNHW
    g = _Geometry(x.shape, W_shape, stride, padding, groups)
    if g.is_pointwise():
        gW = _pointwise_backward_weight(gy, x, g, out)
    else:
        gW = _lowered_backward_weight(gy, x, g)
    if out is None or gW is out:
        return gW
    out[...] = gW
    return out


def _lowered_backward_weight(gy, x, g):
    xp = backend.get_array_module(gy)
    if _whole_map(g):
        return _whole_map_backward_weight(gy, x, g)
    if _folds(x, g):
        return _folded_backward_weight(gy, x, g)
    gy_g = _view_as(gy, (g.N, g.G, g.oCg, g.P * g.Q))                   # (N, G, oCg, P*Q)

    def chunk(n0, m):
        low = _scratch("lowered", g.lowered_shape(m), x.dtype, xp)
        _lower(x[n0:n0 + m], g, low)
        gW_rows = xp.empty((g.R, g.G, g.oCg, g.iCg * g.S), gy.dtype)   # (R, G, oCg, iCg*S)
        for r in range(g.R):
            rows_t = g.row_view(low, r).transpose(0, 1, 3, 2)           # (m, G, P*Q, iCg*S)
            gW_rows[r] = xp.matmul(gy_g[n0:n0 + m], rows_t).sum(axis=0)
        return gW_rows

    gW_rows = sum(_map_chunks(chunk, g, x.dtype.itemsize, xp))
    gW = gW_rows.reshape(g.R, g.K, g.iCg, g.S).transpose(1, 2, 0, 3)   # (K, iCg, R, S)
    return xp.ascontiguousarray(gW)
