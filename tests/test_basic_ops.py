"""Elementwise, shape and dense ops (functions_basic): values against NumPy
written out by hand, gradients by finite differences in float64."""
import numpy as np
import pytest

import minitorch_gx as mt
from minitorch_gx import functional as F


def leaf(shape, seed=0, dtype=np.float64):
    return mt.Tensor(np.random.default_rng(seed).standard_normal(shape).astype(dtype),
                     requires_grad=True)


@pytest.mark.parametrize("sa,sb", [((2, 3), (3,)), ((3, 1, 4), (2, 4)), ((2, 1), (1, 5)),
                                   ((4,), ()), ((2, 3), (2, 3))])
@pytest.mark.parametrize("op", [F.add, F.mul])
def test_broadcasting_binary_ops_gradcheck(op, sa, sb):
    a, b = leaf(sa, 1), leaf(sb, 2)
    y = op(a, b)
    expect = a.data + b.data if op is F.add else a.data * b.data
    np.testing.assert_array_equal(y.data, expect)
    mt.gradcheck(op, [a, b])


def test_add_broadcast_gradient_is_summed_by_hand():
    a, b = leaf((2, 3), 1), leaf((3,), 2)
    gy = np.arange(6.0).reshape(2, 3)
    F.add(a, b).backward(gy)
    np.testing.assert_array_equal(a.grad, gy)
    np.testing.assert_array_equal(b.grad, [3.0, 5.0, 7.0])  # column sums
    assert a.grad is not b.grad  # each leaf owns its gradient array


def test_mul_by_python_number_and_operators():
    a, b = leaf((2, 3), 1), leaf((2, 3), 2)
    gy = np.random.default_rng(3).standard_normal((2, 3))
    y = (a * 3.0 - b) * b + 2 * a + (-a)
    np.testing.assert_allclose(y.data, (a.data * 3 - b.data) * b.data + 2 * a.data - a.data)
    y.backward(gy)
    np.testing.assert_allclose(a.grad, gy * (3 * b.data + 2 - 1))
    np.testing.assert_allclose(b.grad, gy * (3 * a.data - 2 * b.data))


def test_relu_forward_and_gradient_at_zero():
    x = mt.Tensor(np.array([-2.0, -0.0, 0.0, 0.5, 3.0]), requires_grad=True)
    y = F.relu(x)
    np.testing.assert_array_equal(y.data, [0.0, 0.0, 0.0, 0.5, 3.0])
    y.backward(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    np.testing.assert_array_equal(x.grad, [0.0, 0.0, 0.0, 4.0, 5.0])  # 0 at the kink, as PyTorch


def test_relu_gradcheck_away_from_the_kink():
    x = leaf((3, 5), 4)
    x.data[np.abs(x.data) < 1e-3] = 0.5
    mt.gradcheck(F.relu, [x])


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_loops_and_gradcheck(bias):
    x, W = leaf((3, 4), 1), leaf((5, 4), 2)
    b = leaf((5,), 3) if bias else None
    y = F.linear(x, W, b)
    expect = np.zeros((3, 5))
    for i in range(3):
        for o in range(5):
            expect[i, o] = sum(x.data[i, k] * W.data[o, k] for k in range(4))
            expect[i, o] += b.data[o] if bias else 0.0
    np.testing.assert_allclose(y.data, expect, rtol=1e-12)
    inputs = [x, W, b] if bias else [x, W]
    mt.gradcheck(lambda *t: F.linear(*t), inputs)


def test_matmul_gradcheck():
    mt.gradcheck(F.matmul, [leaf((2, 3), 1), leaf((3, 4), 2)])


def test_reshape_and_flatten():
    x = leaf((2, 3, 4, 5), 1)
    y = F.flatten(x)
    assert y.shape == (2, 60)
    np.testing.assert_array_equal(y.data[1], x.data[1].ravel())
    assert F.flatten(x, start_dim=2).shape == (2, 3, 20)
    assert x.reshape(6, -1).shape == (6, 20) and x.reshape((4, 30)).shape == (4, 30)
    mt.gradcheck(lambda t: F.flatten(t), [x])
    mt.gradcheck(lambda t: F.reshape(t, (5, 24)), [x])


@pytest.mark.parametrize("axis,keepdims", [(None, True), (0, False), (1, True), (-1, False),
                                           ((0, 2), False), ((0, 2), True)])
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_sum_mean_match_numpy_and_gradcheck(op, axis, keepdims):
    x = leaf((2, 3, 4), 5)
    y = getattr(F, op)(x, axis, keepdims)
    np.testing.assert_allclose(y.data, getattr(np, op)(x.data, axis=axis, keepdims=keepdims),
                               rtol=1e-12)
    mt.gradcheck(lambda t: getattr(F, op)(t, axis, keepdims), [x], atol=1e-5, rtol=1e-4)


def test_mean_gradient_is_one_over_n():
    x = leaf((2, 3, 4), 6)
    F.mean(x, axis=(0, 2)).backward(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(x.grad, np.broadcast_to(np.array([1.0, 2.0, 3.0])[:, None] / 8,
                                                       (2, 3, 4)))


@pytest.mark.parametrize("op", [F.sum, F.mean])
def test_full_reduction_keeps_float64(op):
    x = leaf((2, 3), 7)
    y = op(x)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y.data, getattr(np, op.__name__)(x.data), rtol=1e-12)
    y.backward()
    assert x.grad.dtype == np.float64
    mt.gradcheck(op, [x])


@pytest.mark.parametrize("op", [lambda a, b, c: a + b, lambda a, b, c: a * b,
                                lambda a, b, c: a - b * 2.0, lambda a, b, c: F.relu(a),
                                lambda a, b, c: F.linear(a, b, c), lambda a, b, c: a.sum(axis=0),
                                lambda a, b, c: F.mean(a, axis=1), lambda a, b, c: F.flatten(a)])
def test_float32_stays_float32(op):
    a, b, c = leaf((3, 3), 1, np.float32), leaf((3, 3), 2, np.float32), leaf((3,), 3, np.float32)
    y = op(a, b, c)
    assert y.dtype == np.float32
    y.backward(np.ones(y.shape, np.float32))
    for t in (a, b, c):
        assert t.grad is None or t.grad.dtype == np.float32
