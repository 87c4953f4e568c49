"""Launchers of the softmax cross-entropy kernels
(``kernels/softmax_cross_entropy.cu``), called by ``minitorch_gx.ops.loss``.
"""
import numpy

from .device import LAUNCH, defines as _defines, device_for

_i32 = numpy.int32


def _smoothing(k, label_smoothing):
    """(on, off): the target on the true class and on each other class (ops/loss.py)."""
    eps = float(label_smoothing)
    off = eps / (k - 1) if eps > 0 else 0.0
    return 1.0 - eps, off


def softmax_cross_entropy_forward(logits, labels, label_smoothing):
    """logits (N, K), labels (N,) -> (loss (N,), lse (N,)) with log-sum-exp kept for backward."""
    dev, dtype = device_for(logits), logits.dtype
    n, k = logits.shape
    logits, labels = dev.input(logits, dtype), dev.input(labels, numpy.int64)
    on, off = _smoothing(k, label_smoothing)
    loss, lse = dev.empty(n, dtype), dev.empty(n, dtype)
    threads = LAUNCH["XENT_THREADS"]
    dev.launch("softmax_cross_entropy.cu", "softmax_xent_fwd", (n,), (threads,),
               [logits, labels, loss, lse, _i32(n), _i32(k), dtype.type(on), dtype.type(off)],
               defines=_defines(dtype, "XENT_THREADS"))
    return loss, lse


def softmax_cross_entropy_backward(logits, labels, lse, gloss, label_smoothing):
    """glogits (N, K) = (softmax - target) * gloss[:, None]; gloss (N,) per-row gradients."""
    dev, dtype = device_for(logits), logits.dtype
    n, k = logits.shape
    logits, labels = dev.input(logits, dtype), dev.input(labels, numpy.int64)
    lse, gloss = dev.input(lse, dtype), dev.input(gloss, dtype)
    on, off = _smoothing(k, label_smoothing)
    gz = dev.empty((n, k), dtype)
    threads = LAUNCH["XENT_THREADS"]
    if n > 65535:
        raise ValueError(f"softmax_cross_entropy_backward handles at most 65535 rows, got {n}")
    dev.launch("softmax_cross_entropy.cu", "softmax_xent_bwd", (-(-k // threads), n), (threads,),
               [logits, labels, lse, gloss, gz, _i32(n), _i32(k), dtype.type(on),
                dtype.type(off)], defines=_defines(dtype, "XENT_THREADS"))
    return gz
