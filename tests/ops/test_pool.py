"""Pooling (minitorch_gx/ops/pool.py): max, average and adaptive average.

1. The plain references (``max_pool2d_*_reference``, ``avg_pool2d_*_reference``)
   against loops over every window, ties and padding included.
2. The ops on every implementation against the same loops; float64 gradients
   by finite differences.
3. The NumPy fast path == the reference.
4. The max-pool CUDA kernels (emulated, every check on, under every schedule,
   and CuPy) == the reference, at two block sizes, in float32 and float64,
   with ties everywhere; the op wired to its kernels.
"""
import numpy as np
import pytest

import minitorch_gx as mt
from minitorch_gx.cuda import device as cuda_device, emulator, pool as cuda_pool
from minitorch_gx.ops import pool
from minitorch_gx.ops.pool import adaptive_avg_pool2d, avg_pool2d, max_pool2d
from tests.backends import (count_calls, IMPLEMENTATIONS, KERNEL_IMPLEMENTATIONS, assert_close, host,
                            launch_shapes, needs_emulator, needs_gpu, run_on,
                            same_bits_under_every_schedule)

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
GEOMETRY_IDS = ["stem-odd", "batch3", "default-stride", "overlap", "gaps", "rect", "one-window"]


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
    """Forward, the gradient sent to the row-major first max of each window,
    and that first max's tap i * kw + j."""
    kk, _, pp = _pairs(k, s, p)
    n, c, h, w = x.shape
    ys, gxpad = {}, np.zeros((n, c, h + 2 * pp[0], w + 2 * pp[1]))
    taps = np.full(gy.shape, -1)
    for a, b, i, j, win, top, left in naive_windows(x, k, s, p, -np.inf):
        ys[a, b, i, j] = win.max()
        first = int(np.flatnonzero(win.ravel() == win.max())[0])
        taps[a, b, i, j] = first
        gxpad[a, b, top + first // kk[1], left + first % kk[1]] += gy[a, b, i, j]
    y = np.zeros(gy.shape)
    for key, v in ys.items():
        y[key] = v
    return y, gxpad[:, :, pp[0]:pp[0] + h, pp[1]:pp[1] + w], taps


def naive_avg_pool(x, gy, k, s, p):
    kk, _, pp = _pairs(k, s, p)
    n, c, h, w = x.shape
    y, gxpad = np.zeros(gy.shape), np.zeros((n, c, h + 2 * pp[0], w + 2 * pp[1]))
    for a, b, i, j, win, top, left in naive_windows(x, k, s, p, 0.0):
        y[a, b, i, j] = win.sum() / win.size  # zero padding counted
        gxpad[a, b, top:top + kk[0], left:left + kk[1]] += gy[a, b, i, j] / win.size
    return y, gxpad[:, :, pp[0]:pp[0] + h, pp[1]:pp[1] + w]


def first_max_tap(x, y, k, s, pad):
    """Naive loops: the first tap i * kw + j (row-major) of each window equal to its max."""
    (kh, kw), (sh, sw), (ph, pw) = _pairs(k, s, pad)
    first = np.full(y.shape, -1)
    for n, c, p, q in np.ndindex(*y.shape):
        for i in range(kh):
            for j in range(kw):
                h, w = p * sh - ph + i, q * sw - pw + j
                if first[n, c, p, q] < 0 and 0 <= h < x.shape[2] and 0 <= w < x.shape[3] \
                        and x[n, c, h, w] == y[n, c, p, q]:
                    first[n, c, p, q] = i * kw + j
    return first


def out_shape(shape, k, s, p):
    (kh, kw), (sh, sw), (ph, pw) = _pairs(k, s, p)
    n, c, h, w = shape
    return n, c, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def run(op, x, gy, *args, dev=np.array):
    t = mt.Tensor(dev(x), requires_grad=True)
    y = op(t, *args)
    y.backward(dev(gy))
    return host(y.data), host(t.grad)


# ==========================================================================
# 1. The references against loops over every window
# ==========================================================================
@pytest.mark.parametrize("data", ["random", "ties"])
@pytest.mark.parametrize("shape,k,s,p", GEOMETRIES, ids=GEOMETRY_IDS)
def test_max_pool_reference_matches_naive(shape, k, s, p, data):
    rng = np.random.default_rng(10)
    x = rng.standard_normal(shape) if data == "random" else \
        rng.integers(0, 2, shape).astype(np.float64)  # ties everywhere
    gy = rng.standard_normal(out_shape(shape, k, s, p))
    ny, ngx, ntaps = naive_max_pool(x, gy, k, s, p)
    y, argmax = pool.max_pool2d_forward_reference(x, k, s, p)
    assert y.dtype == np.float64 and argmax.dtype == np.uint8
    np.testing.assert_array_equal(y, ny)
    np.testing.assert_array_equal(argmax, ntaps)  # the row-major first maximum
    np.testing.assert_array_equal(argmax, first_max_tap(x, y, k, s, p))
    gx = pool.max_pool2d_backward_reference(gy, argmax, x.shape, k, s, p)
    np.testing.assert_allclose(gx, ngx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,k,s,p", GEOMETRIES, ids=GEOMETRY_IDS)
def test_avg_pool_reference_matches_naive(shape, k, s, p):
    rng = np.random.default_rng(11)
    x = rng.standard_normal(shape)
    gy = rng.standard_normal(out_shape(shape, k, s, p))
    ny, ngx = naive_avg_pool(x, gy, k, s, p)
    y, saved = pool.avg_pool2d_forward_reference(x, k, s, p)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, ny, rtol=1e-12, atol=1e-12)
    gx = pool.avg_pool2d_backward_reference(gy, saved, x.shape, k, s, p)
    np.testing.assert_allclose(gx, ngx, rtol=1e-12, atol=1e-12)


def test_reference_argmax_is_the_first_tap_on_a_hand_example():
    # one 3x3 window, maxima 5 at taps 2 and 6 (and never in the padding)
    x = np.array([[1.0, 0.0, 5.0], [3.0, 4.0, 2.0], [5.0, 1.0, 0.0]]).reshape(1, 1, 3, 3)
    y, argmax = pool.max_pool2d_forward_reference(x, 3, 3, 0)
    assert y.item() == 5.0 and argmax.item() == 2
    gx = pool.max_pool2d_backward_reference(np.full((1, 1, 1, 1), 7.0), argmax, x.shape, 3, 3, 0)
    np.testing.assert_array_equal(gx[0, 0], [[0, 0, 7], [0, 0, 0], [0, 0, 0]])


# ==========================================================================
# 2. The ops, on every implementation, against the loops; gradients
# ==========================================================================
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("data", ["random", "ties"])  # ties: the gradient goes to the first max
@pytest.mark.parametrize("shape,k,s,p", GEOMETRIES, ids=GEOMETRY_IDS)
def test_max_pool_matches_naive(shape, k, s, p, data, impl):
    rng = np.random.default_rng(0 if data == "random" else 1)
    x = rng.standard_normal(shape) if data == "random" else \
        rng.integers(0, 2, shape).astype(np.float64)  # ties everywhere
    gy = rng.standard_normal(max_pool2d(x, k, s, p).shape)
    with run_on(impl) as dev:
        y, gx = run(max_pool2d, x, gy, k, s, p, dev=dev)
    ny, ngx, _ = naive_max_pool(x, gy, k, s, p)
    np.testing.assert_array_equal(y, ny)
    np.testing.assert_allclose(gx, ngx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_max_pool_hand_example_ties_and_padding(impl):
    # all equal, negative: padding (-inf) never wins, the top-left real pixel does
    x = np.full((1, 1, 3, 3), -2.0)
    with run_on(impl) as dev:
        y, gx = run(max_pool2d, x, np.ones((1, 1, 2, 2)), 3, 2, 1, dev=dev)
    np.testing.assert_array_equal(y, np.full((1, 1, 2, 2), -2.0))
    # windows start at padded (0,0),(0,2),(2,0),(2,2) -> first real pixels (0,0),(0,1),(1,0),(1,1)
    np.testing.assert_array_equal(gx[0, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape,k,s,p", GEOMETRIES, ids=GEOMETRY_IDS)
def test_avg_pool_matches_naive(shape, k, s, p, impl):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    gy = rng.standard_normal(avg_pool2d(x, k, s, p).shape)
    with run_on(impl) as dev:
        y, gx = run(avg_pool2d, x, gy, k, s, p, dev=dev)
    ny, ngx = naive_avg_pool(x, gy, k, s, p)
    np.testing.assert_allclose(y, ny, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gx, ngx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("shape,k,s,p", GEOMETRIES[:4], ids=GEOMETRY_IDS[:4])
@pytest.mark.parametrize("op", [max_pool2d, avg_pool2d])
def test_gradcheck(op, shape, k, s, p, impl):
    x = mt.Tensor(np.random.default_rng(3).standard_normal(shape), requires_grad=True)
    with run_on(impl):
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


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_float32_stays_float32(impl):
    with run_on(impl) as dev:
        x = mt.Tensor(dev(np.random.default_rng(6).standard_normal((2, 3, 7, 7))
                          .astype(np.float32)), True)
        for y in (max_pool2d(x, 3, 2, 1), avg_pool2d(x, 2), adaptive_avg_pool2d(x, 1)):
            assert y.dtype == np.float32
            x.grad = None
            y.backward(dev(np.ones(y.shape, np.float32)))
            assert x.grad.dtype == np.float32


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_errors_say_what_is_wrong(impl):
    with run_on(impl) as dev:
        x = dev(np.zeros((1, 1, 5, 5)))
        with pytest.raises(ValueError, match="divide the input"):
            adaptive_avg_pool2d(x, 2)
        with pytest.raises(ValueError, match="at most half the kernel"):
            max_pool2d(x, 3, 2, 2)
        with pytest.raises(ValueError, match="larger than the padded input"):
            max_pool2d(x, 7)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_max_pool_error_names_the_expected_layout(impl):
    with run_on(impl) as dev:
        with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
            max_pool2d(dev(np.zeros((5, 5))), 2)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_max_pool_matches_torch(impl):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 11, 12))
    gy = rng.standard_normal((2, 3, 6, 6))
    with run_on(impl) as dev:
        y, gx = run(max_pool2d, x, gy, 3, 2, 1, dev=dev)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, 3, 2, 1)
    ty.backward(torch.tensor(gy))
    np.testing.assert_array_equal(y, ty.detach().numpy())
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-12)


# ==========================================================================
# 3. The fast path == the reference
# ==========================================================================
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-6)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("data", ["random", "ties"])
@pytest.mark.parametrize("shape,k,s,p", GEOMETRIES, ids=GEOMETRY_IDS)
def test_max_pool_fast_equals_reference(shape, k, s, p, data, dtype, tol):
    rng = np.random.default_rng(12)
    x = (rng.standard_normal(shape) if data == "random" else rng.integers(0, 2, shape)) \
        .astype(dtype)
    gy = rng.standard_normal(out_shape(shape, k, s, p)).astype(dtype)
    y_ref, argmax = pool.max_pool2d_forward_reference(x, k, s, p)
    y, saved = pool._max_pool2d_forward_fast(x, k, s, p)
    assert y.dtype == y_ref.dtype == dtype
    np.testing.assert_array_equal(y, y_ref)
    gx_ref = pool.max_pool2d_backward_reference(gy, argmax, x.shape, k, s, p)
    gx = pool._max_pool2d_backward_fast(gy, saved, x.shape, k, s, p)
    assert gx.dtype == gx_ref.dtype == dtype
    assert_close(gx, gx_ref, tol, tol, "max_pool2d backward")


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-6)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("shape,k,s,p", GEOMETRIES, ids=GEOMETRY_IDS)
def test_avg_pool_fast_equals_reference(shape, k, s, p, dtype, tol):
    rng = np.random.default_rng(13)
    x = rng.standard_normal(shape).astype(dtype)
    gy = rng.standard_normal(out_shape(shape, k, s, p)).astype(dtype)
    y_ref, saved_ref = pool.avg_pool2d_forward_reference(x, k, s, p)
    y, saved = pool._avg_pool2d_forward_fast(x, k, s, p)
    assert y.dtype == y_ref.dtype == dtype
    assert_close(y, y_ref, tol, tol, "avg_pool2d forward")
    gx_ref = pool.avg_pool2d_backward_reference(gy, saved_ref, x.shape, k, s, p)
    gx = pool._avg_pool2d_backward_fast(gy, saved, x.shape, k, s, p)
    assert gx.dtype == gx_ref.dtype == dtype
    assert_close(gx, gx_ref, tol, tol, "avg_pool2d backward")


