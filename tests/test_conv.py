"""conv2d against a naive loop reference, finite differences, and fast == reference.

The naive reference below loops over every output element and every kernel tap
in plain Python, so it shares nothing with the im2col or lowering code.
"""
import numpy
import pytest

import minitorch_gx as mt
from minitorch_gx import backend, functions_conv
from minitorch_gx.functional import conv2d

IMPLEMENTATIONS = ["fast", "reference"]


def naive_conv2d(x, W, b, stride, padding, groups):
    N, C, H, Wd = x.shape
    K, iCg, R, S = W.shape
    oCg = K // groups
    (sh, sw), (ph, pw) = stride, padding
    P, Q = (H + 2 * ph - R) // sh + 1, (Wd + 2 * pw - S) // sw + 1
    y = numpy.zeros((N, K, P, Q))
    for n in range(N):
        for k in range(K):
            g = k // oCg
            for p in range(P):
                for q in range(Q):
                    acc = 0.0 if b is None else b[k]
                    for i in range(iCg):
                        for r in range(R):
                            for s in range(S):
                                h, w = p * sh + r - ph, q * sw + s - pw
                                if 0 <= h < H and 0 <= w < Wd:
                                    acc += W[k, i, r, s] * x[n, g * iCg + i, h, w]
                    y[n, k, p, q] = acc
    return y


# (N, C, K, H, W, kernel, stride, padding, groups): odd sizes, strides, groups
TINY = [
    (2, 4, 6, 7, 9, 3, (1, 1), (1, 1), 2),
    (1, 4, 4, 5, 7, 3, (2, 2), (1, 1), 4),
    (3, 2, 3, 6, 5, 1, (2, 2), (0, 0), 1),
    (1, 3, 4, 9, 9, 7, (2, 2), (3, 3), 1),
    (2, 4, 4, 8, 7, 2, (2, 1), (0, 1), 2),
    (1, 2, 2, 5, 5, 3, (3, 3), (2, 2), 1),
]


