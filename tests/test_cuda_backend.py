"""The CUDA backend on a real GPU (skipped without one).

1. Every kernel through CuPy against the NumPy reference ops (float64 on the
   host), at ResNeXt's own shapes and at small awkward ones, and the grouped
   conv at several block sizes.
2. A whole resnext50_32x4d forward and backward on the GPU against the NumPy
   backend: logits, loss, every parameter gradient, the running statistics.
3. Training: a few SGD steps on the GPU equal the same steps on the CPU, and
   a short run on a fixed batch brings the loss down.
benchmarks/gpu_check.py runs this file on the lent GPU machine.
"""
import numpy
import pytest

from minitorch_gx import backend, cuda_kernels as ck
from minitorch_gx import functions_conv as fconv, functions_loss, functions_norm as fnorm
from minitorch_gx import functions_pool
from minitorch_gx.backend import cupy
from minitorch_gx.optim import sgd as sgd_module

pytestmark = pytest.mark.skipif(not backend.gpu_available(), reason="no usable CUDA GPU (CuPy)")


def gpu(a):
    return cupy.asarray(a)


def host(a):
    return cupy.asnumpy(a) if isinstance(a, cupy.ndarray) else numpy.asarray(a)


def assert_close(actual, expected, rtol, atol, what):
    actual, expected = host(actual).astype(numpy.float64), host(expected).astype(numpy.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = numpy.abs(actual - expected)
    bound = atol + rtol * numpy.abs(expected)
    if not (err <= bound).all():
        i = numpy.unravel_index(numpy.argmax(err - bound), err.shape)
        raise AssertionError(f"{what}: shape {expected.shape}, worst abs error {err.max():.3g}; "
                             f"at {i}: got {actual[i]!r}, expected {expected[i]!r}")


def scaled(expected, factor=3e-5):
    return factor * max(1.0, float(numpy.abs(host(expected)).max()))


# --------------------------------------------------------------------------
# 1. Kernels
# --------------------------------------------------------------------------
# (N, C, H, W, K, groups, R, S, stride, padding); batch 4 keeps the float64
# host references to a few seconds.
RESNEXT_CONVS = [
    (4, 128, 56, 56, 128, 32, 3, 3, 1, 1),     # layer1 conv2
    (4, 256, 56, 56, 256, 32, 3, 3, 2, 1),     # layer2.0 conv2 (stride 2)
    (4, 256, 28, 28, 256, 32, 3, 3, 1, 1),
    (4, 512, 28, 28, 512, 32, 3, 3, 2, 1),     # layer3.0
    (4, 512, 14, 14, 512, 32, 3, 3, 1, 1),
    (4, 1024, 14, 14, 1024, 32, 3, 3, 2, 1),   # layer4.0
    (4, 1024, 7, 7, 1024, 32, 3, 3, 1, 1),
    (4, 3, 224, 224, 64, 1, 7, 7, 2, 3),       # stem
    (4, 256, 56, 56, 64, 1, 1, 1, 1, 0),       # 1x1 reduce (cuBLAS)
    (4, 256, 56, 56, 512, 1, 1, 1, 2, 0),      # layer2 downsample (cuBLAS, stride 2)
]
AWKWARD_CONVS = [
    (2, 8, 7, 9, 12, 2, 3, 3, 1, 1),
    (3, 6, 9, 8, 9, 3, 3, 3, 2, 1),
    (1, 10, 6, 7, 80, 2, 1, 5, (1, 2), (0, 2)),
    (1, 4, 3, 3, 4, 1, 5, 5, 1, 2),
]


def _conv_check(case, seed=0):
    n, c, h, w, k, g, r, s, stride, padding = case
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(numpy.float32)
    W = (rng.standard_normal((k, c // g, r, s)) / numpy.sqrt(c // g * r * s)).astype(numpy.float32)
    x64, W64 = x.astype(numpy.float64), W.astype(numpy.float64)
    y_ref = fconv.conv2d_forward_reference(x64, W64, stride, padding, g)
    gy = rng.standard_normal(y_ref.shape).astype(numpy.float32)
    gy64 = gy.astype(numpy.float64)
    y = ck.conv2d_forward(gpu(x), gpu(W), stride, padding, g)
    assert_close(y, y_ref, 1e-4, scaled(y_ref), f"{case} forward")
    gx = ck.conv2d_backward_data(gpu(gy), gpu(W), x.shape, stride, padding, g)
    gx_ref = fconv.conv2d_backward_data_reference(gy64, W64, x.shape, stride, padding, g)
    assert_close(gx, gx_ref, 1e-4, scaled(gx_ref), f"{case} backward data")
    gW = ck.conv2d_backward_weight(gpu(gy), gpu(x), W.shape, stride, padding, g)
    gW_ref = fconv.conv2d_backward_weight_reference(gy64, x64, W.shape, stride, padding, g)
    assert_close(gW, gW_ref, 1e-4, scaled(gW_ref, 1e-4), f"{case} backward weight")


@pytest.mark.parametrize("case", RESNEXT_CONVS + AWKWARD_CONVS,
                         ids=lambda c: "x".join(map(str, c[:8])))
def test_conv_kernels(case):
    _conv_check(case)


@pytest.mark.parametrize("threads", [64, 128, 256])
def test_conv_kernels_at_every_block_size(threads, monkeypatch):
    monkeypatch.setitem(ck.LAUNCH, "CONV_THREADS", threads)
    monkeypatch.setitem(ck.LAUNCH, "WGRAD_THREADS", threads)
    _conv_check((2, 64, 13, 11, 64, 8, 3, 3, 2, 1))
    _conv_check((2, 256, 9, 9, 256, 32, 3, 3, 1, 1))


@pytest.mark.parametrize("shape", [(4, 256, 56, 56), (4, 2048, 7, 7), (4, 64, 112, 112),
                                   (3, 5, 7, 9), (2, 70, 3, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_batch_norm_kernels(shape, relu):
    rng = numpy.random.default_rng(1)
    c = shape[1]
    x = (rng.standard_normal(shape) * 2 + 3).astype(numpy.float32)
    gamma, beta = (rng.standard_normal(c).astype(numpy.float32) for _ in range(2))
    gy = rng.standard_normal(shape).astype(numpy.float32)
    x64, gy64 = x.astype(numpy.float64), gy.astype(numpy.float64)
    y, mean, var = ck.batch_norm_train_forward(gpu(x), gpu(gamma), gpu(beta), 1e-5, relu)
    refs = fnorm.batch_norm_train_forward_reference(x64, gamma, beta, 1e-5, relu)
    for got, ref, name in zip((y, mean, var), refs, ("y", "mean", "var")):
        assert_close(got, ref, 1e-4, 1e-4, f"train forward {name}")
    invstd = (1 / numpy.sqrt(host(var).astype(numpy.float64) + 1e-5)).astype(numpy.float32)
    got = ck.batch_norm_backward(gpu(gy), gpu(x), y, gpu(gamma), mean, gpu(invstd), relu)
    refs = fnorm.batch_norm_backward_reference(gy64, x64, host(y).astype(numpy.float64), gamma,
                                               host(mean), invstd, relu)
    for g, ref, name in zip(got, refs, ("gx", "ggamma", "gbeta")):
        assert_close(g, ref, 1e-3, scaled(ref, 1e-4), f"train backward {name}")
    rmean = rng.standard_normal(c).astype(numpy.float32)
    rvar = (rng.random(c) + 0.5).astype(numpy.float32)
    yi = ck.batch_norm_infer_forward(gpu(x), gpu(gamma), gpu(beta), gpu(rmean), gpu(rvar), 1e-5,
                                     relu)
    yi_ref = fnorm.batch_norm_infer_forward_reference(x64, gamma, beta, rmean, rvar, 1e-5, relu)
    assert_close(yi, yi_ref, 1e-4, 1e-4, "inference forward")
    got = ck.batch_norm_infer_backward(gpu(gy), gpu(x), yi, gpu(gamma), gpu(rmean), gpu(rvar),
                                       1e-5, relu)
    refs = fnorm.batch_norm_infer_backward_reference(gy64, x64, yi_ref, gamma, rmean, rvar, 1e-5,
                                                     relu)
    for g, ref, name in zip(got, refs, ("gx", "ggamma", "gbeta")):
        assert_close(g, ref, 1e-3, scaled(ref, 1e-4), f"inference backward {name}")


def test_running_statistics_kernel():
    rng = numpy.random.default_rng(2)
    rm, rv, mean, var = (rng.random(300).astype(numpy.float32) for _ in range(4))
    rm_ref, rv_ref = 0.9 * rm + 0.1 * mean, 0.9 * rv + 0.1 * var * 1000 / 999
    rm_g, rv_g = gpu(rm), gpu(rv)
    ck.batch_norm_update_running(rm_g, rv_g, gpu(mean), gpu(var), 1000, 0.1)
    assert_close(rm_g, rm_ref, 1e-6, 1e-7, "running mean")
    assert_close(rv_g, rv_ref, 1e-6, 1e-7, "running var")


def test_sgd_kernel():
    rng = numpy.random.default_rng(3)
    sizes = (600_000, 1_000, 400_001)
    n = sum(sizes)
    p, g = (rng.standard_normal(n).astype(numpy.float32) for _ in range(2))
    buf = rng.standard_normal(n).astype(numpy.float32)
    hyper = [(0.4, 1e-4, 0.9), (0.4, 0.0, 0.9), (0.1, 1e-3, 0.0)]
    ends = numpy.cumsum(sizes).astype(numpy.int64)
    p_g, buf_g = gpu(p), gpu(buf)
    lrs, wds, moms = (gpu(numpy.array([h[i] for h in hyper], numpy.float32)) for i in range(3))
    ck.sgd_momentum_update(p_g, gpu(g), buf_g, gpu(ends), lrs, wds, moms)
    for (lr, wd, mom), a, b in zip(hyper, numpy.concatenate([[0], ends[:-1]]), ends):
        sgd_module.sgd_update_reference(p[a:b], g[a:b], buf[a:b], lr, mom, wd)
    assert_close(p_g, p, 1e-6, 1e-6, "parameters")
    assert_close(buf_g, buf, 1e-6, 1e-6, "momentum")


def test_max_pool_kernels():
    rng = numpy.random.default_rng(4)
    x = rng.integers(0, 50, size=(4, 64, 112, 112)).astype(numpy.float32)  # with ties
    op = functions_pool.MaxPool2d(3, 2, 1)
    y_ref = op.forward(x)
    y, argmax = ck.max_pool2d_forward(gpu(x), 3, 2, 1)
    numpy.testing.assert_array_equal(host(y), y_ref)
    gy = rng.standard_normal(y_ref.shape).astype(numpy.float32)
    (gx_ref,) = op.backward(gy)
    assert_close(ck.max_pool2d_backward(gpu(gy), argmax, x.shape, 3, 2, 1), gx_ref, 1e-6, 1e-6,
                 "max pool backward")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_cross_entropy_kernels(smoothing):
    rng = numpy.random.default_rng(5)
    logits = (rng.standard_normal((128, 1000)) * 5).astype(numpy.float32)
    labels = rng.integers(0, 1000, 128)
    op = functions_loss.CrossEntropy(labels, smoothing, "none")
    loss_ref = op.forward(logits.astype(numpy.float64))
    loss, lse = ck.softmax_cross_entropy_forward(gpu(logits), gpu(labels), smoothing)
    assert_close(loss, loss_ref, 1e-5, 1e-5, "loss")
    gloss = numpy.full(128, 1 / 128, numpy.float32)
    (g_ref,) = op.backward(gloss.astype(numpy.float64))
    g = ck.softmax_cross_entropy_backward(gpu(logits), gpu(labels), lse, gpu(gloss), smoothing)
    assert_close(g, g_ref, 1e-5, 1e-8, "logit gradient")


def test_add_relu_kernels():
    rng = numpy.random.default_rng(6)
    a, b, gy = (rng.standard_normal((4, 256, 56, 56)).astype(numpy.float32) for _ in range(3))
    y = ck.add_relu_forward(gpu(a), gpu(b))
    numpy.testing.assert_array_equal(host(y), numpy.maximum(a + b, 0))
    numpy.testing.assert_array_equal(host(ck.relu_backward(gpu(gy), y)), gy * (a + b > 0))


# --------------------------------------------------------------------------
# 2. and 3. The whole model
# --------------------------------------------------------------------------
@pytest.fixture
def wired(monkeypatch):
    """The ops and the optimizer on our kernels (as the backend wires them)."""
    for module in (fconv, fnorm, sgd_module):
        monkeypatch.setattr(module, "gpu_impl", ck)


def _run_model(model, xp, x, labels, dtype):
    import minitorch_gx as mt
    from minitorch_gx.functional import cross_entropy
    model.train()
    model.zero_grad()
    logits = model(mt.Tensor(xp.asarray(x, dtype=dtype)))
    loss = cross_entropy(logits, xp.asarray(labels), label_smoothing=0.1)
    loss.backward()
    grads = {name: host(p.grad) for name, p in model.named_parameters()}
    buffers = {name: host(b) for name, b in model.named_buffers()}
    return host(logits.data), float(host(loss.data)), grads, buffers


def _relative(a, b):
    return float(numpy.linalg.norm(a - b) / max(numpy.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("dtype,rtol", [(numpy.float64, 1e-8), (numpy.float32, 5e-3)],
                         ids=["float64", "float32"])
def test_resnext50_forward_backward_matches_numpy(dtype, rtol, wired):
    from resnext.model import resnext50_32x4d
    rng = numpy.random.default_rng(7)
    x = rng.standard_normal((2, 3, 112, 112))
    labels = rng.integers(0, 1000, 2)
    cpu_model = resnext50_32x4d(seed=0, zero_init_residual=False).to(dtype)
    gpu_model = resnext50_32x4d(seed=0, zero_init_residual=False).to(dtype).to("gpu")
    logits_c, loss_c, grads_c, bufs_c = _run_model(cpu_model, numpy, x, labels, dtype)
    logits_g, loss_g, grads_g, bufs_g = _run_model(gpu_model, cupy, x, labels, dtype)
    assert _relative(logits_g, logits_c) < rtol, "logits differ"
    assert abs(loss_g - loss_c) <= rtol * abs(loss_c), (loss_g, loss_c)
    worst = max(grads_c, key=lambda k: _relative(grads_g[k], grads_c[k]))
    assert _relative(grads_g[worst], grads_c[worst]) < rtol * 10, \
        f"gradient of {worst}: relative error {_relative(grads_g[worst], grads_c[worst]):.3g}"
    for name in bufs_c:
        assert _relative(bufs_g[name], bufs_c[name]) < rtol, f"buffer {name}"


def test_training_steps_match_numpy(wired):
    from minitorch_gx.optim import SGD
    from resnext.model import resnext50_32x4d
    from resnext.trainer import param_groups
    rng = numpy.random.default_rng(8)
    x, labels = rng.standard_normal((4, 3, 64, 64)), rng.integers(0, 10, 4)
    losses, params = {}, {}
    for device, xp in (("cpu", numpy), ("gpu", cupy)):
        model = resnext50_32x4d(num_classes=10, seed=0).to(numpy.float64)
        if device == "gpu":
            model.to("gpu")
        opt = SGD(param_groups(model, 1e-4), lr=0.1, momentum=0.9)
        losses[device] = []
        for _ in range(3):
            losses[device].append(_run_model(model, xp, x, labels, numpy.float64)[1])
            opt.step()
        params[device] = {n: host(p.data) for n, p in model.named_parameters()}
    numpy.testing.assert_allclose(losses["gpu"], losses["cpu"], rtol=1e-8)
    for name in params["cpu"]:
        assert _relative(params["gpu"][name], params["cpu"][name]) < 1e-8, name


def test_short_training_run_reduces_the_loss(wired):
    from minitorch_gx.optim import SGD
    from resnext.model import resnext50_32x4d
    from resnext.trainer import param_groups
    rng = numpy.random.default_rng(9)
    x = rng.standard_normal((16, 3, 64, 64)).astype(numpy.float32)
    labels = rng.integers(0, 10, 16)
    model = resnext50_32x4d(num_classes=10, seed=0).to("gpu")
    opt = SGD(param_groups(model, 1e-4), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        losses.append(_run_model(model, cupy, x, labels, numpy.float32)[1])
        opt.step()
    assert numpy.isfinite(losses).all(), losses
    assert losses[-1] < 0.7 * losses[0], f"loss did not fall on a fixed batch: {losses}"