# ==========================================================================
# 4. The max-pool kernels (emulated and CuPy) == the reference
# ==========================================================================
# (impl, shape, kernel, stride, padding, values 0..top-1, POOL_THREADS): small
# shapes with ties on the emulator at two block sizes; the stem's pool on the GPU
_MARKS = {"emulated": needs_emulator, "cupy": needs_gpu}
_SMALL_POOLS = [((2, 3, 9, 11), 3, 2, 1), ((1, 2, 8, 8), 2, 2, 0), ((2, 2, 7, 7), 3, 1, 1),
                ((1, 1, 6, 9), (2, 3), (1, 2), (1, 1))]
MAX_POOL_KERNEL_CASES = [
    pytest.param(impl, shape, k, s, pad, 4, threads, marks=_MARKS[impl],
                 id=f"{impl}-{'x'.join(map(str, shape))}-k{k}-s{s}-p{pad}-{threads}")
    for impl in _MARKS for threads in (256, 32) for shape, k, s, pad in _SMALL_POOLS] + [
    pytest.param("cupy", (4, 64, 112, 112), 3, 2, 1, 50, 256, marks=needs_gpu,
                 id="cupy-resnext-stem")]


@pytest.mark.parametrize("impl,shape,k,s,pad,top,threads", MAX_POOL_KERNEL_CASES)
def test_max_pool_kernels_match_reference_with_ties(impl, shape, k, s, pad, top, threads):
    rng = np.random.default_rng(4)
    x = rng.integers(0, top, size=shape).astype(np.float32)  # many ties: first tap must win
    y_ref, argmax_ref = pool.max_pool2d_forward_reference(x, k, s, pad)
    gy = rng.standard_normal(y_ref.shape).astype(np.float32)
    gx_ref = pool.max_pool2d_backward_reference(gy, argmax_ref, x.shape, k, s, pad)
    with run_on(impl) as dev, launch_shapes(POOL_THREADS=threads):
        y, argmax = cuda_pool.max_pool2d_forward(dev(x), k, s, pad)
        gx = cuda_pool.max_pool2d_backward(dev(gy), argmax, x.shape, k, s, pad)
    assert y.dtype == np.float32 and argmax.dtype == np.uint8 and gx.dtype == np.float32
    np.testing.assert_array_equal(host(y), y_ref)
    np.testing.assert_array_equal(host(argmax), argmax_ref)
    if x.size < 10_000:  # the loops are too slow for the stem's shape
        np.testing.assert_array_equal(host(argmax), first_max_tap(x, host(y), k, s, pad))
    assert_close(gx, gx_ref, 1e-6, 1e-6, "max_pool2d backward")


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("shape,k,s,pad", [_SMALL_POOLS[0], _SMALL_POOLS[3]],
                         ids=["3x3s2p1", "2x3s1x2p1"])