def _random(shape, rng, dtype=numpy.float64):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", TINY)
def test_forward_matches_naive_loops(impl, case):
    N, C, K, H, Wd, k, stride, padding, groups = case
    rng = numpy.random.default_rng(1)
    x, W, b = _random((N, C, H, Wd), rng), _random((K, C // groups, k, k), rng), _random(K, rng)
    with backend.implementation(impl):
        y = conv2d(x, W, b, stride, padding, groups).data
    numpy.testing.assert_allclose(y, naive_conv2d(x, W, b, stride, padding, groups),
                                  rtol=1e-10, atol=1e-12)


# gradcheck shapes: batch 1 and 3, groups 1, 2, 4, kernels 1, 3 and 7x7/2
# (N, C, K, H, W, kernel, stride, padding, groups)
GRAD_CASES = [
    (1, 4, 6, 5, 7, 3, 1, 1, 2),
    (3, 4, 4, 7, 5, 3, 2, 1, 4),
    (3, 4, 6, 5, 5, 3, 2, 0, 2),
    (1, 4, 8, 7, 7, 1, 1, 0, 1),
    (3, 4, 4, 7, 5, 1, 2, 0, 2),
    (1, 2, 3, 9, 9, 7, 2, 3, 1),
    (2, 2, 4, 4, 5, 1, 1, 1, 1),  # a padded 1x1: gx through the general lowering path
]


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck_x_W_b(case):
    N, C, K, H, Wd, k, stride, padding, groups = case
    rng = numpy.random.default_rng(2)
    x = mt.Tensor(_random((N, C, H, Wd), rng), requires_grad=True)
    W = mt.Tensor(_random((K, C // groups, k, k), rng), requires_grad=True)
    b = mt.Tensor(_random(K, rng), requires_grad=True)
    mt.gradcheck(lambda x, W, b: conv2d(x, W, b, stride, padding, groups), [x, W, b],
                 atol=1e-7, rtol=1e-6)


def test_gradcheck_reference_path():
    rng = numpy.random.default_rng(3)
    x = mt.Tensor(_random((2, 4, 5, 7), rng), requires_grad=True)
    W = mt.Tensor(_random((4, 2, 3, 3), rng), requires_grad=True)
    with backend.implementation("reference"):
        mt.gradcheck(lambda x, W: conv2d(x, W, None, 2, 1, 2), [x, W], atol=1e-7, rtol=1e-6)


def _all_three(x, W, gy, stride, padding, groups):
    args = (stride, padding, groups)
    return (functions_conv.conv2d_forward(x, W, *args),
            functions_conv.conv2d_backward_data(gy, W, x.shape, *args),
            functions_conv.conv2d_backward_weight(gy, x, W.shape, *args))


# ResNeXt-like: 32 groups of 2 or 4 channels, the stem, 1x1 with stride and on small maps
RESNEXT_LIKE = [
    (2, 64, 64, 15, 15, 3, 2, 1, 32),
    (2, 128, 128, 9, 9, 3, 1, 1, 32),
    (2, 3, 16, 23, 23, 7, 2, 3, 1),
    (2, 32, 64, 15, 15, 1, 2, 0, 1),
    (3, 64, 32, 7, 7, 1, 1, 0, 1),
    (2, 64, 128, 5, 5, 1, 1, 0, 1),  # layer4-like: few pixels, many channels
]


@pytest.mark.parametrize("case", RESNEXT_LIKE)
@pytest.mark.parametrize("chunk_bytes", [None, 1, 2 * 4000])
def test_fast_equals_reference(case, chunk_bytes, monkeypatch):
    """Also with the batch cut into chunks of 1 and of 2 images (ragged end)."""
    if chunk_bytes is not None:
        monkeypatch.setattr(functions_conv, "CHUNK_BYTES", chunk_bytes)
    N, C, K, H, Wd, k, stride, padding, groups = case
    rng = numpy.random.default_rng(4)
    x, W = _random((N, C, H, Wd), rng), _random((K, C // groups, k, k), rng)
    fast_y = functions_conv.conv2d_forward(x, W, stride, padding, groups)
    gy = _random(fast_y.shape, rng)
    fast = _all_three(x, W, gy, stride, padding, groups)
    with backend.implementation("reference"):
        ref = _all_three(x, W, gy, stride, padding, groups)
    for name, a, r in zip(["y", "gx", "gW"], fast, ref):
        assert a.shape == r.shape, name
        numpy.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", [RESNEXT_LIKE[0], RESNEXT_LIKE[3], TINY[3]])
def test_float32_stays_float32(impl, case):
    N, C, K, H, Wd, k, stride, padding, groups = case
    rng = numpy.random.default_rng(5)
    x = mt.Tensor(_random((N, C, H, Wd), rng, numpy.float32), requires_grad=True)
    W = mt.Tensor(_random((K, C // groups, k, k), rng, numpy.float32), requires_grad=True)
    b = mt.Tensor(_random(K, rng, numpy.float32), requires_grad=True)
    with backend.implementation(impl):
        y = conv2d(x, W, b, stride, padding, groups)
        y.backward(_random(y.shape, rng, numpy.float32))
    assert {t.dtype for t in (y, x.grad, W.grad, b.grad)} == {numpy.dtype(numpy.float32)}
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    expected = naive_conv2d(x.data.astype(numpy.float64), W.data.astype(numpy.float64),
                            b.data.astype(numpy.float64), pair(stride), pair(padding), groups)
    numpy.testing.assert_allclose(y.data, expected, rtol=1e-4, atol=1e-4)


def test_no_input_gradient_when_the_input_needs_none():
    """The stem's input is the image: backward must not compute (or store) gx."""
    rng = numpy.random.default_rng(6)
    x = mt.Tensor(_random((1, 3, 9, 9), rng))
    W = mt.Tensor(_random((4, 3, 7, 7), rng), requires_grad=True)
    y = conv2d(x, W, None, 2, 3)
    gx, gW = y.creator.backward(numpy.ones(y.shape))
    assert gx is None and gW.shape == W.shape


def test_matches_torch_when_available():
    torch = pytest.importorskip("torch")
    rng = numpy.random.default_rng(7)
    x, W, b = _random((2, 8, 11, 10), rng), _random((8, 2, 3, 3), rng), _random(8, rng)
    xt = mt.Tensor(x, requires_grad=True)
    y = conv2d(xt, W, b, (2, 1), (1, 2), 4)
    gy = _random(y.shape, rng)
    y.backward(gy)
    x_torch = torch.tensor(x, requires_grad=True)
    y_torch = torch.nn.functional.conv2d(x_torch, torch.tensor(W), torch.tensor(b), (2, 1), (1, 2),
                                         1, 4)
    y_torch.backward(torch.tensor(gy))
    numpy.testing.assert_allclose(y.data, y_torch.detach().numpy(), rtol=1e-10, atol=1e-12)
    numpy.testing.assert_allclose(xt.grad, x_torch.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("x_shape, W_shape, groups, b_shape, message", [
    ((1, 6, 5, 5), (4, 3, 3, 3), 4, None, "divisible by groups"),
    ((1, 6, 5, 5), (4, 2, 3, 3), 2, None, "input channels per group"),
    ((1, 4, 5, 5), (4, 4, 3, 3), 1, (3,), "bias"),
    ((1, 4, 2, 2), (4, 4, 3, 3), 1, None, "larger than the padded input"),
])
def test_bad_shapes_raise_one_clear_error(x_shape, W_shape, groups, b_shape, message):
    b = None if b_shape is None else numpy.zeros(b_shape)
    with pytest.raises(ValueError, match=message):
        conv2d(numpy.zeros(x_shape), numpy.zeros(W_shape), b, groups=groups)


def test_mixed_dtypes_raise():
    with pytest.raises(ValueError, match="dtype"):
        conv2d(numpy.zeros((1, 2, 5, 5)), numpy.zeros((2, 2, 3, 3), numpy.float32))
