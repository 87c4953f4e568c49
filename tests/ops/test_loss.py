"""Losses and metrics (minitorch_gx/ops/loss.py): log_softmax and the softmax
cross-entropy with the recipe's label smoothing, top-k accuracy.

1. The reference (``softmax_cross_entropy_*_reference``) and the ops against
   naive per-sample sums, on every implementation; float64 gradients by
   finite differences; the reference == the fast path (one function today).
2. The fused CUDA kernels (emulated at two block sizes, every check on, under
   every schedule, and CuPy) == the reference, in float32 and float64; the op
   wired to its kernels; labels outside [0, K) refused before any launch.
3. top-k accuracy on a hand-made example and against a sort (ties, non-finite
   rows: test_loss_metrics.py).
"""
import math

import numpy as np
import pytest

import minitorch_gx as mt
from minitorch_gx import backend
from minitorch_gx.cuda import device as cuda_device, emulator, loss as cuda_loss
from minitorch_gx.ops.loss import (accuracy, cross_entropy, log_softmax,
                                   softmax_cross_entropy_backward_reference,
                                   softmax_cross_entropy_forward_reference, topk_correct)
from tests.backends import (count_calls, IMPLEMENTATIONS, KERNEL_IMPLEMENTATIONS, assert_close, host,
                            launch_shapes, needs_emulator, needs_gpu, run_on,
                            same_bits_under_every_schedule)


def naive_log_softmax_row(row):
    total = sum(math.exp(v) for v in row)
    return [v - math.log(total) for v in row]


def naive_cross_entropy(logits, labels, eps):
    """Per-sample loss with the recipe's target: 1 - eps true, eps / (K - 1) others."""
    n, k = logits.shape
    losses = []
    for i in range(n):
        logp = naive_log_softmax_row(logits[i])
        target = [eps / (k - 1) if k > 1 else 0.0] * k
        target[labels[i]] = 1 - eps
        losses.append(-sum(t * lp for t, lp in zip(target, logp)))
    return np.array(losses)


def naive_cross_entropy_gradient(logits, labels, eps, gloss):
    """(softmax - target) * gloss, row by row."""
    n, k = logits.shape
    g = np.zeros((n, k))
    for i in range(n):
        p = [math.exp(v) for v in naive_log_softmax_row(logits[i])]
        for j in range(k):
            target = (1 - eps) if j == labels[i] else (eps / (k - 1) if k > 1 else 0.0)
            g[i, j] = (p[j] - target) * gloss[i]
    return g


# ==========================================================================
# 1. log_softmax; the cross-entropy reference and the op against naive sums
# ==========================================================================
def test_log_softmax_matches_naive_and_gradcheck():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5))
    y = log_softmax(x)
    np.testing.assert_allclose(y.data, [naive_log_softmax_row(r) for r in x], rtol=1e-12)
    mt.gradcheck(lambda t: log_softmax(t, axis=0), [mt.Tensor(x, requires_grad=True)])
    mt.gradcheck(lambda t: log_softmax(t), [mt.Tensor(x, requires_grad=True)])


def test_log_softmax_is_stable_for_huge_logits():
    x = np.array([[1000.0, 0.0, -1000.0]], np.float32)
    y = log_softmax(x).data
    assert y.dtype == np.float32 and np.all(np.isfinite(y))
    np.testing.assert_allclose(y, [[0.0, -1000.0, -2000.0]], atol=1e-3)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("n,k", [(4, 6), (1, 3), (3, 2)])
