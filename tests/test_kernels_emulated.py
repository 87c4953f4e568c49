"""Every CUDA kernel, run on the CPU by the emulator, against the NumPy reference ops.

The launchers in minitorch_gx/cuda_kernels.py are called with NumPy arrays, so
the very launch code used on the GPU (grid shapes, argument lists, tile sizes)
runs the .cu kernels in the emulator. Shapes are small and awkward (odd sizes,
stride 2, partial tiles, groups that are not powers of two) and each kernel
runs at two block sizes: the default and a small one, which gives other tile
shapes and more partial boundary tiles. References run in float64.
"""
import numpy
import pytest

from minitorch_gx import cuda_emu, cuda_kernels as ck
from minitorch_gx import functions_conv as fconv, functions_loss, functions_norm as fnorm
from minitorch_gx import functions_pool
from minitorch_gx.optim.sgd import sgd_update_reference

pytestmark = pytest.mark.skipif(not cuda_emu.compiler_available(),
                                reason="the CUDA emulator needs a C++ compiler (g++)")

SMALL = {"CONV_THREADS": 64, "WGRAD_THREADS": 64, "BN_THREADS": 64, "XENT_THREADS": 64}
CONFIGS = {"default": {}, "small-blocks": SMALL}


@pytest.fixture(scope="module", autouse=True)
def _prebuild():
    """Compile every variant these tests use at once, one g++ per core."""
    specs = []
    for overrides in CONFIGS.values():
        saved = dict(ck.LAUNCH)
        ck.LAUNCH.update(overrides)
        specs += ck.builds(numpy.float32)
        ck.LAUNCH.clear()
        ck.LAUNCH.update(saved)
    specs += [s for s in ck.builds(numpy.float64) if s[0].startswith("grouped_conv")]
    cuda_emu.prebuild(specs)


@pytest.fixture(params=list(CONFIGS))
def launch(request, monkeypatch):
    for name, value in CONFIGS[request.param].items():
        monkeypatch.setitem(ck.LAUNCH, name, value)
    return request.param


