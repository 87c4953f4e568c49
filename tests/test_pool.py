"""Pooling (functions_pool): forward and gradient routing against loops over
every window, ties and padding, finite-difference gradients."""
import numpy as np
import pytest

import minitorch_gx as mt
from minitorch_gx.functions_pool import adaptive_avg_pool2d, avg_pool2d, max_pool2d

# (N, C, H, W), kernel, stride, padding: odd sizes, batch 1 and 3, overlaps, leftovers
GEOMETRIES = [
    ((1, 2, 7, 9), 3, 2, 1),       # ResNeXt's stem pool on odd sizes
    ((3, 1, 6, 5), 3, 2, 1),
    ((2, 3, 5, 5), 2, None, 0),    # stride defaults to the kernel
    ((1, 2, 8, 7), 3, 1, 1),       # stride 1: heavy overlap
    ((3, 2, 9, 10), 2, 3, 1),      # stride > kernel: rows/columns in no window
    ((1, 1, 6, 11), (3, 2), (2, 1), (1, 0)),
    ((2, 1, 3, 3), 3, 3, 0),       # one window covers everything
]


def _pairs(k, s, p):
    k = (k, k) if isinstance(k, int) else k
    s = k if s is None else ((s, s) if isinstance(s, int) else s)
    p = (p, p) if isinstance(p, int) else p
    return k, s, p


def naive_windows(x, k, s, p, fill):
    """Yield (n, c, i, j, window, top, left) for every output position."""
    k, s, p = _pairs(k, s, p)
    n, c, h, w = x.shape
    xpad = np.full((n, c, h + 2 * p[0], w + 2 * p[1]), fill)
    xpad[:, :, p[0]:p[0] + h, p[1]:p[1] + w] = x
    out_h = (h + 2 * p[0] - k[0]) // s[0] + 1
    out_w = (w + 2 * p[1] - k[1]) // s[1] + 1
    for a in range(n):
        for b in range(c):
            for i in range(out_h):
                for j in range(out_w):
                    top, left = i * s[0], j * s[1]
                    yield a, b, i, j, xpad[a, b, top:top + k[0], left:left + k[1]], top, left


