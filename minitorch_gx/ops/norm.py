"""Batch normalisation over (N, H, W) for each channel of an NCHW input,
optionally fused with the ReLU that follows it.

    training:  mean, var = batch statistics (var biased),  xhat = (x - mean) * invstd
    eval:      mean, var = running statistics,              invstd = 1 / sqrt(var + eps)
    y = gamma * xhat + beta            (then max(y, 0) when relu=True)
    running statistics (training): r = (1 - momentum) * r + momentum * batch statistic,
    with the unbiased batch variance (PyTorch's convention)

Read top-down: ``batch_norm`` and its Function ``BatchNorm2d``; the four
array-level steps (train forward, which also updates the running statistics;
backward; eval forward; eval backward), each choosing with ``backend.choose``
between a plain ``*_reference`` (the specification), the NumPy fast path and
the CUDA kernels of ``kernels/batch_norm.cu`` (launchers in
``minitorch_gx.cuda.norm``); then the references; then the fast path.
Backward keeps x, not y: each implementation recomputes the ReLU mask from x
with its forward's own arithmetic (so the mask is exactly the forward's), and
writes ggamma and gbeta into the parameters' gradient arrays when the engine
offers them (``Function.grad_buffer``).
Legend: N batch, C channels, L = H * W, M = N * L values per channel.
"""
import functools

import numpy

from .. import backend, cpu
from ..autograd import Function, Tensor
from ..cuda import device as cuda_device
from ..cuda import norm as cuda_norm


def batch_norm(x, running_mean, running_var, weight, bias, training=False, momentum=0.1,
               eps=1e-5, relu=False):
    """Batch normalisation per channel of x (N, C, H, W) (PyTorch's argument order).

    running_mean, running_var: (C,) arrays, updated in place when training
        (``r = (1 - momentum) * r + momentum * batch_stat``, unbiased batch
        variance); used instead of the batch statistics when not training.
        Both may be None only when training (then nothing is updated).
    weight, bias: gamma and beta, (C,) Tensors (None: 1 and 0, not learned).
    relu: apply ReLU to the output in the same op (one pass less over memory).
    Returns y (N, C, H, W) = gamma * (x - mean) / sqrt(var + eps) + beta.
    """
    x = x if isinstance(x, Tensor) else Tensor(x)
    if x.ndim < 2:
        raise ValueError(f"batch_norm expects (N, C, H, W) input, got shape {x.shape}")
    c = x.shape[1]
    running_mean, running_var = _array_or_none(running_mean), _array_or_none(running_var)
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm needs both running_mean and running_var, or neither")
    if running_mean is None and not training:
        raise ValueError("batch_norm in eval mode (training=False) needs running_mean and "
                         "running_var")
    if training and x.size // c <= 1:
        raise ValueError(f"batch_norm in training mode needs more than one value per channel, "
                         f"got input shape {x.shape}")
    xp = backend.get_array_module(x.data)
    weight = Tensor(xp.ones(c, x.dtype)) if weight is None else weight
    bias = Tensor(xp.zeros(c, x.dtype)) if bias is None else bias
    for name, v in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if v is not None and tuple(v.shape) != (c,):
            raise ValueError(f"batch_norm: {name} has shape {tuple(v.shape)}, expected ({c},) "
                             f"for input of shape {x.shape}")
    return BatchNorm2d(running_mean, running_var, training, momentum, eps, relu)(x, weight, bias)


def _array_or_none(v):
    return v.data if isinstance(v, Tensor) else v