def assert_close(actual, expected, rtol, atol, what):
    actual, expected = numpy.asarray(actual, numpy.float64), numpy.asarray(expected, numpy.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = numpy.abs(actual - expected)
    bound = atol + rtol * numpy.abs(expected)
    if not (err <= bound).all():
        i = numpy.unravel_index(numpy.argmax(err - bound), err.shape)
        rel = err / numpy.maximum(numpy.abs(expected), 1e-30)
        raise AssertionError(
            f"{what}: shape {expected.shape}, worst abs error {err.max():.3g}, worst rel error "
            f"{rel.max():.3g}; at {i}: got {actual[i]!r}, expected {expected[i]!r}; "
            f"first values got {actual.ravel()[:4]}, expected {expected.ravel()[:4]}")


def scaled(expected):
    """An absolute tolerance for float32 sums: relative to the array's magnitude."""
    return 2e-5 * max(1.0, float(numpy.abs(expected).max()))


# --------------------------------------------------------------------------
# Grouped convolution
# --------------------------------------------------------------------------
# (N, C, H, W, K, groups, R, S, stride, padding)
CONV_CASES = [
    (2, 8, 7, 9, 12, 2, 3, 3, 1, 1),            # Kg = 6: a partial 8-row tile
    (3, 6, 9, 8, 9, 3, 3, 3, 2, 1),             # stride 2, Kg = Cg = 3
    (2, 128, 6, 5, 128, 32, 3, 3, 1, 1),        # ResNeXt layer1's 32 groups of 4
    (2, 64, 9, 9, 64, 2, 3, 3, 2, 1),           # 32 channels per group, stride 2
    (2, 8, 24, 25, 8, 2, 3, 3, 1, 1),           # more pixels than one tile holds
    (1, 3, 15, 13, 10, 1, 7, 7, 2, 3),          # a stem: 7x7 stride 2, groups 1
    (2, 4, 5, 5, 4, 4, 1, 1, 1, 0),             # depthwise 1x1
    (1, 10, 6, 7, 80, 2, 1, 5, (1, 2), (0, 2)), # Kg = 40 > 32: two row tiles; 1x5 filter
    (1, 4, 3, 3, 4, 1, 5, 5, 1, 2),             # filter larger than the image
]


def _conv_data(case, dtype, seed):
    n, c, h, w, k, g, r, s, stride, padding = case
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    W = rng.standard_normal((k, c // g, r, s)).astype(dtype)
    y_ref = fconv.conv2d_forward_reference(x.astype(numpy.float64), W.astype(numpy.float64),
                                           stride, padding, g)
    gy = rng.standard_normal(y_ref.shape).astype(dtype)
    return x, W, gy, y_ref


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:8])))
def test_grouped_conv_matches_reference(case, launch):
    x, W, gy, y_ref = _conv_data(case, numpy.float32, seed=len(launch))
    stride, padding, g = case[8], case[9], case[5]
    x64, W64, gy64 = (a.astype(numpy.float64) for a in (x, W, gy))
    y = ck.conv2d_forward(x, W, stride, padding, g)
    assert_close(y, y_ref, 1e-5, scaled(y_ref), "conv2d_forward")
    gx_ref = fconv.conv2d_backward_data_reference(gy64, W64, x.shape, stride, padding, g)
    gx = ck.conv2d_backward_data(gy, W, x.shape, stride, padding, g)
    assert_close(gx, gx_ref, 1e-5, scaled(gx_ref), "conv2d_backward_data")
    gW_ref = fconv.conv2d_backward_weight_reference(gy64, x64, W.shape, stride, padding, g)
    gW = ck.conv2d_backward_weight(gy, x, W.shape, stride, padding, g)
    assert_close(gW, gW_ref, 1e-5, scaled(gW_ref), "conv2d_backward_weight")


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[7]], ids=["stride2", "wide"])
def test_grouped_conv_float64(case):
    x, W, gy, y_ref = _conv_data(case, numpy.float64, seed=3)
    stride, padding, g = case[8], case[9], case[5]
    assert_close(ck.conv2d_forward(x, W, stride, padding, g), y_ref, 1e-12, 1e-12, "forward")
    assert_close(ck.conv2d_backward_data(gy, W, x.shape, stride, padding, g),
                 fconv.conv2d_backward_data_reference(gy, W, x.shape, stride, padding, g),
                 1e-12, 1e-12, "backward data")
    assert_close(ck.conv2d_backward_weight(gy, x, W.shape, stride, padding, g),
                 fconv.conv2d_backward_weight_reference(gy, x, W.shape, stride, padding, g),
                 1e-12, 1e-11, "backward weight")


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_conv_goes_to_gemm_and_matches(stride, monkeypatch):
    case = (2, 8, 5, 7, 6, 1, 1, 1, stride, 0)
    x, W, gy, y_ref = _conv_data(case, numpy.float32, seed=5)
    gy64 = gy.astype(numpy.float64)
    for gemm in (True, False):  # the cuBLAS route and our kernel give the same answer
        monkeypatch.setattr(ck, "GEMM_FOR_1X1", gemm)
        assert_close(ck.conv2d_forward(x, W, stride, 0, 1), y_ref, 1e-5, scaled(y_ref), "forward")
        gx_ref = fconv.conv2d_backward_data_reference(gy64, W.astype(numpy.float64), x.shape,
                                                      stride, 0, 1)
        assert_close(ck.conv2d_backward_data(gy, W, x.shape, stride, 0, 1), gx_ref, 1e-5,
                     scaled(gx_ref), "backward data")
        gW_ref = fconv.conv2d_backward_weight_reference(gy64, x.astype(numpy.float64), W.shape,
                                                        stride, 0, 1)
        assert_close(ck.conv2d_backward_weight(gy, x, W.shape, stride, 0, 1), gW_ref, 1e-5,
                     scaled(gW_ref), "backward weight")


