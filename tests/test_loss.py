"""Losses and metrics (functions_loss): log_softmax and cross-entropy with the
recipe's label smoothing against naive per-sample sums, finite-difference
gradients, top-k accuracy on a hand-made example."""
import math

import numpy as np
import pytest

import minitorch_gx as mt
from minitorch_gx.functions_loss import accuracy, cross_entropy, log_softmax, topk_correct


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
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_naive(eps, reduction):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((4, 6)) * 3
    labels = np.array([0, 5, 2, 2])
    per_sample = naive_cross_entropy(logits, labels, eps)
    expect = {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    loss = cross_entropy(logits, labels, label_smoothing=eps, reduction=reduction)
    np.testing.assert_allclose(loss.data, expect, rtol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,k", [(1, 3), (3, 7)])
def test_cross_entropy_gradcheck(eps, reduction, n, k):
    rng = np.random.default_rng(2)
    logits = mt.Tensor(rng.standard_normal((n, k)), requires_grad=True)
    labels = rng.integers(0, k, n)
    mt.gradcheck(lambda t: cross_entropy(t, labels, eps, reduction), [logits])


def test_cross_entropy_gradient_is_softmax_minus_target_over_n():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 4))
    labels = np.array([3, 0, 1, 1, 2])
    t = mt.Tensor(x, requires_grad=True)
    cross_entropy(t, labels, label_smoothing=0.3).backward()
    softmax = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    target = np.full((5, 4), 0.3 / 3)
    target[np.arange(5), labels] = 0.7
    np.testing.assert_allclose(t.grad, (softmax - target) / 5, rtol=1e-12, atol=1e-15)


def test_recipe_smoothing_is_pytorch_smoothing_rescaled():
    """Ours with eps equals PyTorch's with eps * K / (K - 1) (documented)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 10))
    labels = rng.integers(0, 10, 6)
    ours = cross_entropy(x, labels, label_smoothing=0.1).item()
    theirs = torch.nn.functional.cross_entropy(torch.tensor(x), torch.tensor(labels),
                                               label_smoothing=0.1 * 10 / 9).item()
    assert ours == pytest.approx(theirs, rel=1e-12)
    plain = torch.nn.functional.cross_entropy(torch.tensor(x), torch.tensor(labels),
                                              label_smoothing=0.1).item()
    assert ours != pytest.approx(plain, rel=1e-6)


def test_cross_entropy_float32_large_logits_stay_finite():
    x = np.array([[300.0, -300.0, 0.0], [0.0, 1e4, -1e4]], np.float32)
    t = mt.Tensor(x, requires_grad=True)
    loss = cross_entropy(t, np.array([1, 1]), label_smoothing=0.1)
    assert loss.dtype == np.float32 and np.isfinite(loss.item())
    loss.backward()
    assert t.grad.dtype == np.float32 and np.all(np.isfinite(t.grad))
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


def test_topk_hand_made_example():
    logits = np.array([
        [0.1, 0.9, 0.0, 0.5],   # label 1: largest                 -> top1, top2
        [0.3, 0.2, 0.8, 0.1],   # label 0: second                  -> top2 only
        [0.5, 0.5, 0.5, 0.1],   # label 2: tied with two, none larger -> top1 (ties favour it)
        [0.9, 0.7, 0.7, 0.8],   # label 3: 0.9 larger              -> top2
        [0.0, 0.4, 0.3, 0.2],   # label 0: smallest, three larger  -> top4 only
    ])
    labels = np.array([1, 0, 2, 3, 0])
    assert topk_correct(logits, labels, 1) == 2
    assert topk_correct(logits, labels, 2) == 4
    assert topk_correct(logits, labels, 3) == 4
    assert topk_correct(logits, labels, 4) == 5
    top1, top2 = accuracy(mt.Tensor(logits), mt.Tensor(labels), topk=(1, 2))
    assert (top1, top2) == (2 / 5, 4 / 5)
    assert isinstance(top1, float) and isinstance(topk_correct(logits, labels, 1), int)


def test_topk_against_a_sort_on_random_logits():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((50, 20))
    labels = rng.integers(0, 20, 50)
    for k in (1, 5):
        top = np.argsort(-logits, axis=1)[:, :k]
        assert topk_correct(logits, labels, k) == sum(labels[i] in top[i] for i in range(50))
