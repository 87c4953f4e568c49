"""Tensor / backward / no_grad / hook semantics of the autograd engine."""
import numpy as np
import pytest

import minitorch_gx as mt
from minitorch_gx import functional as F


def leaf(values):
    return mt.Tensor(np.asarray(values, dtype=np.float64), requires_grad=True)


def test_gradients_accumulate_across_two_backward_calls():
    x = leaf([1.0, -2.0, 3.0])
    (x * 2.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [2.0, 2.0, 2.0])
    (x * x).sum().backward()  # a fresh graph: adds 2x
    np.testing.assert_array_equal(x.grad, [4.0, -2.0, 8.0])
    x.zero_grad()
    assert x.grad is None


def test_tensor_used_twice_gets_both_contributions():
    x = leaf([1.0, 2.0])
    (x * x).backward(np.array([1.0, 1.0]))  # the same tensor as both inputs of one op
    np.testing.assert_array_equal(x.grad, [2.0, 4.0])
    x.zero_grad()
    h = x * 3.0  # one intermediate feeding two ops, joined again: y = h * h + h
    (h * h + h).backward(np.array([1.0, 1.0]))
    np.testing.assert_array_equal(x.grad, 3 * (2 * 3 * x.data + 1))


def test_diamond_graph_matches_hand_derivative():
    a, b = leaf([0.5, -1.5]), leaf([2.0, 3.0])
    c = a * b
    d = F.relu(c) + c * a  # c reaches the output along two paths
    d.backward(np.array([1.0, 10.0]))
    relu_grad = (c.data > 0).astype(float)
    gy = np.array([1.0, 10.0])
    np.testing.assert_allclose(a.grad, gy * (relu_grad * b.data + b.data * a.data + c.data))
    np.testing.assert_allclose(b.grad, gy * (relu_grad * a.data + a.data * a.data))


def test_post_accumulate_hook_fires_once_with_the_final_gradient():
    x, w = leaf([1.0, 2.0, 3.0]), leaf([0.5, -1.0, 2.0])
    seen = []
    for t in (x, w):
        t.register_post_accumulate_grad_hook(lambda t: seen.append((id(t), t.grad.copy())))
    # x is used at three depths, so its gradient arrives in three pieces
    h = x * w
    y = F.relu(h * x + x) * 2.0 + x
    y.backward(np.array([1.0, 1.0, 1.0]))
    assert [i for i, _ in seen].count(id(x)) == 1 and [i for i, _ in seen].count(id(w)) == 1
    for i, g in seen:
        final = x.grad if i == id(x) else w.grad
        np.testing.assert_array_equal(g, final)
    seen.clear()
    F.sum(x * w).backward()  # and once more per backward call
    assert len(seen) == 2


def test_hook_fires_for_a_leaf_whose_op_returns_none():
    class FirstOnly(mt.Function):
        def forward(self, a, b):
            return a * 1.0

        def backward(self, gy):
            return gy, None

    a, b = leaf([1.0]), leaf([2.0])
    fired = []
    b.register_post_accumulate_grad_hook(lambda t: fired.append(t))
    FirstOnly()(a, b).backward(np.array([1.0]))
    np.testing.assert_array_equal(a.grad, [1.0])
    assert b.grad is None and fired == [b]


def test_none_gradient_for_a_non_leaf_input():
    class Stop(mt.Function):
        def forward(self, a):
            return a * 2.0

        def backward(self, gy):
            return (None,)

    x = leaf([1.0, 2.0])
    (Stop()(x * 3.0) + x).backward(np.array([1.0, 1.0]))
    np.testing.assert_array_equal(x.grad, [1.0, 1.0])


def test_no_graph_under_no_grad():
    x = leaf([1.0, 2.0])
    with mt.no_grad():
        assert not mt.is_grad_enabled()
        y = F.relu(x * 2.0) + x
    assert mt.is_grad_enabled()
    assert y.creator is None and not y.requires_grad
    with pytest.raises(RuntimeError, match="does not require a gradient"):
        y.backward(np.ones(2))
    assert x.grad is None


