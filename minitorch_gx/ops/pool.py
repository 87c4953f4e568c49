"""Pooling over the spatial axes of NCHW input: max, average, adaptive average.

Read top-down: the public functions and their Functions; the plain
references (every window tap as one strided view, the specification); the
NumPy fast path, explained here; max pooling's CUDA kernels are launched by
``minitorch_gx.cuda.pool`` (``kernels/max_pool.cu``), and so is the global
average pool's (``kernels/avg_pool.cu``). ``backend.choose`` picks
a (forward, backward) pair in forward, because each implementation keeps its
own state for backward.

How the fast path runs max and average pooling without loops over pixels, channels or
samples, and with every elementwise pass over contiguous memory:

1. Separable windows: the max (or sum) over a kh x kw window is the max over
   its kh rows of each row's max over kw columns. So there are two short
   loops over taps (3 + 3 for ResNeXt's 3x3 max pool), not kh * kw.
2. Space-to-depth by stride phase: phase (a, b) holds the padded pixels
   (u*sh + a, v*sw + b), an (N, C, Hs, Ws) array. Tap (i, j) of output
   (p, q) is then pixel (p + i // sh, q + j // sw) of phase (i % sh, j % sw).
3. Flat shifts: flattened, that tap is the phase shifted by
   (i // sh) * Ws + j // sw elements, so every tap is one contiguous slice
   of a 1-D array. Positions with q >= Q or p >= P are junk (they mix in the
   next row); they are cropped away in forward and get zero gradient.

NumPy runs several times slower on the stride-2 or short inner loops that
direct strided views of the input would give.

Legend: N batch, C channels, H x W input, P x Q output, kh x kw window,
sh x sw stride, ph x pw padding, Hs x Ws phase size.
"""
import numpy

from .. import backend
from ..autograd import Function
from ..cuda import pool as cuda_pool
from ..cuda.device import is_cnhw as _is_cnhw, new_in_layout, stored


# --------------------------------------------------------------------------
# The ops.
# --------------------------------------------------------------------------
def max_pool2d(x, kernel_size, stride=None, padding=0):
    """Max over each kh x kw window of x (N, C, H, W) -> (N, C, P, Q).

    stride defaults to kernel_size; padding (at most half the kernel) counts
    as -inf. P = (H + 2*padding - kh) // stride + 1 (floor, like PyTorch).
    The gradient goes to the window's maximum; on ties, to the first in
    row-major order within the window, as in PyTorch.
    """
    return MaxPool2d(kernel_size, stride, padding)(x)


class _Pool2d(Function):
    """Max or average pooling: ``implementations(x)`` picks a (forward,
    backward) pair; forward also returns what its backward needs."""

    def __init__(self, kernel_size, stride, padding):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):
        forward, self.backward_impl = self.implementations(x)
        self.x_shape = x.shape
        y, self.saved = forward(x, self.kernel_size, self.stride, self.padding)
        return y

    def backward(self, gy):
        return (self.backward_impl(gy, self.saved, self.x_shape, self.kernel_size, self.stride,
                                   self.padding),)


class MaxPool2d(_Pool2d):
    def implementations(self, x):
        # saved: the winning tap of every window, in the implementation's own form
        return backend.choose(
            x, reference=(max_pool2d_forward_reference, max_pool2d_backward_reference),
            fast=(_max_pool2d_forward_fast, _max_pool2d_backward_fast),
            kernel=(cuda_pool.max_pool2d_forward, cuda_pool.max_pool2d_backward))


def avg_pool2d(x, kernel_size, stride=None, padding=0):
    """Mean over each kh x kw window of x (N, C, H, W) -> (N, C, P, Q).

    Zero padding is included in the mean (PyTorch's count_include_pad=True):
    every window divides by kh * kw.
    """
    return AvgPool2d(kernel_size, stride, padding)(x)


class AvgPool2d(_Pool2d):
    def implementations(self, x):
        # no kernel: on the GPU, ResNeXt has only the adaptive (global) average pool
        return backend.choose(
            x, reference=(avg_pool2d_forward_reference, avg_pool2d_backward_reference),
            fast=(_avg_pool2d_forward_fast, _avg_pool2d_backward_fast))


