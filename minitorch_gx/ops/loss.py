"""Classification losses and metrics: log_softmax, cross_entropy with label
smoothing, top-k accuracy.

Legend: N samples, K classes; logits (N, K), labels (N,) integers in [0, K).
Everything is computed from log_softmax = z - log(sum(exp(z))), z = x - max(x),
so no exp overflows and no log sees a zero.

The softmax cross-entropy has two implementations, picked by
``backend.choose`` as a (forward, backward) pair: the NumPy one below
(reference and fast path at once: it is a few whole-array passes), and one
fused CUDA pass per row (``kernels/softmax_cross_entropy.cu``, launchers in
``minitorch_gx.cuda.loss``) that keeps only the log-sum-exp for backward.
"""
import numpy

from .. import backend
from ..autograd import Function, Tensor
from ..cuda import loss as cuda_loss


def _log_softmax(x, axis):
    xp = backend.get_array_module(x)
    z = x - x.max(axis=axis, keepdims=True)  # the log-sum-exp shift
    return z - xp.log(xp.exp(z).sum(axis=axis, keepdims=True))


class LogSoftmax(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        self.y = _log_softmax(x, self.axis)
        return self.y

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        # d y_i / d x_j = delta_ij - softmax_j
        return (gy - xp.exp(self.y) * gy.sum(axis=self.axis, keepdims=True),)


def log_softmax(x, axis=-1):
    """``log(softmax(x))`` along ``axis``, computed stably (log-sum-exp)."""
    return LogSoftmax(axis)(x)


class CrossEntropy(Function):
    """Input logits (N, K); labels, smoothing and reduction are configuration."""

    def __init__(self, labels, label_smoothing, reduction):
        self.labels, self.eps, self.reduction = labels, label_smoothing, reduction

    def forward(self, logits):
        xp = backend.get_array_module(logits)
        forward, self.backward_impl = backend.choose(
            logits, reference=(softmax_cross_entropy_forward_reference,
                               softmax_cross_entropy_backward_reference),
            fast=(softmax_cross_entropy_forward_reference,
                  softmax_cross_entropy_backward_reference),
            kernel=(cuda_loss.softmax_cross_entropy_forward,
                    cuda_loss.softmax_cross_entropy_backward))
        self.logits = logits
        loss, self.saved = forward(logits, self.labels, self.eps)  # (N,), what backward needs
        if self.reduction in ("mean", "sum") and forward is cuda_loss.softmax_cross_entropy_forward:
            # one block adds the losses in a fixed order (kernels/softmax_cross_entropy.cu)
            return cuda_loss.mean_loss(loss, 1.0 / len(loss) if self.reduction == "mean" else 1.0)
        # NumPy reductions return scalars; a 0-d array keeps the dtype in a Tensor
        if self.reduction == "mean":
            return xp.asarray(loss.mean(), dtype=logits.dtype)
        if self.reduction == "sum":
            return xp.asarray(loss.sum(), dtype=logits.dtype)
        return loss.astype(logits.dtype, copy=False)

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        n = self.logits.shape[0]
        if self.backward_impl is cuda_loss.softmax_cross_entropy_backward and \
                self.reduction in ("mean", "sum"):  # the one upstream value, scaled in the kernel
            return (self.backward_impl(self.logits, self.labels, self.saved,
                                       xp.asarray(gy, dtype=self.logits.dtype), self.eps,
                                       scale=1.0 / n if self.reduction == "mean" else 1.0),)
        scale = {"mean": gy / n, "sum": gy}.get(self.reduction, gy)
        gloss = xp.ascontiguousarray(xp.broadcast_to(xp.asarray(scale, dtype=self.logits.dtype),
                                                     (n,)))  # (N,): d total / d loss_i
        return (self.backward_impl(self.logits, self.labels, self.saved, gloss, self.eps),)


def cross_entropy(logits, labels, label_smoothing=0.0, reduction="mean"):
    """Softmax cross-entropy of logits (N, K) against integer labels (N,).

    label_smoothing eps follows the original ResNeXt recipe, NOT PyTorch:
    the target is 1 - eps on the true class and eps / (K - 1) on every other
    class (ImageNet, eps = 0.1: 0.9 and 0.1 / 999). PyTorch's
    ``label_smoothing`` puts 1 - eps + eps / K on the true class and eps / K
    on the others. The two agree at eps = 0, and ours with eps equals
    PyTorch's with eps * K / (K - 1).

    loss_i = -sum_k target_ik * log_softmax(logits)_ik; reduction "mean"
    (over N), "sum" or "none" (a (N,) loss). Gradient: (softmax - target),
    divided by N for "mean".
    """
    logits = logits if isinstance(logits, Tensor) else Tensor(logits)
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy expects logits of shape (N, K), got {logits.shape}")
    n, k = logits.shape
    labels = _labels(labels, n, k, backend.get_array_module(logits.data))
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if label_smoothing > 0 and k < 2:
        raise ValueError("label smoothing needs at least 2 classes")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    return CrossEntropy(labels, float(label_smoothing), reduction)(logits)


def _labels(labels, n, k, xp):
    """Labels as an integer array of xp, checked against N and K. Host labels
    (NumPy, lists) are checked on the host before they move to the device,
    which costs no synchronisation. Device labels are checked by the kernels
    when they run (a bad label's row is NaN, which a training step's
    non-finite guard reports: no read-back); without them, two numbers are
    read back from the device to check."""
    if isinstance(labels, Tensor):
        labels = labels.data
    on_host = backend.get_array_module(labels) is numpy
    if on_host:
        labels = numpy.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers (class indices), got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match logits (N={n}), "
                         f"got {labels.shape}")
    if on_host or not backend.use_kernels(xp):
        check_labels(labels, k)
    return xp.asarray(labels)