def test_reference_matches_naive(n, k, eps):
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((n, k)) * 3
    labels = rng.integers(0, k, n)
    loss, logp = softmax_cross_entropy_forward_reference(logits, labels, eps)
    np.testing.assert_allclose(loss, naive_cross_entropy(logits, labels, eps), rtol=1e-12)
    np.testing.assert_allclose(logp, [naive_log_softmax_row(r) for r in logits], rtol=1e-12)
    gloss = rng.standard_normal(n)
    g = softmax_cross_entropy_backward_reference(logits, labels, logp, gloss, eps)
    np.testing.assert_allclose(g, naive_cross_entropy_gradient(logits, labels, eps, gloss),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_naive(eps, reduction, impl):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((4, 6)) * 3
    labels = np.array([0, 5, 2, 2])
    per_sample = naive_cross_entropy(logits, labels, eps)
    expect = {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    with run_on(impl) as dev:
        loss = cross_entropy(dev(logits), dev(labels), label_smoothing=eps, reduction=reduction)
    np.testing.assert_allclose(host(loss), expect, rtol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,k", [(1, 3), (3, 7)])
def test_cross_entropy_gradcheck(eps, reduction, n, k, impl):
    rng = np.random.default_rng(2)
    logits = mt.Tensor(rng.standard_normal((n, k)), requires_grad=True)
    labels = rng.integers(0, k, n)
    with run_on(impl):
        mt.gradcheck(lambda t: cross_entropy(t, labels, eps, reduction), [logits])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_cross_entropy_gradient_is_softmax_minus_target_over_n(impl):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 4))
    labels = np.array([3, 0, 1, 1, 2])
    with run_on(impl) as dev:
        t = mt.Tensor(dev(x), requires_grad=True)
        cross_entropy(t, dev(labels), label_smoothing=0.3).backward()
    softmax = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    target = np.full((5, 4), 0.3 / 3)
    target[np.arange(5), labels] = 0.7
    np.testing.assert_allclose(host(t.grad), (softmax - target) / 5, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_recipe_smoothing_is_pytorch_smoothing_rescaled(impl):
    """Ours with eps equals PyTorch's with eps * K / (K - 1) (documented)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 10))
    labels = rng.integers(0, 10, 6)
    with run_on(impl) as dev:
        ours = cross_entropy(dev(x), dev(labels), label_smoothing=0.1).item()
    theirs = torch.nn.functional.cross_entropy(torch.tensor(x), torch.tensor(labels),
                                               label_smoothing=0.1 * 10 / 9).item()
    assert ours == pytest.approx(theirs, rel=1e-12)
    plain = torch.nn.functional.cross_entropy(torch.tensor(x), torch.tensor(labels),
                                              label_smoothing=0.1).item()
    assert ours != pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_cross_entropy_float32_large_logits_stay_finite(impl):
    x = np.array([[300.0, -300.0, 0.0], [0.0, 1e4, -1e4]], np.float32)
    with run_on(impl) as dev:
        t = mt.Tensor(dev(x), requires_grad=True)
        loss = cross_entropy(t, dev(np.array([1, 1])), label_smoothing=0.1)
        assert loss.dtype == np.float32 and np.isfinite(loss.item())
        loss.backward()
    assert t.grad.dtype == np.float32 and np.all(np.isfinite(host(t.grad)))
    # sample 0: log p(true) = -600, the others ~0: (0.9 * 600 + 0.05 * 300) / 2 samples
    assert loss.item() == pytest.approx((0.9 * 600 + 0.05 * 300 + 0.05 * (2e4 + 1e4)) / 2, rel=1e-5)


@pytest.mark.parametrize("labels,match", [([0, 3], r"\[0, 2\]"), ([-1, 0], r"\[0, 2\]"),
                                          ([0.0, 1.0], "integers"), ([0, 1, 2], r"shape \(2,\)")])
def test_bad_labels_raise(labels, match):
    logits = np.zeros((2, 3))
    with pytest.raises(ValueError, match=match):
        cross_entropy(logits, np.array(labels))
    with pytest.raises(ValueError, match=match):
        topk_correct(logits, np.array(labels), 1)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(np.zeros((2, 3)), np.array([0, 1]), reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(np.zeros((2, 3)), np.array([0, 1]), label_smoothing=1.5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fast_equals_reference(eps, reduction):
    rng = np.random.default_rng(9)
    for dtype in (np.float64, np.float32):
        logits = (rng.standard_normal((6, 9)) * 3).astype(dtype)
        labels = rng.integers(0, 9, 6)
        results = {}
        for impl in ("reference", "fast"):
            with run_on(impl):
                t = mt.Tensor(logits, requires_grad=True)
                loss = cross_entropy(t, labels, eps, reduction)
                loss.backward(np.ones(loss.shape, dtype))
            assert loss.dtype == dtype and t.grad.dtype == dtype
            results[impl] = (loss.data, t.grad)
        for r, f in zip(results["reference"], results["fast"]):
            np.testing.assert_array_equal(f, r)


# ==========================================================================
# 2. The fused kernels (emulated and CuPy) == the reference
# ==========================================================================
# (impl, N, K, XENT_THREADS, logit scale, gloss, loss atol, gradient atol): small
# and ImageNet-wide rows on the emulator at two block sizes; a training batch
# of 128 x 1000 on the GPU
_MARKS = {"emulated": needs_emulator, "cupy": needs_gpu}
XENT_KERNEL_CASES = [
    pytest.param(impl, n, k, threads, 4.0, "random", 1e-5, 1e-6, marks=_MARKS[impl],
                 id=f"{impl}-{n}x{k}-{threads}")
    for impl in _MARKS for threads in (256, 64) for n, k in [(5, 7), (3, 1000)]] + [
    pytest.param("cupy", 128, 1000, 256, 5.0, "mean", 1e-5, 1e-8, marks=needs_gpu,
                 id="cupy-128x1000-batch")]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("impl,n,k,threads,scale,gloss_kind,loss_atol,grad_atol",
                         XENT_KERNEL_CASES)
def test_softmax_cross_entropy_kernels_match_reference(impl, n, k, threads, scale, gloss_kind,
                                                       loss_atol, grad_atol, smoothing):
    rng = np.random.default_rng(6)
    logits = (rng.standard_normal((n, k)) * scale).astype(np.float32)
    labels = rng.integers(0, k, size=n)
    gloss = rng.standard_normal(n).astype(np.float32) if gloss_kind == "random" else \
        np.full(n, 1 / n, np.float32)
    logits64 = logits.astype(np.float64)
    loss_ref, logp = softmax_cross_entropy_forward_reference(logits64, labels, smoothing)
    g_ref = softmax_cross_entropy_backward_reference(logits64, labels, logp,
                                                     gloss.astype(np.float64), smoothing)
    with run_on(impl) as dev, launch_shapes(XENT_THREADS=threads):
        loss, lse = cuda_loss.softmax_cross_entropy_forward(dev(logits), dev(labels), smoothing)
        g = cuda_loss.softmax_cross_entropy_backward(dev(logits), dev(labels), lse, dev(gloss),
                                                     smoothing)
    assert loss.dtype == lse.dtype == g.dtype == np.float32
    assert_close(loss, loss_ref, 1e-5, loss_atol, "loss")
    # the saved log-sum-exp is the reference's: logits - logp, on every class
    assert_close(lse, (logits64 - logp)[:, 0], 1e-5, 1e-5, "log-sum-exp")
    assert_close(g, g_ref, 1e-5, grad_atol, "gradient of the logits")


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("n,k", [(5, 7), (3, 300)])
def test_softmax_cross_entropy_kernels_float64(impl, n, k):
    rng = np.random.default_rng(7)
    logits, labels = rng.standard_normal((n, k)) * 4, rng.integers(0, k, size=n)
    gloss = rng.standard_normal(n)
    loss_ref, logp = softmax_cross_entropy_forward_reference(logits, labels, 0.1)
    g_ref = softmax_cross_entropy_backward_reference(logits, labels, logp, gloss, 0.1)
    with run_on(impl) as dev:
        loss, lse = cuda_loss.softmax_cross_entropy_forward(dev(logits), dev(labels), 0.1)
        g = cuda_loss.softmax_cross_entropy_backward(dev(logits), dev(labels), lse, dev(gloss),
                                                     0.1)
    assert loss.dtype == g.dtype == np.float64
    assert_close(loss, loss_ref, 1e-12, 1e-12, "loss")
    assert_close(g, g_ref, 1e-12, 1e-14, "gradient of the logits")


@needs_emulator
@pytest.mark.parametrize("n,k,threads", [(5, 7, 256), (3, 1000, 64), (2, 33, 32)])
def test_softmax_cross_entropy_kernels_give_the_same_bits_under_every_schedule(n, k, threads):
    rng = np.random.default_rng(8)
    logits = (rng.standard_normal((n, k)) * 3).astype(np.float32)
    labels, gloss = rng.integers(0, k, size=n), rng.standard_normal(n).astype(np.float32)

    def run():
        loss, lse = cuda_loss.softmax_cross_entropy_forward(logits, labels, 0.1)
        return loss, lse, cuda_loss.softmax_cross_entropy_backward(logits, labels, lse, gloss,
                                                                   0.1)

    with launch_shapes(XENT_THREADS=threads):
        same_bits_under_every_schedule(run, f"softmax cross-entropy {n}x{k}")


@pytest.mark.parametrize("bad", [-1, 7, 1000])
@needs_emulator
def test_softmax_cross_entropy_launchers_refuse_host_labels_outside_the_classes(bad):
    """Host labels (the emulator's): checked before any launch, naming the label."""
    logits = np.zeros((4, 7), np.float32)
    labels = np.array([0, 6, bad, 2])
    message = rf"labels\[2\] = {bad} is not a class index in \[0, 7\)"
    with run_on("emulated") as dev:
        with pytest.raises(ValueError, match=message):
            cuda_loss.softmax_cross_entropy_forward(dev(logits), dev(labels), 0.1)
        with pytest.raises(ValueError, match=message):
            cuda_loss.softmax_cross_entropy_backward(dev(logits), dev(labels), dev(np.zeros(4)),
                                                     dev(np.ones(4)), 0.1)
        with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
            cuda_loss.softmax_cross_entropy_forward(dev(logits), dev(labels[:3]), 0.1)


@needs_gpu
def test_device_labels_outside_the_classes_give_nan_rows_without_a_host_read():
    cupy = backend.cupy
    logits, labels = cupy.zeros((3, 7), cupy.float32), cupy.asarray([1, 9, -2])
    loss, lse = cuda_loss.softmax_cross_entropy_forward(logits, labels, 0.1)
    assert numpy_isnan(loss).tolist() == [False, True, True]
    gz = cuda_loss.softmax_cross_entropy_backward(logits, labels, lse, cupy.ones(3, cupy.float32),
                                                  0.1)
    assert numpy_isnan(gz).all(axis=1).tolist() == [False, True, True]


def numpy_isnan(a):
    return np.isnan(backend.to_numpy(a))


@needs_emulator
@pytest.mark.parametrize("bad", [-1, 7])
def test_a_bad_label_past_the_launcher_is_never_read_through_and_gives_nan(bad):
    """Device labels are not checked on the host (that would wait for the
    device): the kernels themselves never index the row with a bad label
    (memcheck is on) and make that row's loss and gradient NaN."""
    dev = emulator.device()
    module = emulator.build("softmax_cross_entropy.cu",
                            dict(cuda_device.builds())["softmax_cross_entropy.cu"])
    z, labels = dev.input(np.zeros((2, 7)), np.float32), dev.input([3, bad], np.int64)
    loss, lse = dev.empty(2, np.float32), dev.empty(2, np.float32)
    module.launch("softmax_xent_fwd", 2, 256, [z, labels, loss, lse, np.int32(2), np.int32(7),
                                               np.float32(1), np.float32(0)])
    assert np.isfinite(loss[0]) and np.isnan(loss[1])
    gz = dev.empty((2, 7), np.float32)
    module.launch("softmax_xent_bwd", (1, 2), 256,
                  [z, labels, lse, dev.input(np.ones(2), np.float32), gz, np.int32(2), np.int32(7),
                   np.float32(1), np.float32(0), np.int32(1), np.float32(1)])
    assert np.isfinite(gz[0]).all() and np.isnan(gz[1]).all()


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_softmax_cross_entropy_launcher_refuses_block_sizes_the_kernel_traps_on(impl):
    """Before the launch: a __trap on a GPU would end the CUDA context of the process."""
    with run_on(impl) as dev, launch_shapes(XENT_THREADS=48), pytest.raises(
            ValueError, match="softmax_cross_entropy.cu needs XENT_THREADS = a multiple of 32"):
        cuda_loss.softmax_cross_entropy_forward(dev(np.zeros((2, 3), np.float32)),
                                                dev(np.array([0, 1])), 0.1)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_cross_entropy_through_the_kernels(impl, monkeypatch):
    """The op on its kernel path (launchers, saved lse, gloss) == the NumPy path."""
    forward = count_calls(monkeypatch, cuda_loss, "softmax_cross_entropy_forward")
    backward = count_calls(monkeypatch, cuda_loss, "softmax_cross_entropy_backward")
    rng = np.random.default_rng(2)
    rng.standard_normal((2, 3, 9, 8))  # the old test drew its pooling input first
    logits = rng.standard_normal((5, 7)).astype(np.float32)
    labels = np.array([0, 6, 3, 3, 1])
    results = []
    for path in ("fast", impl):
        with run_on(path) as dev:
            t = mt.Tensor(dev(logits), requires_grad=True)
            loss = cross_entropy(t, dev(labels), label_smoothing=0.1)
            loss.backward(dev(np.random.default_rng(9).standard_normal(loss.shape)
                              .astype(np.float32)))
        results.append((host(loss), host(t.grad)))
        assert (len(forward), len(backward)) == ((0, 0) if path == "fast" else (1, 1))
    (l0, g0), (l1, g1) = results
    scale = max(1.0, float(np.abs(l0).max()))
    np.testing.assert_allclose(l0, l1, rtol=2e-5, atol=2e-5 * scale)
    scale = max(1.0, float(np.abs(g0).max()))
    np.testing.assert_allclose(g0, g1, rtol=2e-5, atol=2e-5 * scale)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_reductions_through_the_kernels(impl, reduction):
    """Each reduction's gloss reaches the backward kernel: float64 against the naive sums."""
    rng = np.random.default_rng(12)
    logits = rng.standard_normal((4, 6)) * 3
    labels = np.array([0, 5, 2, 2])
    gy = rng.standard_normal(4) if reduction == "none" else np.asarray(rng.standard_normal())
    gloss = gy if reduction == "none" else np.full(4, gy / 4 if reduction == "mean" else gy)
    with run_on(impl) as dev:
        t = mt.Tensor(dev(logits), requires_grad=True)
        cross_entropy(t, dev(labels), 0.1, reduction).backward(dev(gy))
    np.testing.assert_allclose(host(t.grad), naive_cross_entropy_gradient(logits, labels, 0.1,
                                                                           gloss),
                               rtol=1e-12, atol=1e-15)


# ==========================================================================
# 3. top-k accuracy
# ==========================================================================
def test_topk_hand_made_example():
    logits = np.array([
        [0.1, 0.9, 0.0, 0.5],   # label 1: largest                 -> top1, top2
        [0.3, 0.2, 0.8, 0.1],   # label 0: second                  -> top2 only
        [0.5, 0.5, 0.5, 0.1],   # label 2: tied with classes 0 and 1 -> top3 (ties go by index)
        [0.9, 0.7, 0.7, 0.8],   # label 3: 0.9 larger              -> top2
        [0.0, 0.4, 0.3, 0.2],   # label 0: smallest, three larger  -> top4 only
    ])
    labels = np.array([1, 0, 2, 3, 0])
    assert topk_correct(logits, labels, 1) == 1
    assert topk_correct(logits, labels, 2) == 3
    assert topk_correct(logits, labels, 3) == 4
    assert topk_correct(logits, labels, 4) == 5
    top1, top2 = accuracy(mt.Tensor(logits), mt.Tensor(labels), topk=(1, 2))
    assert (top1, top2) == (1 / 5, 3 / 5)
    assert isinstance(top1, float) and isinstance(topk_correct(logits, labels, 1), int)


def test_topk_against_a_sort_on_random_logits():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((50, 20))
    labels = rng.integers(0, 20, 50)
    for k in (1, 5):
        top = np.argsort(-logits, axis=1)[:, :k]
        assert topk_correct(logits, labels, k) == sum(labels[i] in top[i] for i in range(50))


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_kernel_takes_the_one_upstream_gradient_of_a_mean_or_sum(impl, reduction):
    """No (N,) array for the gradient of a mean or a sum: one value and a
    scale go to the kernel; the gradient equals the per-row form's."""
    rng = np.random.default_rng(12)
    z = rng.standard_normal((5, 9)).astype(np.float32)
    labels = np.array([0, 8, 3, 3, 1])
    with run_on("reference"):
        t = mt.Tensor(z.copy(), requires_grad=True)
        cross_entropy(t, labels, 0.1, reduction).backward()
    with run_on(impl) as dev:
        tk = mt.Tensor(dev(z), requires_grad=True)
        cross_entropy(tk, dev(labels), 0.1, reduction).backward()
    assert_close(tk.grad, t.grad, 1e-6, 1e-7, f"{impl} {reduction}")