def test_inputs_that_need_no_gradient_get_none():
    x, c = leaf([1.0, 2.0]), mt.Tensor(np.array([3.0, 4.0]))
    (x * c).backward(np.ones(2))
    assert c.grad is None
    np.testing.assert_array_equal(x.grad, [3.0, 4.0])


def test_backward_argument_checks():
    x = leaf([1.0, 2.0])
    with pytest.raises(RuntimeError, match="one-element"):
        (x * 2.0).backward()
    with pytest.raises(ValueError, match="does not match"):
        (x * 2.0).backward(np.ones(3))


def test_leaf_gradient_does_not_alias_the_upstream_array():
    x = leaf([1.0, 2.0])
    gy = np.array([5.0, 6.0])
    (x + 0.0).backward(gy)
    x.grad += 1.0  # an optimizer or an allreduce updates it in place
    np.testing.assert_array_equal(gy, [5.0, 6.0])


def test_saved_arrays_are_released_after_backward():
    x = leaf([1.0, 2.0])
    y = x * x
    f = y.creator
    y.backward(np.ones(2))
    assert f.inputs == () and not hasattr(f, "a")


def test_second_backward_through_a_freed_graph_is_a_clear_error():
    x = leaf([1.0, 2.0])
    y = (x * 3.0).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="a second time"):
        y.backward()


def test_reverse_subtraction_and_division():
    x = leaf([1.0, 4.0])
    y = (2.0 - x) / 4.0
    np.testing.assert_allclose(y.data, [0.25, -0.5])
    y.backward(np.ones(2))
    np.testing.assert_allclose(x.grad, [-0.25, -0.25])


# ---------------------------------------------------------------------------
# First gradients written straight into the optimizer's zeroed arrays
# ---------------------------------------------------------------------------
def _linear_net(rng):
    from minitorch_gx.nn import Parameter
    W1, b1 = Parameter(rng.standard_normal((5, 4))), Parameter(rng.standard_normal(5))
    W2 = Parameter(rng.standard_normal((5, 5)))
    return W1, b1, W2


def _grads(zeroed, twice):
    from minitorch_gx.optim import SGD
    rng = np.random.default_rng(0)
    W1, b1, W2 = _linear_net(rng)
    x = mt.Tensor(rng.standard_normal((3, 4)))
    opt = SGD([W1, b1, W2], lr=0.1)
    if zeroed:
        opt.zero_grad()
    h = F.linear(x, W1, b1)
    y = F.linear(F.linear(h, W2), W2) if twice else F.linear(h, W2)  # W2 used twice
    (y * y).sum().backward()
    return [p.grad.copy() for p in (W1, b1, W2)], opt, (W1, b1, W2)


@pytest.mark.parametrize("twice", [False, True], ids=["each-once", "W2-twice"])
def test_first_gradients_go_into_the_zeroed_arrays_and_equal_the_plain_ones(twice):
    plain, _, _ = _grads(zeroed=False, twice=twice)
    written, opt, params = _grads(zeroed=True, twice=twice)
    for a, b in zip(plain, written):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    for p, (_, view, _) in zip(params, opt._views):
        assert p.grad is view and not p.grad_is_zero  # still the optimizer's views


def test_a_gradient_written_in_place_costs_no_launch_on_the_gpu_path():
    from minitorch_gx.cuda import trace
    from minitorch_gx.nn import Parameter
    from minitorch_gx.optim import SGD
    with trace.fake_gpu(record=False):
        W = Parameter(trace.to_gpu(np.ones((6, 4), np.float32)))
        b = Parameter(trace.to_gpu(np.ones(6, np.float32)))
        opt = SGD([W, b], lr=0.1)
        opt.zero_grad()
        y = F.linear(mt.Tensor(trace.to_gpu(np.ones((3, 4), np.float32))), W, b)
    with trace.fake_gpu() as launches:
        y.backward(trace.to_gpu(np.ones((3, 6), np.float32)))
    # gx, gW (a GEMM into W.grad), gb (our column sum into b.grad): nothing added or copied after
    assert [x.name for x in launches] == ["cuBLAS GEMM (matmul)", "cuBLAS GEMM (matmul)",
                                          "sum_columns"]
    np.testing.assert_array_equal(np.asarray(W.grad), 3 * np.ones((6, 4)))