class BatchNorm2d(Function):
    """Inputs (x, gamma, beta); running statistics are updated in place.
    Backward recomputes the ReLU mask from x, gamma, beta and the statistics
    (as the forward computed y) instead of keeping y."""

    def __init__(self, running_mean, running_var, training, momentum, eps, relu):
        self.running_mean, self.running_var = running_mean, running_var
        self.training, self.momentum, self.eps, self.relu = training, momentum, eps, relu

    def forward(self, x, gamma, beta):
        if self.training:
            y, self.mean, self.invstd = batch_norm_train_forward(
                x, gamma, beta, self.eps, self.relu, self.running_mean, self.running_var,
                self.momentum)
        else:
            y = batch_norm_infer_forward(x, gamma, beta, self.running_mean, self.running_var,
                                         self.eps, self.relu)
        self.x, self.gamma, self.beta = x, gamma, beta
        # On the NumPy path y itself is kept (the next op holds it anyway) for
        # the mask, read as y > 0 rather than recomputed: one pass fewer. The
        # kernels recompute it (a pass fewer there) and keep nothing.
        if self.relu and not backend.use_kernels(backend.get_array_module(x)):
            self.y = y
        if self.training:  # backward reads the batch statistics, not the running ones
            self.running_mean = self.running_var = None
        return y

    def backward(self, gy):
        # ggamma and gbeta straight into the parameters' own gradient arrays
        # while those await their first: the engine then copies nothing
        out = self.grad_buffer(1), self.grad_buffer(2)
        if self.training:
            return batch_norm_backward(gy, self.x, self.gamma, self.beta, self.mean, self.invstd,
                                       self.relu, *out, y=getattr(self, "y", None))
        return batch_norm_infer_backward(gy, self.x, self.gamma, self.beta, self.running_mean,
                                         self.running_var, self.eps, self.relu, *out)


# --------------------------------------------------------------------------
# The array-level steps: reference, NumPy fast path or CUDA kernel.
# --------------------------------------------------------------------------
def batch_norm_train_forward(x, gamma, beta, eps, relu, running_mean=None, running_var=None,
                             momentum=0.1):
    """x (N, C, H, W); gamma, beta (C,) -> y like x, batch mean (C,), invstd (C,)
    = 1 / sqrt(biased batch var + eps). ``running_mean``/``running_var`` (C,),
    when given, are updated in place (by the kernels, in the last block of each
    channel's reduction)."""
    impl = backend.choose(x, reference=batch_norm_train_forward_reference,
                          fast=_train_forward_fast, kernel=cuda_norm.batch_norm_train_forward)
    return impl(x, gamma, beta, eps, relu, running_mean, running_var, momentum)


def batch_norm_backward(gy, x, gamma, beta, mean, invstd, relu, ggamma_out=None,
                        gbeta_out=None, y=None):
    """Training-mode backward -> (gx, ggamma, gbeta); mean and invstd =
    1 / sqrt(var + eps) are the forward's. The ReLU mask is recomputed from x,
    gamma, beta, mean and invstd exactly as the forward computed y.
    ggamma_out, gbeta_out (C,), when given: the arrays to write ggamma and
    gbeta into (a parameter's own gradient, ``Function.grad_buffer``), then
    returned themselves. ``y``: the forward's output, when kept; the NumPy
    fast path then reads its mask from it (the same mask, one pass fewer on a
    CPU); the kernels recompute it, which saves a pass on a GPU."""
    impl = backend.choose(x, reference=batch_norm_backward_reference,
                          fast=functools.partial(_backward_fast, y=y),
                          kernel=cuda_norm.batch_norm_backward)
    return impl(gy, x, gamma, beta, mean, invstd, relu, ggamma_out, gbeta_out)


def batch_norm_infer_forward(x, gamma, beta, running_mean, running_var, eps, relu):
    """Eval-mode forward with the running statistics -> y like x."""
    impl = backend.choose(x, reference=batch_norm_infer_forward_reference,
                          fast=_infer_forward_fast, kernel=cuda_norm.batch_norm_infer_forward)
    return impl(x, gamma, beta, running_mean, running_var, eps, relu)


def batch_norm_infer_backward(gy, x, gamma, beta, running_mean, running_var, eps, relu,
                              ggamma_out=None, gbeta_out=None):
    """Eval-mode backward (statistics are constants) -> (gx, ggamma, gbeta);
    the mask and ggamma_out, gbeta_out as for ``batch_norm_backward``."""
    impl = backend.choose(x, reference=batch_norm_infer_backward_reference,
                          fast=_infer_backward_fast, kernel=cuda_norm.batch_norm_infer_backward)
    return impl(gy, x, gamma, beta, running_mean, running_var, eps, relu, ggamma_out, gbeta_out)


