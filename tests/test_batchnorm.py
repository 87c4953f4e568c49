"""Batch norm (functions_norm): forward against per-channel loops, gradients
by finite differences, fast path == reference path, running statistics
against a naive recomputation, float32 stability."""
import numpy as np
import pytest

import minitorch_gx as mt
from minitorch_gx import backend, functions_norm
from minitorch_gx.functions_norm import batch_norm

SHAPES = [(1, 2, 3, 5), (3, 2, 5, 3), (2, 3, 1, 1), (3, 1, 4, 7)]


def naive_stats(x):
    """Per-channel mean and biased variance, one channel at a time."""
    c = x.shape[1]
    mean, var = np.zeros(c), np.zeros(c)
    for ch in range(c):
        v = x[:, ch].astype(np.float64).ravel()
        mean[ch] = sum(v) / len(v)
        var[ch] = sum((a - mean[ch]) ** 2 for a in v) / len(v)
    return mean, var


def naive_bn(x, mean, var, gamma, beta, eps, relu):
    y = np.empty(x.shape)
    for ch in range(x.shape[1]):
        y[:, ch] = gamma[ch] * (x[:, ch] - mean[ch]) / np.sqrt(var[ch] + eps) + beta[ch]
    return np.maximum(y, 0) if relu else y


def make(shape, rng, dtype=np.float64, offset=0.5):
    c = shape[1]
    x = (rng.standard_normal(shape) * 1.7 + offset).astype(dtype)
    gamma = (rng.standard_normal(c) + 1).astype(dtype)
    beta = rng.standard_normal(c).astype(dtype)
    return x, gamma, beta


@pytest.fixture(params=["fast", "reference"])
def impl(request):
    with backend.implementation(request.param):
        yield request.param


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [False, True])
def test_train_forward_matches_naive(impl, shape, relu):
    rng = np.random.default_rng(1)
    x, gamma, beta = make(shape, rng)
    y, mean, var = functions_norm.batch_norm_train_forward(x, gamma, beta, 1e-5, relu)
    m, v = naive_stats(x)
    np.testing.assert_allclose(mean, m, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, v, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, naive_bn(x, m, v, gamma, beta, 1e-5, relu), rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [False, True])
def test_eval_forward_matches_naive(impl, shape, relu):
    rng = np.random.default_rng(2)
    x, gamma, beta = make(shape, rng)
    rm, rv = rng.standard_normal(shape[1]), rng.random(shape[1]) + 0.2
    y = functions_norm.batch_norm_infer_forward(x, gamma, beta, rm, rv, 1e-3, relu)
    np.testing.assert_allclose(y, naive_bn(x, rm, rv, gamma, beta, 1e-3, relu), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 2, 3, 5), (3, 2, 5, 3), (2, 3, 1, 1)])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(impl, shape, relu, training):
    rng = np.random.default_rng(3)
    x, gamma, beta = make(shape, rng)
    x, gamma, beta = (mt.Tensor(a, requires_grad=True) for a in (x, gamma, beta))
    if training:  # no running statistics: gradcheck calls fn many times
        rm = rv = None
    else:
        rm, rv = rng.standard_normal(shape[1]), rng.random(shape[1]) + 0.5

    def fn(x, gamma, beta):
        return batch_norm(x, rm, rv, gamma, beta, training=training, eps=1e-3, relu=relu)

    mt.gradcheck(fn, [x, gamma, beta], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("relu", [False, True])
def test_fast_equals_reference_float32(relu):
    """The two paths agree in float32 on a larger, odd-sized input; float32 stays float32."""
    rng = np.random.default_rng(4)
    shape = (5, 7, 9, 11)
    x, gamma, beta = make(shape, rng, np.float32, offset=3.0)
    gy = rng.standard_normal(shape).astype(np.float32)
    rm = rng.standard_normal(7).astype(np.float32)
    rv = (rng.random(7) + 0.5).astype(np.float32)
    results = {}
    for name in ("fast", "reference"):
        with backend.implementation(name):
            y, mean, var = functions_norm.batch_norm_train_forward(x, gamma, beta, 1e-5, relu)
            invstd = (1 / np.sqrt(var + 1e-5)).astype(np.float32)
            grads = functions_norm.batch_norm_backward(gy, x, y, gamma, mean, invstd, relu)
            yi = functions_norm.batch_norm_infer_forward(x, gamma, beta, rm, rv, 1e-5, relu)
            gi = functions_norm.batch_norm_infer_backward(gy, x, yi, gamma, rm, rv, 1e-5, relu)
            results[name] = (y, mean, var) + grads + (yi,) + gi
    for a, b in zip(results["fast"], results["reference"]):
        assert a.dtype == np.float32 and a.shape == b.shape
        scale = np.abs(b).max()
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * scale)