def test_max_pool_kernels_float64(impl, shape, k, s, pad):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 4, size=shape).astype(np.float64) + rng.random(shape) * 1e-9
    y_ref, argmax_ref = pool.max_pool2d_forward_reference(x, k, s, pad)
    gy = rng.standard_normal(y_ref.shape)
    with run_on(impl) as dev:
        y, argmax = cuda_pool.max_pool2d_forward(dev(x), k, s, pad)
        gx = cuda_pool.max_pool2d_backward(dev(gy), argmax, x.shape, k, s, pad)
    assert y.dtype == gx.dtype == np.float64
    np.testing.assert_array_equal(host(y), y_ref)
    np.testing.assert_array_equal(host(argmax), argmax_ref)
    assert_close(gx, pool.max_pool2d_backward_reference(gy, argmax_ref, x.shape, k, s, pad),
                 1e-15, 1e-15, "max_pool2d backward")


@needs_emulator
@pytest.mark.parametrize("shape,k,s,pad", _SMALL_POOLS)
@pytest.mark.parametrize("threads", [256, 32])
def test_max_pool_kernels_give_the_same_bits_under_every_schedule(shape, k, s, pad, threads):
    rng = np.random.default_rng(6)
    x = rng.integers(0, 4, size=shape).astype(np.float32)
    gy = rng.standard_normal(pool.max_pool2d_forward_reference(x, k, s, pad)[0].shape)

    def run():
        y, argmax = cuda_pool.max_pool2d_forward(x, k, s, pad)
        return y, argmax, cuda_pool.max_pool2d_backward(gy.astype(np.float32), argmax, x.shape,
                                                        k, s, pad)

    with launch_shapes(POOL_THREADS=threads):
        same_bits_under_every_schedule(run, f"max_pool2d {shape}")


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_max_pool_kernel_refuses_windows_over_255_taps(impl):
    with run_on(impl) as dev:
        with pytest.raises(ValueError, match="too large"):
            cuda_pool.max_pool2d_forward(dev(np.zeros((1, 1, 16, 16), np.float32)), 16, 1, 0)