# --------------------------------------------------------------------------
# References: the equations written out, broadcasting over (N, C, H, W).
# --------------------------------------------------------------------------
def _stat_axes(x):
    return (0,) + tuple(range(2, x.ndim))  # every axis but the channel axis


def _bcast(v, x):
    """(C,) -> (1, C, 1, 1) for broadcasting against x."""
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def _affine_reference(x, gamma, beta, mean, invstd):
    """y before the ReLU, gamma * (x - mean) * invstd + beta. Backward
    recomputes it from the same arrays for the mask (y > 0): the forward's."""
    return _bcast(gamma, x) * ((x - _bcast(mean, x)) * _bcast(invstd, x)) + _bcast(beta, x)


def _into(out, value, dtype):
    """A (C,) gradient as the result: written into ``out`` and ``out`` itself
    returned when given, else ``value`` in ``dtype``."""
    if out is None:
        return value.astype(dtype)
    out[...] = value
    return out


def batch_norm_train_forward_reference(x, gamma, beta, eps, relu, running_mean=None,
                                       running_var=None, momentum=0.1):
    xp = backend.get_array_module(x)
    axes = _stat_axes(x)
    mean = x.mean(axis=axes)
    var = ((x - _bcast(mean, x)) ** 2).mean(axis=axes)  # two passes: no cancellation
    if running_mean is not None:
        update_running_reference(running_mean, running_var, mean, var, x.size // x.shape[1],
                                 momentum)
    mean, invstd = mean.astype(x.dtype), (1 / xp.sqrt(var + eps)).astype(x.dtype)
    y = _affine_reference(x, gamma, beta, mean, invstd)
    if relu:
        y = xp.maximum(y, 0)
    return y.astype(x.dtype, copy=False), mean, invstd


def update_running_reference(running_mean, running_var, mean, var, m, momentum):
    """In place: r = (1 - momentum) r + momentum * statistic; the variance
    unbiased, var * m / (m - 1), as PyTorch does (the normalisation uses the
    biased one)."""
    running_mean *= 1 - momentum
    running_mean += (momentum * mean).astype(running_mean.dtype, copy=False)
    running_var *= 1 - momentum
    running_var += (momentum * m / (m - 1) * var).astype(running_var.dtype, copy=False)


def batch_norm_backward_reference(gy, x, gamma, beta, mean, invstd, relu, ggamma_out=None,
                                  gbeta_out=None):
    axes = _stat_axes(x)
    m = x.size // x.shape[1]
    g = gy * (_affine_reference(x, gamma, beta, mean, invstd) > 0) if relu else gy
    xhat = (x - _bcast(mean, x)) * _bcast(invstd, x)
    gbeta = g.sum(axis=axes)
    ggamma = (g * xhat).sum(axis=axes)
    # mean and var depend on x too: subtract the gradient's mean and its
    # projection onto xhat (the standard batch-norm backward).
    gx = _bcast(gamma * invstd, x) * (g - _bcast(gbeta, x) / m - xhat * _bcast(ggamma, x) / m)
    return (gx.astype(x.dtype, copy=False), _into(ggamma_out, ggamma, x.dtype),
            _into(gbeta_out, gbeta, x.dtype))


def batch_norm_infer_forward_reference(x, gamma, beta, running_mean, running_var, eps, relu):
    xp = backend.get_array_module(x)
    y = _affine_reference(x, gamma, beta, running_mean, 1 / xp.sqrt(running_var + eps))
    if relu:
        y = xp.maximum(y, 0)
    return y.astype(x.dtype, copy=False)


