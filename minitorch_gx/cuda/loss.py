"""Launchers of the softmax cross-entropy kernels
(``kernels/softmax_cross_entropy.cu``), called by ``minitorch_gx.ops.loss``.

A label outside [0, K) is never read through by the kernels: its row's loss
and gradient come out NaN (no trap: on a GPU a trap ends the CUDA context of
the whole process). Host labels (the emulator's) are also checked here, with
a message naming the label; device labels are not, since that would make the
host wait for the device at every step: ``ops.loss`` checks the labels on the
host before they move, and a NaN loss is what the trainer's guard reports.
"""
import numpy

from .. import backend
from .device import LAUNCH, check_threads as _check_threads, defines as _defines, device_for

_i32 = numpy.int32


def _smoothing(k, label_smoothing):
    """(on, off): the target on the true class and on each other class (ops/loss.py)."""
    eps = float(label_smoothing)
    off = eps / (k - 1) if eps > 0 else 0.0
    return 1.0 - eps, off


def _check_labels(dev, labels, n, k):
    """labels (N,) class indices in [0, K), when they are on the host."""
    if tuple(labels.shape) != (n,):
        raise ValueError(f"softmax_cross_entropy: labels must have shape ({n},) for {n} rows of "
                         f"logits, got {tuple(labels.shape)}")
    if backend.get_array_module(labels) is not numpy:
        return  # on the device: the kernels make a bad label's row NaN instead
    bad = (labels < 0) | (labels >= k)
    if bool(bad.any()):
        i = int(dev.xp.argmax(bad))
        raise ValueError(f"softmax_cross_entropy: labels[{i}] = {int(labels[i])} is not a class "
                         f"index in [0, {k})")


def softmax_cross_entropy_forward(logits, labels, label_smoothing):
    """logits (N, K), labels (N,) -> (loss (N,), lse (N,)) with log-sum-exp kept for backward."""
    dev, dtype = device_for(logits), logits.dtype
    n, k = logits.shape
    logits, labels = dev.input(logits, dtype), dev.input(labels, numpy.int64)
    _check_labels(dev, labels, n, k)
    on, off = _smoothing(k, label_smoothing)
    loss, lse = dev.empty(n, dtype), dev.empty(n, dtype)
    threads = _check_threads("XENT_THREADS", "softmax_cross_entropy.cu")  # fwd traps on others
    dev.launch("softmax_cross_entropy.cu", "softmax_xent_fwd", (n,), (threads,),
               [logits, labels, loss, lse, _i32(n), _i32(k), dtype.type(on), dtype.type(off)],
               defines=_defines(dtype, "XENT_THREADS"))
    dev.check_written(loss, lse)
    return loss, lse


def softmax_cross_entropy_backward(logits, labels, lse, gloss, label_smoothing, scale=1.0):
    """glogits (N, K) = (softmax - target) * gloss[:, None] * scale; gloss (N,)
    per-row gradients, or one value for every row (the gradient of a mean or
    a sum of the losses: pass it with scale 1/N or 1, and no (N,) array is made)."""
    dev, dtype = device_for(logits), logits.dtype
    n, k = logits.shape
    logits, labels = dev.input(logits, dtype), dev.input(labels, numpy.int64)
    _check_labels(dev, labels, n, k)
    lse, gloss = dev.input(lse, dtype), dev.input(gloss, dtype)
    if gloss.size not in (1, n):
        raise ValueError(f"softmax_cross_entropy_backward: gloss must hold 1 or {n} values, "
                         f"got {gloss.size}")
    on, off = _smoothing(k, label_smoothing)
    gz = dev.empty((n, k), dtype)
    threads = LAUNCH["XENT_THREADS"]
    if n > 65535:
        raise ValueError(f"softmax_cross_entropy_backward handles at most 65535 rows, got {n}")
    dev.launch("softmax_cross_entropy.cu", "softmax_xent_bwd", (-(-k // threads), n), (threads,),
               [logits, labels, lse, gloss, gz, _i32(n), _i32(k), dtype.type(on),
                dtype.type(off), _i32(1 if gloss.size == n and n > 1 else 0), dtype.type(scale)],
               defines=_defines(dtype, "XENT_THREADS"))
    dev.check_written(gz)
    return gz


def mean_loss(loss, scale):
    """scale * loss.sum() of the (N,) losses as a 0-d array (scale 1/N: the
    mean), summed in a fixed order by one block."""
    dev, dtype = device_for(loss), loss.dtype
    loss = dev.input(loss, dtype)
    out = dev.empty((), dtype)
    threads = _check_threads("XENT_THREADS", "softmax_cross_entropy.cu")  # traps on others
    dev.launch("softmax_cross_entropy.cu", "softmax_xent_mean", (1,), (threads,),
               [loss, out, _i32(loss.size), dtype.type(scale)],
               defines=_defines(dtype, "XENT_THREADS"))
    dev.check_written(out)
    return out