# --------------------------------------------------------------------------
# Adaptive average pooling (exact tilings only).
# --------------------------------------------------------------------------
class AdaptiveAvgPool2d(Function):
    def __init__(self, output_size):
        self.output_size = output_size

    def forward(self, x):
        n, c, h, w = x.shape
        p, q = self.output_size
        self.x_shape, self.cnhw = x.shape, _is_cnhw(x)
        self.kernel = (p, q) == (1, 1) and backend.use_kernels(backend.get_array_module(x))
        if self.kernel:  # the global pool: one launch (kernels/avg_pool.cu), any layout
            return cuda_pool.global_avg_pool_forward(x)
        # The windows tile the input exactly: (N, C, H, W) -> (N, C, P, kh, Q, kw)
        y = x.reshape(n, c, p, h // p, q, w // q).mean(axis=(3, 5))
        return y.astype(x.dtype, copy=False)

    def backward(self, gy):
        if self.kernel:  # gx in the forward input's layout
            return (cuda_pool.global_avg_pool_backward(gy, self.x_shape, self.cnhw),)
        xp = backend.get_array_module(gy)
        n, c, h, w = self.x_shape
        p, q = self.output_size
        kh, kw = h // p, w // q
        # gx in the forward input's layout: each window's share, spread evenly
        memory = (c, n) if self.cnhw else (n, c)
        gx = xp.empty(memory + (p, kh, q, kw), gy.dtype)
        gx[...] = stored(gy, self.cnhw).reshape(memory + (p, 1, q, 1)) * gy.dtype.type(
            1.0 / (kh * kw))
        return (stored(gx.reshape(memory + (h, w)), self.cnhw),)


def adaptive_avg_pool2d(x, output_size):
    """Average x (N, C, H, W) down to (N, C, P, Q), output_size = P or (P, Q).

    output_size 1 is the global average pool before ResNeXt's classifier.
    Only sizes that divide the input (H % P == 0, W % Q == 0) are supported;
    then every window is an exact (H/P) x (W/Q) block, as in PyTorch. A None
    in output_size keeps that input size.
    """
    if len(x.shape) != 4:
        raise ValueError(f"adaptive_avg_pool2d expects (N, C, H, W) input, got shape "
                         f"{tuple(x.shape)}")
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(size) != 2:
        raise ValueError(f"output_size must be an int or a pair, got {output_size!r}")
    h, w = x.shape[2], x.shape[3]
    size = (h if size[0] is None else int(size[0]), w if size[1] is None else int(size[1]))
    if min(size) < 1 or h % size[0] or w % size[1]:
        raise ValueError(f"adaptive_avg_pool2d supports output sizes that divide the input: "
                         f"input {h}x{w}, output {size[0]}x{size[1]}")
    return AdaptiveAvgPool2d(size)(x)


# --------------------------------------------------------------------------
# References: pad, take each tap (i, j) of every window as one strided view
# (N, C, P, Q), reduce over the taps. The specification of both poolings.
# --------------------------------------------------------------------------
def _tap_views(x_pad, plan):
    """[(t, view)] for t = i * kw + j: x_pad[n, c, p*sh + i, q*sw + j] as (N, C, P, Q)."""
    (kh, kw), (sh, sw), (P, Q) = plan.k, plan.s, plan.out
    return [(i * kw + j, x_pad[:, :, i:i + sh * (P - 1) + 1:sh, j:j + sw * (Q - 1) + 1:sw])
            for i in range(kh) for j in range(kw)]


def _padded(x, plan, value):
    xp = backend.get_array_module(x)
    (ph, pw) = plan.p
    return xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def max_pool2d_forward_reference(x, kernel_size, stride, padding):
    """-> y (N, C, P, Q) and argmax, the first (row-major) tap i*kw+j holding the max."""
    xp = backend.get_array_module(x)
    plan = _Plan(x.shape, kernel_size, stride, padding)
    taps = xp.stack([v for _, v in _tap_views(_padded(x, plan, -numpy.inf), plan)])
    argmax = taps.argmax(axis=0)  # the first maximum, as PyTorch
    return taps.max(axis=0), argmax.astype(numpy.uint8 if len(taps) <= 256 else numpy.int32)


def max_pool2d_backward_reference(gy, argmax, x_shape, kernel_size, stride, padding):
    """gx: each window's gradient added to its winning tap."""
    xp = backend.get_array_module(gy)
    plan = _Plan(x_shape, kernel_size, stride, padding)
    gx_pad = _padded(xp.zeros(x_shape, gy.dtype), plan, 0)
    for t, view in _tap_views(gx_pad, plan):
        view += gy * (argmax == t)  # a view into gx_pad: adds in place
    (ph, pw), (H, W) = plan.p, x_shape[2:]
    return gx_pad[:, :, ph:ph + H, pw:pw + W].copy()


def avg_pool2d_forward_reference(x, kernel_size, stride, padding):
    """-> y (N, C, P, Q), the mean of each window with zero padding counted."""
    plan = _Plan(x.shape, kernel_size, stride, padding)
    y = sum(v for _, v in _tap_views(_padded(x, plan, 0), plan))
    return (y / (plan.k[0] * plan.k[1])).astype(x.dtype, copy=False), None


def avg_pool2d_backward_reference(gy, saved, x_shape, kernel_size, stride, padding):
    xp = backend.get_array_module(gy)
    plan = _Plan(x_shape, kernel_size, stride, padding)
    gx_pad = _padded(xp.zeros(x_shape, gy.dtype), plan, 0)
    for _, view in _tap_views(gx_pad, plan):
        view += gy / gy.dtype.type(plan.k[0] * plan.k[1])
    (ph, pw), (H, W) = plan.p, x_shape[2:]
    return gx_pad[:, :, ph:ph + H, pw:pw + W].copy()


# --------------------------------------------------------------------------
# Fast path (see the module docstring): the plan, then both poolings.
# --------------------------------------------------------------------------
def _pair(v, name):
    pair = (v, v) if isinstance(v, (int, numpy.integer)) else tuple(v)
    if len(pair) != 2 or any(not isinstance(a, (int, numpy.integer)) for a in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return int(pair[0]), int(pair[1])


class _Plan:
    """The geometry of one pooling call and where each tap lives (see above).
    Phases, outputs and gradients keep the input's memory layout: planes in
    (N, C) order for NCHW, in (C, N) order for CNHW (the NumPy path's
    activations); the flat shifts stay within a plane either way."""

    def __init__(self, shape, kernel_size, stride, padding, cnhw=False):
        if len(shape) != 4:
            raise ValueError(f"pooling expects (N, C, H, W) input, got shape {tuple(shape)}")
        k = _pair(kernel_size, "kernel_size")
        s = k if stride is None else _pair(stride, "stride")
        p = _pair(padding, "padding")
        if min(k) < 1 or min(s) < 1 or min(p) < 0:
            raise ValueError(f"pooling needs kernel_size, stride >= 1 and padding >= 0, got "
                             f"kernel_size={k}, stride={s}, padding={p}")
        if p[0] > k[0] // 2 or p[1] > k[1] // 2:
            # as in PyTorch: a window must never lie entirely in the padding
            raise ValueError(f"padding {p} must be at most half the kernel size {k}")
        n, c, h, w = shape
        if h + 2 * p[0] < k[0] or w + 2 * p[1] < k[1]:
            raise ValueError(f"kernel_size {k} is larger than the padded input "
                             f"{h + 2 * p[0]}x{w + 2 * p[1]}")
        self.shape, self.k, self.s, self.p, self.cnhw = tuple(shape), k, s, p, cnhw
        self.out = ((h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1)
        self.hs = (k[0] - 1) // s[0] + self.out[0]
        self.ws = (k[1] - 1) // s[1] + self.out[1]
        self.size = n * c * self.hs * self.ws  # elements of one flattened phase
        self.n_rows = self.size - (k[1] - 1) // s[1]  # length of the row results
        self.n_out = self.n_rows - (k[0] - 1) // s[0] * self.ws  # length of the output
        # (column phase, flat shift) of each column tap; (row phase, shift) of each row tap
        self.col_taps = [(j % s[1], j // s[1]) for j in range(k[1])]
        self.row_taps = [(i % s[0], i // s[0] * self.ws) for i in range(k[0])]
        self.phases = sorted({(a, b) for a, _ in self.row_taps for b, _ in self.col_taps})

    def planes(self, xp, dtype, h, w, zeros=False):
        """A new (N, C, h, w) array in the input's layout: (memory, logical view)."""
        a = new_in_layout(xp, self.shape[:2] + (h, w), dtype, self.cnhw, zeros)
        return stored(a, self.cnhw), a

    def span(self, axis, phase):
        """Phase elements [u0, u1) along ``axis`` (0: H, 1: W) hold input
        indices i0, i0 + s, ...: phase element u is padded index u*s + phase."""
        s, pad = self.s[axis], self.p[axis]
        size, count = self.shape[2 + axis], (self.hs, self.ws)[axis]
        u0 = max(0, -((phase - pad) // s))  # ceil((pad - phase) / s): the first inside the input
        u1 = max(u0, min(count, (size - 1 + pad - phase) // s + 1))
        return u0, u1, u0 * s + phase - pad

    def split(self, x, value):
        """Space-to-depth: {(a, b): flat phase (Hs*Ws*N*C,)}, padding = value."""
        xp = backend.get_array_module(x)
        phases = {}
        for a, b in self.phases:
            (u0, u1, h0), (v0, v1, w0) = self.span(0, a), self.span(1, b)
            memory, t = self.planes(xp, x.dtype, self.hs, self.ws)
            t[:, :, :u0] = value  # the padding and the unused rows/columns
            t[:, :, u1:] = value
            t[:, :, u0:u1, :v0] = value
            t[:, :, u0:u1, v1:] = value
            if u1 > u0 and v1 > v0:
                t[:, :, u0:u1, v0:v1] = x[:, :, h0:h0 + self.s[0] * (u1 - u0 - 1) + 1:self.s[0],
                                          w0:w0 + self.s[1] * (v1 - v0 - 1) + 1:self.s[1]]
            phases[a, b] = memory.reshape(-1)
        return phases

    def merge(self, phases):
        """Depth-to-space for gradients: sum the phases back into (N, C, H, W)."""
        xp = backend.get_array_module(next(iter(phases.values())))
        # zeros: with stride > kernel some pixels lie in no window
        _, gx = self.planes(xp, next(iter(phases.values())).dtype, *self.shape[2:], zeros=True)
        for (a, b), t in phases.items():
            (u0, u1, h0), (v0, v1, w0) = self.span(0, a), self.span(1, b)
            if u1 > u0 and v1 > v0:
                gx[:, :, h0:h0 + self.s[0] * (u1 - u0 - 1) + 1:self.s[0],
                   w0:w0 + self.s[1] * (v1 - v0 - 1) + 1:self.s[1]] = \
                    self.logical(t, self.hs, self.ws)[:, :, u0:u1, v0:v1]
        return gx

    def logical(self, flat, h, w):
        """A flat array of planes in the input's layout as (N, C, h, w)."""
        n, c = self.shape[:2]
        return stored(flat.reshape(((c, n) if self.cnhw else (n, c)) + (h, w)), self.cnhw)

    def crop(self, y):
        """Flat output (n_out,) -> (N, C, P, Q), dropping the junk positions."""
        xp = backend.get_array_module(y)
        full = xp.empty(self.size, y.dtype)
        full[:self.n_out] = y
        _, out = self.planes(xp, y.dtype, *self.out)
        out[...] = self.logical(full, self.hs, self.ws)[:, :, :self.out[0], :self.out[1]]
        return out

    def uncrop(self, gy):
        """(N, C, P, Q) -> flat (n_out,), zero at the junk positions."""
        xp = backend.get_array_module(gy)
        memory, full = self.planes(xp, gy.dtype, self.hs, self.ws, zeros=True)
        full[:, :, :self.out[0], :self.out[1]] = gy
        return memory.reshape(-1)[:self.n_out]


def _max_over_taps(views):
    """Elementwise max over the views and the index of the first view holding it."""
    xp = backend.get_array_module(views[0])
    y = views[0].copy()
    argmax = xp.zeros(y.shape, numpy.uint8 if len(views) <= 256 else numpy.int32)
    for t in range(1, len(views)):
        better = views[t] > y  # strictly greater: ties keep the earlier tap, as PyTorch does
        # The last tap that raised the max is the largest t with better true:
        # a branch-free max, many times faster than a masked store.
        xp.maximum(argmax, better * argmax.dtype.type(t), out=argmax)
        xp.maximum(y, views[t], out=y)
    return y, argmax


def _max_pool2d_forward_fast(x, kernel_size, stride, padding):
    plan = _Plan(x.shape, kernel_size, stride, padding, _is_cnhw(x))
    phases = plan.split(x, -numpy.inf)  # padding never wins a max
    n1, n2 = plan.n_rows, plan.n_out
    rowmax, col_arg = {}, {}
    for a in {a for a, _ in plan.row_taps}:  # max along W within each row phase
        rowmax[a], col_arg[a] = _max_over_taps(
            [phases[a, b][shift:shift + n1] for b, shift in plan.col_taps])
    y, row_arg = _max_over_taps([rowmax[a][shift:shift + n2]
                                 for a, shift in plan.row_taps])  # then along H
    # First row holding the max, then its first column: the row-major
    # first maximum of the window, where PyTorch sends the gradient.
    return plan.crop(y), (plan, row_arg, col_arg)


def _max_pool2d_backward_fast(gy, saved, x_shape, kernel_size, stride, padding):
    xp = backend.get_array_module(gy)
    plan, row_arg, col_arg = saved
    n1, n2 = plan.n_rows, plan.n_out
    gy = plan.uncrop(gy)
    growmax = {a: xp.zeros(n1, gy.dtype) for a in col_arg}
    for t, (a, shift) in enumerate(plan.row_taps):  # windows overlap: accumulate
        growmax[a][shift:shift + n2] += gy * (row_arg == t)
    gphases = {ab: xp.zeros(plan.size, gy.dtype) for ab in plan.phases}
    for a, grow in growmax.items():
        for t, (b, shift) in enumerate(plan.col_taps):
            gphases[a, b][shift:shift + n1] += grow * (col_arg[a] == t)
    return plan.merge(gphases)


def _avg_pool2d_forward_fast(x, kernel_size, stride, padding):
    plan = _Plan(x.shape, kernel_size, stride, padding, _is_cnhw(x))
    phases = plan.split(x, 0)
    n1, n2 = plan.n_rows, plan.n_out
    rowsum = {}
    for a in {a for a, _ in plan.row_taps}:  # sum along W within each row phase
        views = [phases[a, b][shift:shift + n1] for b, shift in plan.col_taps]
        rowsum[a] = views[0].copy()
        for v in views[1:]:
            rowsum[a] += v
    views = [rowsum[a][shift:shift + n2] for a, shift in plan.row_taps]  # then along H
    y = views[0].copy()
    for v in views[1:]:
        y += v
    y *= x.dtype.type(1.0 / (plan.k[0] * plan.k[1]))  # padding counts in the divisor
    return plan.crop(y), plan


def _avg_pool2d_backward_fast(gy, plan, x_shape, kernel_size, stride, padding):
    xp = backend.get_array_module(gy)
    n1, n2 = plan.n_rows, plan.n_out
    g = plan.uncrop(gy) * gy.dtype.type(1.0 / (plan.k[0] * plan.k[1]))
    growsum = {a: xp.zeros(n1, gy.dtype) for a, _ in plan.row_taps}
    for a, shift in plan.row_taps:
        growsum[a][shift:shift + n2] += g
    gphases = {ab: xp.zeros(plan.size, gy.dtype) for ab in plan.phases}
    for a, grow in growsum.items():
        for b, shift in plan.col_taps:
            gphases[a, b][shift:shift + n1] += grow
    return plan.merge(gphases)