def batch_norm_infer_backward_reference(gy, x, gamma, beta, running_mean, running_var, eps, relu,
                                        ggamma_out=None, gbeta_out=None):
    xp = backend.get_array_module(x)
    axes = _stat_axes(x)
    invstd = 1 / xp.sqrt(running_var + eps)
    g = gy * (_affine_reference(x, gamma, beta, running_mean, invstd) > 0) if relu else gy
    xhat = (x - _bcast(running_mean, x)) * _bcast(invstd, x)
    gx = g * _bcast(gamma * invstd, x)  # the statistics are constants here
    return (gx.astype(x.dtype, copy=False), _into(ggamma_out, (g * xhat).sum(axis=axes), x.dtype),
            _into(gbeta_out, g.sum(axis=axes), x.dtype))


# --------------------------------------------------------------------------
# Fast path. Each channel's values are reached through one of two views of
# the memory (``_layout``), and the passes below are written once for both:
#   NCHW: (N, C*L). Reductions run over N first (adding whole contiguous
#     rows), then over L on a small (C, L) array in float64; per-channel
#     constants are repeated to (C*L,), so each elementwise pass has one long
#     inner loop even for the 7x7 and smaller maps of the last stage, where a
#     (C, 1) broadcast would run C*N loops of only L numbers.
#   CNHW (the NumPy path's activations, as the GPU path's): (C, N*L), one
#     contiguous row per channel. Reductions run along the rows, in pieces of
#     whole images summed in float64; constants broadcast as (C, 1).
# Channel statistics are computed in float64; the blocks of channels run
# over the threads (``minitorch_gx.cpu``), each channel's arithmetic the
# same whatever the blocks.
# --------------------------------------------------------------------------
def _dims(x):
    n, c = x.shape[0], x.shape[1]
    return n, c, x.size // (n * c)


class _NCHW:
    """x's memory seen as (N, C*L); channel block [c0, c1) is a column range."""

    def __init__(self, x):
        self.shape = x.shape
        self.n, self.c, self.length = _dims(x)

    def matrix(self, a):
        xp = backend.get_array_module(a)
        return xp.ascontiguousarray(a).reshape(self.n, self.c * self.length)  # (N, C*L)

    def new(self, dtype, xp):
        return xp.empty((self.n, self.c * self.length), dtype)

    def block(self, a2, c0, c1):
        return a2[:, c0 * self.length:c1 * self.length]

    def sum(self, b):
        """(N, cb*L) -> (cb,) float64: sum over N, then over L."""
        return b.sum(axis=0).reshape(-1, self.length).sum(axis=1, dtype=numpy.float64)

    def dot(self, a, b):
        """sum of a * b per channel, (cb,) float64, without an a * b temporary."""
        xp = backend.get_array_module(a)
        return xp.einsum("nk,nk->k", a, b).reshape(-1, self.length).sum(axis=1,
                                                                        dtype=numpy.float64)

    def spread(self, v, dtype):
        """(cb,) -> (cb*L,): the channel's value at every position of one sample."""
        xp = backend.get_array_module(v)
        return xp.repeat(v.astype(dtype, copy=False), self.length)

    def array(self, a2):
        return a2.reshape(self.shape)


class _CNHW(_NCHW):
    """CNHW memory seen as (C, N*L); channel block [c0, c1) is a row range.
    Rows are reduced in pieces of ``images`` whole images (at least ~1024
    values, or the whole row), each piece in x's dtype, the pieces in float64."""

    PIECE = 1024

    def __init__(self, x):
        super().__init__(x)
        self.m = self.n * self.length
        self.images = next((j for j in range(1, self.n + 1)
                            if self.n % j == 0 and j * self.length >= self.PIECE), self.n)

    def matrix(self, a):
        memory = cuda_device.stored(cuda_device.in_layout(a, True), True)  # (C, N, H, W)
        return memory.reshape(self.c, self.m)                               # (C, N*L)

    def new(self, dtype, xp):
        return xp.empty((self.c, self.m), dtype)

    def block(self, a2, c0, c1):
        return a2[c0:c1]

    def _pieces(self, b):
        return b.reshape(b.shape[0], self.m // (self.images * self.length),
                         self.images * self.length)   # (cb, pieces, values)

    def sum(self, b):
        return self._pieces(b).sum(axis=2).sum(axis=1, dtype=numpy.float64)

    def dot(self, a, b):
        xp = backend.get_array_module(a)
        return xp.einsum("cjk,cjk->cj", self._pieces(a), self._pieces(b)).sum(
            axis=1, dtype=numpy.float64)

    def spread(self, v, dtype):
        return v.astype(dtype, copy=False)[:, None]

    def array(self, a2):
        n, c = self.shape[:2]
        return cuda_device.stored(a2.reshape((c, n) + tuple(self.shape[2:])), True)