def test_backward_matches_naive_formula():
    """Training backward against the textbook formula written per channel."""
    rng = np.random.default_rng(5)
    x, gamma, beta = make((3, 2, 3, 4), rng)
    gy = rng.standard_normal(x.shape)
    y, mean, var = functions_norm.batch_norm_train_forward(x, gamma, beta, 1e-5, False)
    invstd = 1 / np.sqrt(var + 1e-5)
    gx, ggamma, gbeta = functions_norm.batch_norm_backward(gy, x, None, gamma, mean, invstd, False)
    for ch in range(2):
        xc, g = x[:, ch].ravel(), gy[:, ch].ravel()
        m = len(xc)
        xhat = (xc - mean[ch]) * invstd[ch]
        assert gbeta[ch] == pytest.approx(g.sum())
        assert ggamma[ch] == pytest.approx((g * xhat).sum())
        expect = gamma[ch] * invstd[ch] / m * (m * g - g.sum() - xhat * (g * xhat).sum())
        np.testing.assert_allclose(gx[:, ch].ravel(), expect, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_running_statistics_after_several_steps(impl, momentum):
    rng = np.random.default_rng(6)
    c = 3
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    expect_m, expect_v = np.zeros(c), np.ones(c)
    gamma = mt.Tensor(np.ones(c, np.float32), requires_grad=True)
    beta = mt.Tensor(np.zeros(c, np.float32), requires_grad=True)
    for step in range(4):
        x = (rng.standard_normal((2, c, 3, 5)) * (step + 1) + step).astype(np.float32)
        batch_norm(x, rm, rv, gamma, beta, training=True, momentum=momentum)
        m, v = naive_stats(x)
        n = x.size // c
        expect_m = (1 - momentum) * expect_m + momentum * m
        expect_v = (1 - momentum) * expect_v + momentum * v * n / (n - 1)  # unbiased
    assert rm.dtype == np.float32 and rv.dtype == np.float32
    np.testing.assert_allclose(rm, expect_m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rv, expect_v, rtol=1e-5, atol=1e-6)


def test_eval_uses_running_statistics_and_leaves_them_alone():
    rng = np.random.default_rng(7)
    x, gamma, beta = make((2, 3, 4, 5), rng)
    rm, rv = rng.standard_normal(3), rng.random(3) + 0.5
    rm0, rv0 = rm.copy(), rv.copy()
    y = batch_norm(x, rm, rv, mt.Tensor(gamma), mt.Tensor(beta), training=False, eps=1e-5)
    np.testing.assert_allclose(y.data, naive_bn(x, rm0, rv0, gamma, beta, 1e-5, False), rtol=1e-12)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)


def test_training_without_running_statistics():
    rng = np.random.default_rng(8)
    x, gamma, beta = make((2, 3, 4, 5), rng)
    y = batch_norm(x, None, None, mt.Tensor(gamma), mt.Tensor(beta), training=True)
    m, v = naive_stats(x)
    np.testing.assert_allclose(y.data, naive_bn(x, m, v, gamma, beta, 1e-5, False), rtol=1e-10)
    with pytest.raises(ValueError, match="eval mode"):
        batch_norm(x, None, None, mt.Tensor(gamma), mt.Tensor(beta), training=False)