def naive_max_pool(x, gy, k, s, p):
    """Forward and the gradient sent to the row-major first max of each window."""
    kk, _, pp = _pairs(k, s, p)
    n, c, h, w = x.shape
    ys, gxpad = {}, np.zeros((n, c, h + 2 * pp[0], w + 2 * pp[1]))
    for a, b, i, j, win, top, left in naive_windows(x, k, s, p, -np.inf):
        ys[a, b, i, j] = win.max()
        first = int(np.flatnonzero(win.ravel() == win.max())[0])
        gxpad[a, b, top + first // kk[1], left + first % kk[1]] += gy[a, b, i, j]
    y = np.zeros(gy.shape)
    for key, v in ys.items():
        y[key] = v
    return y, gxpad[:, :, pp[0]:pp[0] + h, pp[1]:pp[1] + w]


def naive_avg_pool(x, gy, k, s, p):
    kk, _, pp = _pairs(k, s, p)
    n, c, h, w = x.shape
    y, gxpad = np.zeros(gy.shape), np.zeros((n, c, h + 2 * pp[0], w + 2 * pp[1]))
    for a, b, i, j, win, top, left in naive_windows(x, k, s, p, 0.0):
        y[a, b, i, j] = win.sum() / win.size  # zero padding counted
        gxpad[a, b, top:top + kk[0], left:left + kk[1]] += gy[a, b, i, j] / win.size
    return y, gxpad[:, :, pp[0]:pp[0] + h, pp[1]:pp[1] + w]


def run(op, x, gy, *args):
    t = mt.Tensor(x, requires_grad=True)
    y = op(t, *args)
    y.backward(gy)
    return y.data, t.grad


@pytest.mark.parametrize("shape,k,s,p", GEOMETRIES)
def test_max_pool_matches_naive(shape, k, s, p):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    y0 = max_pool2d(x, k, s, p)
    gy = rng.standard_normal(y0.shape)
    y, gx = run(max_pool2d, x, gy, k, s, p)
    ny, ngx = naive_max_pool(x, gy, k, s, p)
    np.testing.assert_array_equal(y, ny)
    np.testing.assert_allclose(gx, ngx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,k,s,p", GEOMETRIES)
def test_max_pool_ties_go_to_the_first_max(shape, k, s, p):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2, shape).astype(np.float64)  # ties everywhere
    gy = rng.standard_normal(max_pool2d(x, k, s, p).shape)
    y, gx = run(max_pool2d, x, gy, k, s, p)
    ny, ngx = naive_max_pool(x, gy, k, s, p)
    np.testing.assert_array_equal(y, ny)
    np.testing.assert_allclose(gx, ngx, rtol=1e-12, atol=1e-12)


def test_max_pool_hand_example_ties_and_padding():
    # all equal, negative: padding (-inf) never wins, the top-left real pixel does
    x = np.full((1, 1, 3, 3), -2.0)
    y, gx = run(max_pool2d, x, np.ones((1, 1, 2, 2)), 3, 2, 1)
    np.testing.assert_array_equal(y, np.full((1, 1, 2, 2), -2.0))
    # windows start at padded (0,0),(0,2),(2,0),(2,2) -> first real pixels (0,0),(0,1),(1,0),(1,1)
    np.testing.assert_array_equal(gx[0, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])


@pytest.mark.parametrize("shape,k,s,p", GEOMETRIES)
def test_avg_pool_matches_naive(shape, k, s, p):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    gy = rng.standard_normal(avg_pool2d(x, k, s, p).shape)
    y, gx = run(avg_pool2d, x, gy, k, s, p)
    ny, ngx = naive_avg_pool(x, gy, k, s, p)
    np.testing.assert_allclose(y, ny, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gx, ngx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,k,s,p", GEOMETRIES[:4])
@pytest.mark.parametrize("op", [max_pool2d, avg_pool2d])
def test_gradcheck(op, shape, k, s, p):
    x = mt.Tensor(np.random.default_rng(3).standard_normal(shape), requires_grad=True)
    mt.gradcheck(lambda t: op(t, k, s, p), [x])


@pytest.mark.parametrize("shape,size", [((2, 3, 5, 7), 1), ((1, 2, 4, 6), (1, 1)),
                                        ((3, 2, 4, 6), (2, 3)), ((1, 2, 6, 3), (None, 1))])
def test_adaptive_avg_pool(shape, size):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape)
    n, c, h, w = shape
    p, q = (size, size) if isinstance(size, int) else size
    p, q = h if p is None else p, w if q is None else q
    expect = np.zeros((n, c, p, q))
    for i in range(p):
        for j in range(q):
            block = x[:, :, i * h // p:(i + 1) * h // p, j * w // q:(j + 1) * w // q]
            expect[:, :, i, j] = block.mean(axis=(2, 3))
    y = adaptive_avg_pool2d(x, size)
    np.testing.assert_allclose(y.data, expect, rtol=1e-12, atol=1e-12)
    t = mt.Tensor(x, requires_grad=True)
    mt.gradcheck(lambda t: adaptive_avg_pool2d(t, size), [t])


def test_global_average_is_adaptive_one():
    x = np.random.default_rng(5).standard_normal((2, 4, 3, 5))
    np.testing.assert_allclose(adaptive_avg_pool2d(x, 1).data[:, :, 0, 0], x.mean(axis=(2, 3)),
                               rtol=1e-12)


def test_float32_stays_float32():
    x = mt.Tensor(np.random.default_rng(6).standard_normal((2, 3, 7, 7)).astype(np.float32), True)
    for y in (max_pool2d(x, 3, 2, 1), avg_pool2d(x, 2), adaptive_avg_pool2d(x, 1)):
        assert y.dtype == np.float32
        x.grad = None
        y.backward(np.ones(y.shape, np.float32))
        assert x.grad.dtype == np.float32


def test_errors_say_what_is_wrong():
    x = np.zeros((1, 1, 5, 5))
    with pytest.raises(ValueError, match="divide the input"):
        adaptive_avg_pool2d(x, 2)
    with pytest.raises(ValueError, match="at most half the kernel"):
        max_pool2d(x, 3, 2, 2)
    with pytest.raises(ValueError, match="larger than the padded input"):
        max_pool2d(x, 7)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        max_pool2d(np.zeros((5, 5)), 2)


def test_max_pool_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 11, 12))
    gy = rng.standard_normal((2, 3, 6, 6))
    y, gx = run(max_pool2d, x, gy, 3, 2, 1)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, 3, 2, 1)
    ty.backward(torch.tensor(gy))
    np.testing.assert_array_equal(y, ty.detach().numpy())
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-12)