def check_labels(labels, num_classes):
    """Raise one ValueError unless every label lies in [0, num_classes)."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}] for {num_classes} classes, "
                         f"got values from {int(labels.min())} to {int(labels.max())}")


def topk_correct(logits, labels, k):
    """Number of samples whose label is among the k largest of its logits.

    The rank of the true class is the one a stable descending sort gives it:
    the classes ahead of it are those with a larger logit and those with an
    equal logit and a smaller index (as ``numpy.argsort(-x, kind="stable")``).
    A sample is correct when that rank is below k. So exact ties never count
    in the sample's favour: a model whose logits are all equal puts class 0
    first and scores chance (1/K top-1 on balanced labels), not 100%.

    A row with a non-finite logit anywhere (NaN, +inf or -inf) is never
    correct, whatever k: such a row ranks nothing. (Every comparison with NaN
    is false, and +inf ties with +inf, so without this rule a NaN or overflowed
    model would score 100%.)
    Takes Tensors or arrays; returns an int.
    """
    logits = logits.data if isinstance(logits, Tensor) else logits
    xp = backend.get_array_module(logits)
    logits = xp.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"topk_correct expects logits of shape (N, K), got {logits.shape}")
    if int(k) < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    n, num_classes = logits.shape
    labels = _labels(labels, n, num_classes, xp)
    true = logits[xp.arange(n), labels][:, None]  # (N, 1)
    before = xp.arange(num_classes)[None, :] < labels[:, None]  # (N, K): smaller class index
    ahead = (logits > true) | ((logits == true) & before)
    rank = ahead.sum(axis=1)  # how many classes a stable sort puts ahead of the true one
    finite = xp.isfinite(logits).all(axis=1)
    return int(((rank < int(k)) & finite).sum())


def accuracy(logits, labels, topk=(1, 5)):
    """Fraction of samples correct in top-k for each k in ``topk`` -> tuple of
    floats (ties and non-finite rows as ``topk_correct`` scores them)."""
    n = len(logits)
    if n == 0:
        raise ValueError("accuracy of an empty batch is undefined")
    return tuple(topk_correct(logits, labels, k) / n for k in topk)


# --------------------------------------------------------------------------
# The NumPy implementation (the reference, and the fast path too).
# --------------------------------------------------------------------------
def softmax_cross_entropy_forward_reference(logits, labels, label_smoothing):
    """logits (N, K), labels (N,) -> (loss (N,), logp (N, K) kept for backward)."""
    xp = backend.get_array_module(logits)
    n, k = logits.shape
    eps = label_smoothing
    logp = _log_softmax(logits, axis=1)  # (N, K)
    logp_true = logp[xp.arange(n), labels]  # (N,)
    loss = -logp_true
    if eps > 0:
        # target: 1 - eps on the true class, eps / (K - 1) on each other
        off = eps / (k - 1)
        loss = -((1 - eps) * logp_true + off * (logp.sum(axis=1) - logp_true))
    return loss, logp


def softmax_cross_entropy_backward_reference(logits, labels, logp, gloss, label_smoothing):
    """glogits (N, K) = (softmax - target) * gloss[:, None]."""
    xp = backend.get_array_module(logp)
    n, k = logp.shape
    dtype, eps = logp.dtype, label_smoothing
    g = xp.exp(logp)  # (N, K): softmax
    off = eps / (k - 1) if eps > 0 else 0.0
    if off:
        g -= dtype.type(off)
    g[xp.arange(n), labels] -= dtype.type(1 - eps - off)
    g *= gloss[:, None].astype(dtype, copy=False)
    return g