def test_conv_rejects_bad_shapes():
    x = numpy.zeros((1, 6, 5, 5), numpy.float32)
    with pytest.raises(ValueError, match="groups"):
        ck.conv2d_forward(x, numpy.zeros((4, 4, 3, 3), numpy.float32), 1, 1, 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        ck.conv2d_forward(x.astype(numpy.float16), numpy.zeros((6, 3, 3, 3), numpy.float16), 1, 1,
                          2)


# --------------------------------------------------------------------------
# Batch norm
# --------------------------------------------------------------------------
BN_SHAPES = [(3, 5, 7, 9), (2, 70, 3, 1), (4, 3, 1, 1), (1, 2, 37, 41), (6, 3, 20, 20)]


@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_batch_norm_matches_reference(shape, relu, launch):
    rng = numpy.random.default_rng(7)
    c = shape[1]
    x = (rng.standard_normal(shape) * 3 + 5).astype(numpy.float32)  # a mean far from 0
    gamma, beta = (rng.standard_normal(c).astype(numpy.float32) for _ in range(2))
    gy = rng.standard_normal(shape).astype(numpy.float32)
    x64, gy64 = x.astype(numpy.float64), gy.astype(numpy.float64)

    y, mean, var = ck.batch_norm_train_forward(x, gamma, beta, 1e-5, relu)
    y_ref, mean_ref, var_ref = fnorm.batch_norm_train_forward_reference(x64, gamma, beta, 1e-5,
                                                                        relu)
    assert_close(mean, mean_ref, 1e-6, 1e-5, "batch mean")
    assert_close(var, var_ref, 1e-5, 1e-5, "batch var")
    assert_close(y, y_ref, 1e-5, 1e-5, "train forward y")

    invstd = (1 / numpy.sqrt(var.astype(numpy.float64) + 1e-5)).astype(numpy.float32)
    gx, ggamma, gbeta = ck.batch_norm_backward(gy, x, y, gamma, mean, invstd, relu)
    refs = fnorm.batch_norm_backward_reference(gy64, x64, y.astype(numpy.float64), gamma, mean,
                                               invstd, relu)
    for got, ref, name in zip((gx, ggamma, gbeta), refs, ("gx", "ggamma", "gbeta")):
        assert_close(got, ref, 1e-4, scaled(ref), f"train backward {name}")

    rmean = rng.standard_normal(c).astype(numpy.float32)
    rvar = (rng.random(c) + 0.5).astype(numpy.float32)
    yi = ck.batch_norm_infer_forward(x, gamma, beta, rmean, rvar, 1e-5, relu)
    yi_ref = fnorm.batch_norm_infer_forward_reference(x64, gamma, beta, rmean, rvar, 1e-5, relu)
    assert_close(yi, yi_ref, 1e-5, 1e-5, "inference forward")
    refs = fnorm.batch_norm_infer_backward_reference(gy64, x64, yi_ref, gamma, rmean, rvar, 1e-5,
                                                     relu)
    got = ck.batch_norm_infer_backward(gy, x, yi, gamma, rmean, rvar, 1e-5, relu)
    for g, ref, name in zip(got, refs, ("gx", "ggamma", "gbeta")):
        assert_close(g, ref, 1e-4, scaled(ref), f"inference backward {name}")


def test_batch_norm_variance_is_stable_far_from_zero():
    # mean 1e4, std 1e-1: a sum-of-squares formula loses every digit in float32
    rng = numpy.random.default_rng(11)
    x = (1e4 + 0.1 * rng.standard_normal((4, 3, 16, 16))).astype(numpy.float32)
    _, mean, var = ck.batch_norm_train_forward(x, numpy.ones(3, numpy.float32),
                                               numpy.zeros(3, numpy.float32), 1e-5, False)
    var_ref = x.astype(numpy.float64).var(axis=(0, 2, 3))
    assert_close(var, var_ref, 2e-3, 0, "variance")


def test_running_statistics_update():
    rng = numpy.random.default_rng(2)
    rm, rv = rng.standard_normal(9).astype(numpy.float32), rng.random(9).astype(numpy.float32)
    mean, var = rng.standard_normal(9).astype(numpy.float32), rng.random(9).astype(numpy.float32)
    rm_ref = 0.9 * rm.astype(numpy.float64) + 0.1 * mean
    rv_ref = 0.9 * rv.astype(numpy.float64) + 0.1 * var * 50 / 49
    ck.batch_norm_update_running(rm, rv, mean, var, 50, 0.1)  # in place
    assert_close(rm, rm_ref, 1e-6, 1e-7, "running mean")
    assert_close(rv, rv_ref, 1e-6, 1e-7, "running var")


# --------------------------------------------------------------------------
# SGD
# --------------------------------------------------------------------------
def _sgd_setup(n_per_group, seed=0):
    rng = numpy.random.default_rng(seed)
    n = sum(n_per_group)
    p, buf = rng.standard_normal(n).astype(numpy.float32), numpy.zeros(n, numpy.float32)
    ends = numpy.cumsum(n_per_group).astype(numpy.int64)
    hyper = [(0.1, 1e-4, 0.9), (0.1, 0.0, 0.9), (0.05, 1e-3, 0.0)][:len(n_per_group)]
    return rng, p, buf, ends, hyper


@pytest.mark.parametrize("sizes", [(300, 301, 399), (1,), (5000, 7)])
def test_sgd_matches_reference_over_steps(sizes):
    rng, p, buf, ends, hyper = _sgd_setup(sizes)
    p_ref, buf_ref = p.copy(), buf.copy()
    lrs, wds, moms = (numpy.array([h[i] for h in hyper], numpy.float32) for i in range(3))
    starts = numpy.concatenate([[0], ends[:-1]])
    for step in range(3):
        g = rng.standard_normal(p.size).astype(numpy.float32)
        ck.sgd_momentum_update(p, g, buf, ends, lrs, wds, moms)
        for (lr, wd, mom), a, b in zip(hyper, starts, ends):
            sgd_update_reference(p_ref[a:b], g[a:b], buf_ref[a:b], lr, mom, wd)
        assert_close(p, p_ref, 1e-6, 1e-7, f"parameters after step {step}")
        assert_close(buf, buf_ref, 1e-6, 1e-7, f"momentum after step {step}")


def test_sgd_grid_stride_loop_covers_every_element():
    # a grid far smaller than the buffer: each thread loops over many elements
    rng, p, buf, ends, hyper = _sgd_setup((700, 300))
    g = rng.standard_normal(p.size).astype(numpy.float32)
    lrs, wds, moms = (numpy.array([h[i] for h in hyper], numpy.float32) for i in range(3))
    dev = cuda_emu.device()
    args = [dev.input(a, a.dtype) for a in (p, g, buf, ends, lrs, wds, moms)]
    cuda_emu.build("sgd.cu", dict(ck.builds())["sgd.cu"]).launch(
        "sgd_momentum_update", 3, 64, args + [numpy.int32(2), numpy.int64(p.size)])
    for (lr, wd, mom), a, b in zip(hyper, (0, 700), (700, 1000)):
        sgd_update_reference(p[a:b], g[a:b], buf[a:b], lr, mom, wd)
    assert_close(args[0], p, 1e-6, 1e-7, "parameters")


# --------------------------------------------------------------------------
# Max pooling, softmax cross-entropy, add + ReLU
# --------------------------------------------------------------------------
def _first_max_tap(x, y, k, s, pad):
    """Naive loops: the first tap i * kw + j (row-major) of each window equal to its max."""
    (kh, kw), (sh, sw), (ph, pw) = (ck._pair(v, "") for v in (k, s, pad))
    first = numpy.full(y.shape, -1)
    for n, c, p, q in numpy.ndindex(*y.shape):
        for i in range(kh):
            for j in range(kw):
                h, w = p * sh - ph + i, q * sw - pw + j
                if first[n, c, p, q] < 0 and 0 <= h < x.shape[2] and 0 <= w < x.shape[3] \
                        and x[n, c, h, w] == y[n, c, p, q]:
                    first[n, c, p, q] = i * kw + j
    return first


@pytest.mark.parametrize("shape,k,s,pad", [((2, 3, 9, 11), 3, 2, 1), ((1, 2, 8, 8), 2, 2, 0),
                                           ((2, 2, 7, 7), 3, 1, 1),
                                           ((1, 1, 6, 9), (2, 3), (1, 2), (1, 1))])
def test_max_pool_matches_reference_with_ties(shape, k, s, pad):
    rng = numpy.random.default_rng(4)
    x = rng.integers(0, 4, size=shape).astype(numpy.float32)  # many ties: first tap must win
    op = functions_pool.MaxPool2d(k, s, pad)
    y_ref = op.forward(x)
    y, argmax = ck.max_pool2d_forward(x, k, s, pad)
    numpy.testing.assert_array_equal(y, y_ref)
    numpy.testing.assert_array_equal(argmax, _first_max_tap(x, y, k, s, pad))
    gy = rng.standard_normal(y.shape).astype(numpy.float32)
    (gx_ref,) = op.backward(gy)
    assert_close(ck.max_pool2d_backward(gy, argmax, x.shape, k, s, pad), gx_ref, 1e-6, 1e-6,
                 "max_pool2d backward")


@pytest.mark.parametrize("n,k", [(5, 7), (3, 1000)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_cross_entropy_matches_reference(n, k, smoothing, launch):
    rng = numpy.random.default_rng(6)
    logits = (rng.standard_normal((n, k)) * 4).astype(numpy.float32)
    labels = rng.integers(0, k, size=n)
    op = functions_loss.CrossEntropy(labels, smoothing, "none")
    loss_ref = op.forward(logits.astype(numpy.float64))
    loss, lse = ck.softmax_cross_entropy_forward(logits, labels, smoothing)
    assert_close(loss, loss_ref, 1e-5, 1e-5, "loss")
    gloss = rng.standard_normal(n).astype(numpy.float32)
    (g_ref,) = op.backward(gloss.astype(numpy.float64))
    g = ck.softmax_cross_entropy_backward(logits, labels, lse, gloss, smoothing)
    assert_close(g, g_ref, 1e-5, 1e-6, "gradient of the logits")


def test_add_relu_and_its_backward():
    rng = numpy.random.default_rng(8)
    a, b, gy = (rng.standard_normal((3, 5, 7)).astype(numpy.float32) for _ in range(3))
    y = ck.add_relu_forward(a, b)
    numpy.testing.assert_array_equal(y, numpy.maximum(a + b, 0))
    numpy.testing.assert_array_equal(ck.relu_backward(gy, y), gy * (a + b > 0))


def test_grid_stride_kernels_cover_every_element_with_a_tiny_grid():
    # the launchers size grids to the data; here 2 blocks must loop over all of it
    rng = numpy.random.default_rng(10)
    dev = cuda_emu.device()
    a, b = (dev.input(rng.standard_normal(5000), numpy.float32) for _ in range(2))
    y = dev.empty(5000, numpy.float32)
    cuda_emu.build("add_relu.cu", dict(ck.builds())["add_relu.cu"]).launch(
        "add_relu_fwd", 2, 64, [a, b, y, numpy.int64(5000)])
    numpy.testing.assert_array_equal(y, numpy.maximum(a + b, 0))
    x = dev.input(rng.standard_normal((2, 3, 15, 17)).astype(numpy.float32), numpy.float32)
    geo = [2, 3, 15, 17, 8, 9, 3, 3, 2, 2, 1, 1]  # N C H W P Q kh kw sh sw ph pw
    yp, arg = dev.empty((2, 3, 8, 9), numpy.float32), dev.empty((2, 3, 8, 9), numpy.uint8)
    cuda_emu.build("max_pool.cu", dict(ck.builds())["max_pool.cu"]).launch(
        "max_pool2d_fwd", 2, 32, [x, yp, arg] + [numpy.int32(v) for v in geo])
    numpy.testing.assert_array_equal(yp, functions_pool.MaxPool2d(3, 2, 1).forward(x.copy()))


def test_kernels_refuse_a_block_size_they_were_not_compiled_for():
    # grouped_conv.cu's tile geometry is fixed at compile time: a launch with
    # another block size must fail loudly (__trap), not compute garbage
    dev = cuda_emu.device()
    x, W = dev.zeros((1, 4, 5, 5), numpy.float32), dev.zeros((4, 2, 3, 3), numpy.float32)
    y = dev.empty((1, 4, 5, 5), numpy.float32)
    dims = [1, 4, 5, 5, 4, 5, 5, 2, 3, 3, 1, 1, 1, 1, 4]  # N C H W K P Q G R S sh sw ph pw BM
    module = cuda_emu.build("grouped_conv.cu", dict(ck.builds())["grouped_conv.cu"])
    with pytest.raises(cuda_emu.EmuError, match="__trap"):
        module.launch("grouped_conv2d_fwd", (1, 2), 128, [x, W, y] + [numpy.int32(v) for v in dims])
