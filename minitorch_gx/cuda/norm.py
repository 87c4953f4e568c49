"""Launchers of the batch-norm kernels (``kernels/batch_norm.cu``), called by
``minitorch_gx.ops.norm``: training forward (bn_fwd_reduce, whose last block
per channel also finalizes the statistics and updates the running ones;
bn_fwd_apply), backward (bn_bwd_reduce, finalizing ggamma and gbeta the same
way; bn_bwd_apply), inference forward and backward (bn_infer_prepare first).

The reduce kernels find the last block of each channel with a per-channel
counter (``_arrival_counts``): a small device buffer kept here, zeroed once per
device and left at zero by every launch.

Activations in CNHW memory (the GPU path's layout, see ``device.py``) are
normalised as they are: the (1, C, N*H*W) array of their memory has the same
statistics, in one long run per channel, and the results keep the layout.
"""
import weakref

import numpy

from .device import LAUNCH, blocks as _blocks, check_size as _check_size
from .device import check_threads as _check_threads, defines as _defines, device_for
from .device import inplace as _inplace, is_cnhw as _is_cnhw
from .device import write_back as _write_back

_i32 = numpy.int32
MAX_CHANNELS = 65535  # the kernels' grid.y


def _bn_dims(x):
    if x.ndim < 2:
        raise ValueError(f"batch norm expects (N, C, ...) input, got shape {x.shape}")
    n, c = x.shape[0], x.shape[1]
    if c > MAX_CHANNELS:
        raise ValueError(f"batch norm kernels handle at most {MAX_CHANNELS} channels, got {c}")
    _check_size(x=x)
    return n, c, x.size // (n * c)


def _channel_rows(x):
    """(x as the kernels take it, a function giving a result x's layout): a
    CNHW array becomes the (1, C, N*H*W) array of its memory (a view)."""
    if not _is_cnhw(x):
        return x, lambda a: a
    n, c = x.shape[:2]
    rest = tuple(x.shape[2:])
    return (x.transpose(1, 0, 2, 3).reshape(1, c, -1),
            lambda a: a.reshape((c, n) + rest).transpose(1, 0, 2, 3))


def _like_rows(a, x_was_cnhw, rows_shape):
    """``a`` (x's logical shape) in the kernels' view of x: through x's memory
    order when x was CNHW (a copy if ``a`` is not CNHW itself)."""
    return a.transpose(1, 0, 2, 3).reshape(rows_shape) if x_was_cnhw else a