def test_bad_arguments_raise():
    x = np.zeros((1, 3, 1, 1))
    with pytest.raises(ValueError, match="more than one value per channel"):
        batch_norm(x, None, None, None, None, training=True)
    with pytest.raises(ValueError, match="weight has shape"):
        batch_norm(np.zeros((2, 3, 2, 2)), None, None, mt.Tensor(np.ones(4)), None, training=True)


def test_float32_variance_is_stable_under_a_large_mean(impl):
    """mean 1e4, std 1: E[x^2] - E[x]^2 in float32 would lose every digit."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((8, 2, 16, 16)) + 1e4).astype(np.float32)
    ones, zeros = np.ones(2, np.float32), np.zeros(2, np.float32)
    y, mean, var = functions_norm.batch_norm_train_forward(x, ones, zeros, 1e-5, False)
    m, v = naive_stats(x)
    np.testing.assert_allclose(var, v, rtol=1e-3)
    np.testing.assert_allclose(y.reshape(8, 2, -1).std(axis=(0, 2)), 1, rtol=1e-3)


def test_parameters_default_to_identity_affine():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 3, 2, 2))
    y = batch_norm(x, None, None, None, None, training=True, eps=0.0)
    m, v = naive_stats(x)
    np.testing.assert_allclose(y.data, naive_bn(x, m, v, np.ones(3), np.zeros(3), 0.0, False),
                               rtol=1e-10)


def test_gpu_impl_is_not_used_for_host_arrays(monkeypatch):
    class Refuse:
        def __getattr__(self, name):
            raise AssertionError(f"gpu_impl.{name} was called for NumPy arrays")

    monkeypatch.setattr(functions_norm, "gpu_impl", Refuse())
    x, gamma, beta = make((2, 2, 3, 3), np.random.default_rng(11))
    functions_norm.batch_norm_train_forward(x, gamma, beta, 1e-5, True)


def test_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    x, gamma, beta = make((4, 3, 5, 6), rng)
    gy = rng.standard_normal(x.shape)
    rm, rv = np.zeros(3), np.ones(3)
    xt, gt, bt = mt.Tensor(x, True), mt.Tensor(gamma, True), mt.Tensor(beta, True)
    y = batch_norm(xt, rm, rv, gt, bt, training=True, momentum=0.1, relu=True)
    y.backward(gy)
    txs = [torch.tensor(a, requires_grad=True) for a in (x, gamma, beta)]
    trm, trv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    ty = torch.relu(torch.nn.functional.batch_norm(txs[0], trm, trv, txs[1], txs[2],
                                                   training=True))
    ty.backward(torch.tensor(gy))
    np.testing.assert_allclose(y.data, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    for ours, theirs in zip((xt, gt, bt), txs):
        np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-12)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-12)


@pytest.mark.skipif(not backend.gpu_available(), reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("relu", [False, True])
def test_cupy_arrays_match_numpy(relu):
    cp = backend.cupy
    rng = np.random.default_rng(13)
    x, gamma, beta = make((3, 4, 5, 7), rng, np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    y, mean, var = functions_norm.batch_norm_train_forward(x, gamma, beta, 1e-5, relu)
    invstd = (1 / np.sqrt(var + 1e-5)).astype(np.float32)
    g = functions_norm.batch_norm_backward(gy, x, y, gamma, mean, invstd, relu)
    dev = [cp.asarray(a) for a in (x, gamma, beta, gy, mean, invstd)]
    yd, meand, vard = functions_norm.batch_norm_train_forward(dev[0], dev[1], dev[2], 1e-5, relu)
    gd = functions_norm.batch_norm_backward(dev[3], dev[0], yd, dev[1], dev[4], dev[5], relu)
    for a, b in zip((y, mean, var) + g, (yd, meand, vard) + gd):
        np.testing.assert_allclose(cp.asnumpy(b), a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
