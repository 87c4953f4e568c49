"""Launchers of the batch-norm kernels (``kernels/batch_norm.cu``), called by
``minitorch_gx.ops.norm``: training forward (reduce; finalize, which also
updates the running statistics; apply), backward (reduce, finalize, apply),
inference forward and backward.
"""
import numpy

from .device import LAUNCH, blocks as _blocks, check_size as _check_size
from .device import check_threads as _check_threads, defines as _defines, device_for
from .device import inplace as _inplace
from .device import write_back as _write_back

_i32 = numpy.int32


def _bn_dims(x):
    if x.ndim < 2:
        raise ValueError(f"batch norm expects (N, C, ...) input, got shape {x.shape}")
    n, c = x.shape[0], x.shape[1]
    if c > 65535:
        raise ValueError(f"batch norm kernels handle at most 65535 channels, got {c}")
    _check_size(x=x)
    return n, c, x.size // (n * c)


def _bn_splits(m, c):
    """Chunks per channel: enough blocks to fill the GPU, >= 4 values per thread."""
    threads = LAUNCH["BN_THREADS"]
    return max(1, min(-(-2048 // c), m // (threads * 4), 1024))


def _bn_launch(dev, kernel, grid, args, dtype):
    threads = _check_threads("BN_THREADS", "batch_norm.cu")  # the reduce kernels trap on others
    dev.launch("batch_norm.cu", kernel, grid, (threads,), args,
               defines=_defines(dtype, "BN_THREADS"))


def _bn_vectors(dev, dtype, *vectors):
    return [dev.input(v, dtype) for v in vectors]


def batch_norm_train_forward(x, gamma, beta, eps, relu, running_mean=None, running_var=None,
                             momentum=0.1):
    """x (N, C, H, W) -> y, batch mean (C,), invstd (C,); ReLU fused if relu.
    running_mean/running_var (C,), when given, are updated in place by
    bn_fwd_finalize (kernels/batch_norm.cu)."""
    dev, dtype = device_for(x), x.dtype
    n, c, hw = _bn_dims(x)
    x = dev.input(x, dtype)
    gamma, beta = _bn_vectors(dev, dtype, gamma, beta)
    splits = _bn_splits(n * hw, c)
    part = dev.empty(c * splits * 3, dtype)
    _bn_launch(dev, "bn_fwd_reduce", (splits, c), [x, part, _i32(n), _i32(c), _i32(hw),
                                                   _i32(splits)], dtype)
    mean, invstd, scale, shift = (dev.empty(c, dtype) for _ in range(4))
    update = running_mean is not None
    if update:
        rm = _inplace(dev, running_mean, dtype, "running_mean")
        rv = _inplace(dev, running_var, dtype, "running_var")
    else:  # not read: the kernel touches them only when update != 0
        rm = rv = mean
    _bn_launch(dev, "bn_fwd_finalize", (_blocks(c, LAUNCH["BN_THREADS"]),),
               [part, _i32(splits), _i32(c), dtype.type(eps), gamma, beta, mean, invstd,
                scale, shift, rm, rv, dtype.type(momentum), _i32(update)], dtype)
    if update:
        _write_back(running_mean, rm)
        _write_back(running_var, rv)
    y = dev.empty(x.shape, dtype)
    _bn_launch(dev, "bn_fwd_apply", (splits, c), [x, y, scale, shift, _i32(n), _i32(c), _i32(hw),
                                                  _i32(splits), _i32(bool(relu))], dtype)
    dev.check_written(y, mean, invstd)
    return y, mean, invstd


def _bn_backward(dev, gy, x, y, gamma, mean, invstd, relu, inv_count):
    dtype = x.dtype
    n, c, hw = _bn_dims(x)
    gy = dev.input(gy, dtype)
    y = dev.input(y, dtype) if relu else x  # not read without relu
    gamma, mean, invstd = _bn_vectors(dev, dtype, gamma, mean, invstd)
    splits = _bn_splits(n * hw, c)
    dims = [_i32(n), _i32(c), _i32(hw), _i32(splits)]
    part = dev.empty(c * splits * 2, dtype)
    _bn_launch(dev, "bn_bwd_reduce", (splits, c), [gy, x, y, mean, part] + dims +
               [_i32(bool(relu))], dtype)
    ggamma, gbeta = dev.empty(c, dtype), dev.empty(c, dtype)
    _bn_launch(dev, "bn_bwd_finalize", (_blocks(c, LAUNCH["BN_THREADS"]),),
               [part, _i32(splits), _i32(c), invstd, ggamma, gbeta], dtype)
    gx = dev.empty(x.shape, dtype)
    _bn_launch(dev, "bn_bwd_apply", (splits, c), [gy, x, y, mean, invstd, gamma, ggamma, gbeta,
                                                  gx] + dims + [dtype.type(inv_count),
                                                                _i32(bool(relu))], dtype)
    dev.check_written(gx, ggamma, gbeta)
    return gx, ggamma, gbeta


def batch_norm_backward(gy, x, y, gamma, mean, invstd, relu):
    """Training-mode backward -> (gx, ggamma, gbeta); y is read only when relu."""
    dev = device_for(x)
    x = dev.input(x, x.dtype)
    n, c, hw = _bn_dims(x)
    return _bn_backward(dev, gy, x, y, gamma, mean, invstd, relu, 1.0 / (n * hw))


def _bn_prepare(dev, dtype, c, gamma, beta, running_mean, running_var, eps):
    invstd, scale, shift = dev.empty(c, dtype), dev.empty(c, dtype), dev.empty(c, dtype)
    gamma, beta, running_mean, running_var = _bn_vectors(dev, dtype, gamma, beta, running_mean,
                                                         running_var)
    _bn_launch(dev, "bn_infer_prepare", (_blocks(c, LAUNCH["BN_THREADS"]),),
               [gamma, beta, running_mean, running_var, dtype.type(eps), _i32(c), invstd, scale,
                shift], dtype)
    dev.check_written(invstd, scale, shift)
    return invstd, scale, shift


def batch_norm_infer_forward(x, gamma, beta, running_mean, running_var, eps, relu):
    """Eval-mode forward with the running statistics -> y like x."""
    dev, dtype = device_for(x), x.dtype
    n, c, hw = _bn_dims(x)
    x = dev.input(x, dtype)
    _, scale, shift = _bn_prepare(dev, dtype, c, gamma, beta, running_mean, running_var, eps)
    splits = _bn_splits(n * hw, c)
    y = dev.empty(x.shape, dtype)
    _bn_launch(dev, "bn_fwd_apply", (splits, c), [x, y, scale, shift, _i32(n), _i32(c), _i32(hw),
                                                  _i32(splits), _i32(bool(relu))], dtype)
    dev.check_written(y)
    return y


def batch_norm_infer_backward(gy, x, y, gamma, running_mean, running_var, eps, relu):
    """Eval-mode backward (the statistics are constants) -> (gx, ggamma, gbeta)."""
    dev, dtype = device_for(x), x.dtype
    n, c, hw = _bn_dims(x)
    x = dev.input(x, dtype)
    # only invstd is wanted here; gamma stands in for beta, which does not enter it
    invstd, _, _ = _bn_prepare(dev, dtype, c, gamma, gamma, running_mean, running_var, eps)
    return _bn_backward(dev, gy, x, y, gamma, running_mean, invstd, relu, 0.0)