def _bn_splits(m, c):
    """Chunks per channel: enough blocks to fill the GPU, >= 4 values per thread."""
    threads = LAUNCH["BN_THREADS"]
    return max(1, min(-(-2048 // c), m // (threads * 4), 1024))


def _vec(hw, *arrays):
    """1 when the kernels may move 16 bytes at a time: a plane holds whole
    vectors (HW a multiple of 16 / itemsize) and every array starts 16-byte
    aligned (a view into a buffer may not); else 0, one value at a time."""
    aligned = all(_address(a) % 16 == 0 for a in arrays)
    return _i32(hw % (16 // arrays[0].itemsize) == 0 and aligned)


def _address(a):
    return a.ctypes.data if isinstance(a, numpy.ndarray) else a.data.ptr


_COUNTS = weakref.WeakKeyDictionary()  # device -> {GPU id: uint32 (MAX_CHANNELS,) zeros}


def _arrival_counts(dev, x, c):
    """count (C,) of the reduce kernels: the blocks of channel c that are done.
    Each launch leaves it zero (the channel's last block resets it), so it is
    made and zeroed once per device (one host-to-device copy of 256 KB), not per
    step. A launch that stops part-way drops it (``_bn_launch``)."""
    per_gpu = _COUNTS.setdefault(dev, {})
    gpu = getattr(getattr(x, "device", None), "id", None)  # CuPy: the GPU; NumPy: None
    if gpu not in per_gpu:
        per_gpu[gpu] = dev.input(numpy.zeros(MAX_CHANNELS, numpy.uint32), numpy.uint32)
    return per_gpu[gpu][:c]


def _bn_launch(dev, kernel, grid, args, dtype):
    threads = _check_threads("BN_THREADS", "batch_norm.cu")  # the reduce kernels trap on others
    try:
        dev.launch("batch_norm.cu", kernel, grid, (threads,), args,
                   defines=_defines(dtype, "BN_THREADS"))
    except BaseException:
        # stopped part-way (an emulator report; on a GPU the context is lost
        # anyway): some counts may not be back at zero, so start afresh
        _COUNTS.pop(dev, None)
        raise


def _bn_vectors(dev, dtype, *vectors):
    return [dev.input(v, dtype) for v in vectors]


def _output(dev, out, c, dtype):
    """The (C,) array a kernel writes a parameter gradient into: ``out`` itself
    (a parameter's own gradient array) when the kernel can write it, that is
    C-contiguous of the kernel's dtype, else a new one (see ``_returned``)."""
    if out is not None and out.dtype == dtype and out.flags.c_contiguous:
        return out
    return dev.empty(c, dtype)


def _returned(out, written):
    """What the launcher returns for an ``_output``: ``out`` holding the result
    (copied into it only if the kernel wrote elsewhere), or the new array."""
    if out is None:
        return written
    _write_back(out, written)
    return out


def batch_norm_train_forward(x, gamma, beta, eps, relu, running_mean=None, running_var=None,
                             momentum=0.1):
    """x (N, C, H, W) -> y, batch mean (C,), invstd (C,); ReLU fused if relu.
    Two launches: bn_fwd_reduce (the statistics; the last block of each
    channel also updates running_mean/running_var (C,) in place, when given)
    and bn_fwd_apply, y = (x - mean) * gamma * invstd + beta."""
    dev, dtype = device_for(x), x.dtype
    x, restore = _channel_rows(x)
    n, c, hw = _bn_dims(x)
    x = dev.input(x, dtype)
    gamma, beta = _bn_vectors(dev, dtype, gamma, beta)
    splits = _bn_splits(n * hw, c)
    y = dev.empty(x.shape, dtype)
    dims = [_i32(n), _i32(c), _i32(hw), _i32(splits), _vec(hw, x, y)]
    mean, invstd = dev.empty(c, dtype), dev.empty(c, dtype)
    update = running_mean is not None
    if update:
        rm = _inplace(dev, running_mean, dtype, "running_mean")
        rv = _inplace(dev, running_var, dtype, "running_var")
    else:  # not read: the kernel touches them only when update != 0
        rm = rv = mean
    part = dev.empty(c * splits * 3, dtype)
    _bn_launch(dev, "bn_fwd_reduce", (splits, c),
               [x, part, _arrival_counts(dev, x, c), mean, invstd, rm, rv] + dims +
               [dtype.type(eps), dtype.type(momentum), _i32(update)], dtype)
    if update:
        _write_back(running_mean, rm)
        _write_back(running_var, rv)
    _bn_launch(dev, "bn_fwd_apply", (splits, c), [x, y, mean, invstd, gamma, beta] + dims +
               [_i32(bool(relu))], dtype)
    dev.check_written(y, mean, invstd)
    return restore(y), mean, invstd


def _bn_backward(dev, gy, x, gamma, beta, mean, invstd, relu, inv_count, ggamma_out, gbeta_out):
    """bn_bwd_reduce (gbeta, ggamma, by the last block of each channel) and
    bn_bwd_apply (gx); both recompute the ReLU mask from x as the forward did.
    x (and gy, brought to it) and gx in x's layout."""
    dtype = x.dtype
    cnhw = _is_cnhw(x)
    x, restore = _channel_rows(x)
    x = dev.input(x, dtype)
    n, c, hw = _bn_dims(x)
    gy = dev.input(_like_rows(gy, cnhw, x.shape), dtype)
    vectors = _bn_vectors(dev, dtype, mean, invstd, gamma, beta)
    splits = _bn_splits(n * hw, c)
    gx = dev.empty(x.shape, dtype)
    dims = [_i32(n), _i32(c), _i32(hw), _i32(splits), _vec(hw, gy, x, gx)]
    ggamma, gbeta = _output(dev, ggamma_out, c, dtype), _output(dev, gbeta_out, c, dtype)
    part = dev.empty(c * splits * 2, dtype)
    _bn_launch(dev, "bn_bwd_reduce", (splits, c),
               [gy, x] + vectors + [part, _arrival_counts(dev, x, c), ggamma, gbeta] + dims +
               [_i32(bool(relu))], dtype)
    _bn_launch(dev, "bn_bwd_apply", (splits, c), [gy, x] + vectors + [ggamma, gbeta, gx] + dims +
               [dtype.type(inv_count), _i32(bool(relu))], dtype)
    dev.check_written(gx, ggamma, gbeta)
    return restore(gx), _returned(ggamma_out, ggamma), _returned(gbeta_out, gbeta)


def batch_norm_backward(gy, x, gamma, beta, mean, invstd, relu, ggamma_out=None,
                        gbeta_out=None):
    """Training-mode backward -> (gx, ggamma, gbeta), two launches; mean and
    invstd are the forward's. ggamma_out, gbeta_out (C,): when given,
    bn_bwd_reduce writes the parameter gradients straight into them (on a GPU
    they must be C-contiguous of x's dtype, else they are copied in) and they
    are the arrays returned."""
    dev = device_for(x)
    n, c, hw = _bn_dims(x)
    return _bn_backward(dev, gy, x, gamma, beta, mean, invstd, relu, 1.0 / (n * hw),
                        ggamma_out, gbeta_out)


def _bn_invstd(dev, dtype, c, running_var, eps):
    invstd = dev.empty(c, dtype)
    running_var = dev.input(running_var, dtype)
    _bn_launch(dev, "bn_infer_prepare", (_blocks(c, LAUNCH["BN_THREADS"]),),
               [running_var, dtype.type(eps), _i32(c), invstd], dtype)
    dev.check_written(invstd)
    return invstd


def batch_norm_infer_forward(x, gamma, beta, running_mean, running_var, eps, relu):
    """Eval-mode forward with the running statistics -> y like x (bn_infer_prepare,
    bn_fwd_apply)."""
    dev, dtype = device_for(x), x.dtype
    x, restore = _channel_rows(x)
    n, c, hw = _bn_dims(x)
    x = dev.input(x, dtype)
    invstd = _bn_invstd(dev, dtype, c, running_var, eps)
    mean, gamma, beta = _bn_vectors(dev, dtype, running_mean, gamma, beta)
    splits = _bn_splits(n * hw, c)
    y = dev.empty(x.shape, dtype)
    dims = [_i32(n), _i32(c), _i32(hw), _i32(splits), _vec(hw, x, y)]
    _bn_launch(dev, "bn_fwd_apply", (splits, c), [x, y, mean, invstd, gamma, beta] + dims +
               [_i32(bool(relu))], dtype)
    dev.check_written(y)
    return restore(y)


def batch_norm_infer_backward(gy, x, gamma, beta, running_mean, running_var, eps, relu,
                              ggamma_out=None, gbeta_out=None):
    """Eval-mode backward (the statistics are constants) -> (gx, ggamma, gbeta);
    ggamma_out, gbeta_out as for ``batch_norm_backward``."""
    dev, dtype = device_for(x), x.dtype
    n, c, hw = _bn_dims(x)
    invstd = _bn_invstd(dev, dtype, c, running_var, eps)
    return _bn_backward(dev, gy, x, gamma, beta, running_mean, invstd, relu, 0.0, ggamma_out,
                        gbeta_out)