def _layout(x):
    return _CNHW(x) if cuda_device.is_cnhw(x) else _NCHW(x)


def _affine_fast(lay, d, gamma, beta, invstd, out=None):
    """d = x - mean (a block of ``lay``'s matrix) -> y before the ReLU,
    d * (gamma * invstd) + beta in d's dtype (into ``out``: d itself in the
    forward). Backward recomputes the mask with it from the same arrays, so
    the mask is the forward's."""
    xp = backend.get_array_module(d)
    dtype = d.dtype
    k = gamma.astype(dtype, copy=False) * invstd.astype(dtype, copy=False)
    y = xp.multiply(d, lay.spread(k, dtype), out=out)
    y += lay.spread(beta, dtype)
    return y


def _masked(lay, gy2, d, gamma, beta, invstd, relu):
    """The gradient that reaches the affine output: ReLU passed it where y > 0."""
    if not relu:
        return gy2
    y = _affine_fast(lay, d, gamma, beta, invstd)
    return cpu.relu_gradient_into(y, gy2, y)  # into y's memory (a NumPy array: the NumPy path)


# CNHW channels are passed over a few at a time, as many as fit in about
# this many bytes, so that a block written by one pass is still in cache for
# the next (the NCHW view's blocks are strided columns of N rows: too costly
# to cut further). Smaller pieces were slower: each costs a dozen NumPy
# calls, and short ones cost more than the cache saves. Whole batch-32 64x64
# steps, the value alternating in one process (benchmarks/bench_min_block.py
# --vary bn_piece_bytes, 8 rounds), batch norm's forward and backward took
# 57.6 and 81.5 ms at 4 MiB, 64.9 and 89.1 at 1 MiB, 110.3 and 130.1 at
# 256 KiB. (There, on two threads, a block of channels is at most 4 MiB:
# larger pieces would change nothing.)
PIECE_BYTES = 4 << 20