@needs_emulator
def test_max_pool_grid_stride_loop_covers_every_element_with_a_tiny_grid():
    # the launchers size grids to the data; here 2 blocks must loop over all of it
    rng = np.random.default_rng(10)
    dev = emulator.device()
    x = dev.input(rng.standard_normal((2, 3, 15, 17)).astype(np.float32), np.float32)
    geo = [2, 3, 15, 17, 8, 9, 3, 3, 2, 2, 1, 1]  # N C H W P Q kh kw sh sw ph pw
    yp, arg = dev.empty((2, 3, 8, 9), np.float32), dev.empty((2, 3, 8, 9), np.uint8)
    module = emulator.build("max_pool.cu", dict(cuda_device.builds())["max_pool.cu"])
    module.launch("max_pool2d_fwd", 2, 32, [x, yp, arg] + [np.int32(v) for v in geo])
    y_ref, arg_ref = pool.max_pool2d_forward_reference(x.copy(), 3, 2, 1)
    np.testing.assert_array_equal(yp, y_ref)
    np.testing.assert_array_equal(arg, arg_ref)
    gy = dev.input(rng.standard_normal((2, 3, 8, 9)), np.float32)
    gx = dev.empty((2, 3, 15, 17), np.float32)
    module.launch("max_pool2d_bwd", 2, 32, [gy, arg, gx] + [np.int32(v) for v in geo])
    assert_close(gx, pool.max_pool2d_backward_reference(gy.copy(), arg_ref, x.shape, 3, 2, 1),
                 1e-6, 1e-6, "max_pool2d backward")


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_max_pool_through_the_kernels(impl, monkeypatch):
    """The op on its kernel path (launchers, saved argmax) == the NumPy fast path."""
    forward = count_calls(monkeypatch, cuda_pool, "max_pool2d_forward")
    backward = count_calls(monkeypatch, cuda_pool, "max_pool2d_backward")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    gy = np.random.default_rng(9).standard_normal((2, 3, 5, 4)).astype(np.float32)
    y0, g0 = run(max_pool2d, x, gy, 3, 2, 1)
    assert (len(forward), len(backward)) == (0, 0)  # the fast path calls no kernel
    with run_on(impl) as dev:
        y1, g1 = run(max_pool2d, x, gy, 3, 2, 1, dev=dev)
    assert (len(forward), len(backward)) == (1, 1)
    scale = max(1.0, float(np.abs(y0).max()))
    np.testing.assert_allclose(y0, y1, rtol=2e-5, atol=2e-5 * scale)
    scale = max(1.0, float(np.abs(g0).max()))
    np.testing.assert_allclose(g0, g1, rtol=2e-5, atol=2e-5 * scale)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_avg_pool_has_no_kernel_and_runs_on_the_kernel_paths(impl):
    x = np.random.default_rng(14).standard_normal((2, 3, 7, 6)).astype(np.float32)
    gy = np.random.default_rng(15).standard_normal((2, 3, 4, 4)).astype(np.float32)
    y0, g0 = run(avg_pool2d, x, gy, 2, 2, 1)
    with run_on(impl) as dev:
        y1, g1 = run(avg_pool2d, x, gy, 2, 2, 1, dev=dev)
    assert_close(y1, y0, 1e-6, 1e-6, "avg_pool2d forward")
    assert_close(g1, g0, 1e-6, 1e-6, "avg_pool2d backward")


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_max_pool_on_cnhw_memory_keeps_the_layout_and_the_values(impl):
    """CNHW memory (the GPU path's layout) is pooled as it is: same values,
    the output and the gradient in CNHW memory too."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 5, 9, 8)).astype(np.float32)
    gy = rng.standard_normal((3, 5, 5, 4)).astype(np.float32)
    with run_on(impl) as dev:
        y_ref, argmax_ref = cuda_pool.max_pool2d_forward(dev(x), 3, 2, 1)
        gx_ref = cuda_pool.max_pool2d_backward(dev(gy), argmax_ref, x.shape, 3, 2, 1)
        x_cnhw = dev(np.ascontiguousarray(x.transpose(1, 0, 2, 3))).transpose(1, 0, 2, 3)
        y, argmax = cuda_pool.max_pool2d_forward(x_cnhw, 3, 2, 1)
        gx = cuda_pool.max_pool2d_backward(dev(gy), argmax, x.shape, 3, 2, 1)  # gy NCHW
        assert cuda_device.is_cnhw(y) and cuda_device.is_cnhw(argmax) and cuda_device.is_cnhw(gx)
    assert np.array_equal(host(y), host(y_ref)) and np.array_equal(host(argmax), host(argmax_ref))
    assert np.array_equal(host(gx), host(gx_ref))


@pytest.mark.parametrize("op", [lambda x: max_pool2d(x, 3, 2, 1), lambda x: avg_pool2d(x, 3, 2, 1),
                                lambda x: avg_pool2d(x, 2), lambda x: adaptive_avg_pool2d(x, 1),
                                lambda x: adaptive_avg_pool2d(x, (3, 2))],
                         ids=["max 3x3/2", "avg 3x3/2", "avg 2x2", "global", "adaptive 3x2"])
def test_the_fast_path_pools_cnhw_memory_as_it_is(op):
    """The NumPy path's CNHW activations: the NCHW results to the bit, the
    output and the input's gradient in CNHW memory too."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 5, 9, 8)).astype(np.float32)
    results = []
    for data in (x, np.ascontiguousarray(x.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)):
        y = op(mt.Tensor(data, requires_grad=True))
        gy = rng.standard_normal(y.shape).astype(np.float32) if not results else results[0][2]
        gx, = y.creator.backward(gy)  # (a leaf's own .grad is always a C-contiguous copy)
        results.append((y.data, gx, gy))
    (y0, g0, _), (y1, g1, _) = results
    assert cuda_device.is_cnhw(g1)
    assert cuda_device.is_cnhw(y1) or y1.shape[2:] == (1, 1)
    assert np.array_equal(y1, y0) and np.array_equal(g1, g0)