def _channel_blocks(fn, lay, itemsize):
    """fn(c0, c1) for fixed blocks of channels, split over the NumPy path's
    threads (``minitorch_gx.cpu``), CNHW blocks cut into pieces of
    PIECE_BYTES; every channel's arithmetic is the same whatever the blocks,
    so the result does not depend on the thread count or the pieces."""
    per_channel = lay.n * lay.length
    piece = max(1, PIECE_BYTES // (per_channel * itemsize)) if isinstance(lay, _CNHW) else lay.c

    def block(c0, c1):
        for a in range(c0, c1, piece):
            fn(a, min(a + piece, c1))

    cpu.run_blocks(block, lay.c, min_rows=-(-cpu.min_block_elements() // per_channel),
                   gemms=False)  # (einsum's products are its own loops, not BLAS)


def _train_forward_fast(x, gamma, beta, eps, relu, running_mean, running_var, momentum):
    xp = backend.get_array_module(x)
    lay = _layout(x)
    c, m = lay.c, lay.n * lay.length
    x2 = lay.matrix(x)
    y2 = lay.new(x.dtype, xp)
    mean, var, invstd = (xp.empty(c, x.dtype) for _ in range(3))

    def channels(c0, c1):
        xs = lay.block(x2, c0, c1)
        mu = lay.sum(xs) / m
        # d = x - mean, in y's memory; becomes y in place
        d = xp.subtract(xs, lay.spread(mu, x.dtype), out=lay.block(y2, c0, c1))
        v = lay.dot(d, d) / m  # two-pass variance: sum (x - mean)^2
        # the statistics in x's dtype before invstd, as the kernels and the
        # reference compute them (float64 here would change every result in
        # its last bits, and with them a whole training run)
        mean[c0:c1], var[c0:c1] = mu, v
        invstd[c0:c1] = 1 / xp.sqrt(var[c0:c1] + eps)
        _affine_fast(lay, d, gamma[c0:c1], beta[c0:c1], invstd[c0:c1], out=d)
        if relu:
            cpu.relu_into(d)  # (a NumPy array: this is the NumPy path)

    _channel_blocks(channels, lay, x.dtype.itemsize)
    if running_mean is not None:
        update_running_reference(running_mean, running_var, mean, var, m, momentum)
    return lay.array(y2), mean, invstd


def _backward_fast(gy, x, gamma, beta, mean, invstd, relu, ggamma_out=None, gbeta_out=None,
                   y=None):
    xp = backend.get_array_module(gy)
    lay = _layout(x)
    c, m = lay.c, lay.n * lay.length
    dtype = x.dtype
    x2, gy2 = lay.matrix(x), lay.matrix(gy)
    y2 = None if y is None or not relu else lay.matrix(y)
    gx2 = lay.new(dtype, xp)
    ggamma, gbeta = xp.empty(c, numpy.float64), xp.empty(c, numpy.float64)

    def channels(c0, c1):
        d = xp.subtract(lay.block(x2, c0, c1), lay.spread(mean[c0:c1], dtype),
                        out=lay.block(gx2, c0, c1))  # x - mean, in gx's memory; becomes gx
        gys = lay.block(gy2, c0, c1)
        if y2 is not None:  # the forward's y: y > 0 is the mask it applied
            g = cpu.relu_gradient_into(xp.empty_like(gys), gys, lay.block(y2, c0, c1))
        else:
            g = _masked(lay, gys, d, gamma[c0:c1], beta[c0:c1], invstd[c0:c1], relu)
        gb = lay.sum(g)
        inv = invstd[c0:c1].astype(numpy.float64)
        gg = lay.dot(g, d) * inv  # sum g * xhat, centred: no cancellation
        # gx = k * (g - gbeta / M - xhat * ggamma / M),  k = gamma * invstd,
        # built in place in d: d * (-invstd * ggamma / M) - gbeta / M + g, times k.
        k = gamma[c0:c1].astype(numpy.float64) * inv
        d *= lay.spread(-inv * gg / m, dtype)
        d += lay.spread(-gb / m, dtype)
        d += g
        d *= lay.spread(k, dtype)
        ggamma[c0:c1], gbeta[c0:c1] = gg, gb

    _channel_blocks(channels, lay, x.dtype.itemsize)
    return lay.array(gx2), _into(ggamma_out, ggamma, dtype), _into(gbeta_out, gbeta, dtype)


def _running_invstd(running_var, eps):
    xp = backend.get_array_module(running_var)
    return 1 / xp.sqrt(running_var.astype(numpy.float64) + eps)


def _infer_forward_fast(x, gamma, beta, running_mean, running_var, eps, relu):
    lay = _layout(x)
    d = lay.matrix(x) - lay.spread(running_mean, x.dtype)  # x - mean, a new array
    y = _affine_fast(lay, d, gamma, beta, _running_invstd(running_var, eps), out=d)
    if relu:
        cpu.relu_into(y)
    return lay.array(y)


def _infer_backward_fast(gy, x, gamma, beta, running_mean, running_var, eps, relu,
                         ggamma_out=None, gbeta_out=None):
    xp = backend.get_array_module(x)
    lay = _layout(x)
    dtype = x.dtype
    invstd = _running_invstd(running_var, eps)
    d = lay.matrix(x) - lay.spread(running_mean, dtype)  # x - mean, a new array
    g = _masked(lay, lay.matrix(gy), d, gamma, beta, invstd, relu)
    ggamma = lay.dot(g, d) * invstd
    gbeta = lay.sum(g)
    d = xp.multiply(g, lay.spread(gamma * invstd, dtype), out=d)  # reuse the buffer
    return lay.array(d), _into(ggamma_out, ggamma, dtype), _into(gbeta_out, gbeta, dtype)
