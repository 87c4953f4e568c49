"""The kernels that took the last generic CuPy operations out of a GPU
training step (issue 11): the strided 1x1 convolution's pixel gather and
scatter, the global average pool, the classifier's bias, the loss mean, and
the memset that zeroes the gradients. Each is checked against NumPy on the
emulator (and on a GPU when there is one), in NCHW and CNHW memory, under
every thread schedule; then the trace of a whole step shows no generic CuPy
operation left in it.
"""
import numpy as np
import pytest

import minitorch_gx as mt
from minitorch_gx import backend, functional as F
from minitorch_gx.cuda import device as cuda_device, linear as cuda_linear, loss as cuda_loss
from minitorch_gx.cuda import pool as cuda_pool, subsample, trace
from tests.backends import KERNEL_IMPLEMENTATIONS, host, launch_shapes, needs_emulator, run_on
from tests.backends import same_bits_under_every_schedule


def _cnhw(dev, a):
    """a (N, C, H, W) as a logical NCHW view of CNHW memory on dev."""
    return dev(np.ascontiguousarray(a.transpose(1, 0, 2, 3))).transpose(1, 0, 2, 3)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("shape, stride", [((2, 3, 8, 8), (2, 2)), ((3, 2, 7, 9), (2, 3)),
                                           ((1, 5, 5, 1), (3, 1)), ((2, 2, 1, 33), (1, 2))])
@pytest.mark.parametrize("layout", ["nchw", "cnhw"])
def test_gather_and_scatter_equal_strided_slicing(impl, shape, stride, layout):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    sh, sw = stride
    expected = x[:, :, ::sh, ::sw]
    g = rng.standard_normal(expected.shape).astype(np.float32)
    scattered = np.zeros_like(x)
    scattered[:, :, ::sh, ::sw] = g
    with run_on(impl) as dev:
        put = (lambda a: _cnhw(dev, a)) if layout == "cnhw" else dev
        xs = subsample.gather_pixels(put(x), stride)
        gx = subsample.scatter_pixels(put(g), shape, stride)
        distinct = shape[0] > 1 and shape[1] > 1  # else CNHW memory is NCHW memory too
        assert cuda_device.is_cnhw(xs) == cuda_device.is_cnhw(gx) == (layout == "cnhw" and distinct)
    assert np.array_equal(host(xs), expected)
    assert np.array_equal(host(gx), scattered)  # every other element exactly 0


@needs_emulator
def test_gather_and_scatter_cover_every_row_with_few_warps_and_any_schedule():
    x = np.arange(2 * 3 * 9 * 10, dtype=np.float32).reshape(2, 3, 9, 10)
    with backend.emulate_kernels(), launch_shapes(EW_THREADS=32):
        same_bits_under_every_schedule(
            lambda: [subsample.gather_pixels(x, (2, 2)),
                     subsample.scatter_pixels(x[:, :, ::2, ::2].copy(), x.shape, (2, 2))],
            "subsample.cu")


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("shape, stride", [((2, 3, 8, 8), (2, 2)), ((3, 2, 7, 9), (2, 3))])
@pytest.mark.parametrize("layout", ["nchw", "cnhw"])
def test_add_scattered_equals_a_plus_the_scatter(impl, shape, stride, layout):
    rng = np.random.default_rng(6)
    a = rng.standard_normal(shape).astype(np.float32)
    sh, sw = stride
    g = rng.standard_normal(a[:, :, ::sh, ::sw].shape).astype(np.float32)
    expected = a.copy()
    expected[:, :, ::sh, ::sw] += g
    with run_on(impl) as dev:
        put = (lambda v: _cnhw(dev, v)) if layout == "cnhw" else dev
        out = subsample.add_scattered(put(a), dev(g), stride)  # g NCHW: brought to a's layout
        assert cuda_device.is_cnhw(out) == (layout == "cnhw")
    assert np.array_equal(host(out), expected)


def _downsample_block(x, W1, Wd):
    """x feeds a stride-1 1x1 conv and a strided one, joined: a ResNeXt
    block's input and its two consumers."""
    a = F.conv2d(x, W1)
    b = F.conv2d(x, Wd, stride=2)
    return (F.conv2d(a, Wd, stride=2) + b).sum()


@pytest.mark.parametrize("impl", ["fast", pytest.param("emulated", marks=needs_emulator)])
@pytest.mark.parametrize("layout", ["nchw", "cnhw"])
def test_a_strided_gradient_joins_the_other_one_exactly(impl, layout):
    """The strided 1x1 conv's input gradient travels as gxs and is added to
    the other gradient of its input in one pass: the result equals the
    reference engine's dense scatter + add."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4, 6, 6))
    W1, Wd = rng.standard_normal((4, 4, 1, 1)), rng.standard_normal((5, 4, 1, 1))
    with run_on("reference"):
        xr = mt.Tensor(x.copy(), requires_grad=True)
        _downsample_block(xr, mt.Tensor(W1), mt.Tensor(Wd)).backward()
    with run_on(impl) as dev:
        xv = _cnhw(dev, x) if layout == "cnhw" else dev(x)
        xt = mt.Tensor(xv, requires_grad=True)
        _downsample_block(xt, mt.Tensor(dev(W1)), mt.Tensor(dev(Wd))).backward()
    np.testing.assert_allclose(host(xt.grad), host(xr.grad), rtol=1e-12, atol=1e-12)


@needs_emulator
def test_scatter_rejects_a_gradient_of_the_wrong_shape():
    with backend.emulate_kernels(), pytest.raises(ValueError, match="does not match"):
        subsample.scatter_pixels(np.zeros((1, 1, 3, 3), np.float32), (1, 1, 8, 8), (2, 2))


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("layout", ["nchw", "cnhw"])
@pytest.mark.parametrize("shape, dtype", [((3, 5, 7, 7), np.float32), ((2, 3, 1, 70), np.float64),
                                          ((1, 1, 2, 2), np.float32)])
def test_global_average_pool_equals_the_mean_and_spreads_its_gradient(impl, layout, shape, dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(dtype)
    gy = rng.standard_normal(shape[:2] + (1, 1)).astype(dtype)
    with run_on(impl) as dev:
        xt = mt.Tensor(_cnhw(dev, x) if layout == "cnhw" else dev(x), requires_grad=True)
        y = F.adaptive_avg_pool2d(xt, 1)
        y.backward(dev(gy))
        assert y.data.flags.c_contiguous  # the classifier's (N, C) matrix
        # (a leaf's gradient is the engine's copy; the launcher keeps the layout)
        gx = cuda_pool.global_avg_pool_backward(dev(gy), shape, layout == "cnhw")
        assert cuda_device.is_cnhw(gx) == (layout == "cnhw" and min(shape[:2]) > 1)
        np.testing.assert_array_equal(host(gx), host(xt.grad))
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(host(y), x.mean(axis=(2, 3), keepdims=True), rtol=tol, atol=tol)
    np.testing.assert_allclose(host(xt.grad), np.broadcast_to(gy / (shape[2] * shape[3]), shape),
                               rtol=tol, atol=tol)


@needs_emulator
def test_global_average_pool_is_the_same_bits_under_every_schedule():
    x = np.random.default_rng(2).standard_normal((4, 6, 7, 7)).astype(np.float32)
    with backend.emulate_kernels(), launch_shapes(POOL_THREADS=64):
        same_bits_under_every_schedule(
            lambda: [cuda_pool.global_avg_pool_forward(x),
                     cuda_pool.global_avg_pool_backward(x[:, :, :1, :1].copy(), x.shape, False)],
            "avg_pool.cu")


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("n, k", [(5, 7), (3, 300), (1, 1)])
def test_the_classifier_bias_kernels_equal_numpy(impl, n, k):
    rng = np.random.default_rng(3)
    x, W = rng.standard_normal((n, 4)), rng.standard_normal((k, 4))
    b, gy = rng.standard_normal(k), rng.standard_normal((n, k))
    with run_on(impl) as dev:
        xt, Wt, bt = (mt.Tensor(dev(v), requires_grad=True) for v in (x, W, b))
        y = F.linear(xt, Wt, bt)
        y.backward(dev(gy))
        into = dev(np.full(k, 5.0))
        same = cuda_linear.sum_columns(dev(gy), out=into, scale=0.5)
    np.testing.assert_allclose(host(y), x @ W.T + b, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(host(bt.grad), gy.sum(axis=0), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(host(same), 0.5 * gy.sum(axis=0), rtol=1e-13, atol=1e-13)
    if impl == "emulated":
        assert same is into  # written into the array given, not a new one


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("n", [1, 37, 600])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_loss_reduction_kernel_equals_numpy(impl, n, reduction):
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((n, 10))
    labels = rng.integers(0, 10, n)
    with run_on("reference"):
        expected = F.cross_entropy(mt.Tensor(logits), labels, 0.1, reduction).data
    with run_on(impl) as dev:
        loss = F.cross_entropy(mt.Tensor(dev(logits)), labels, 0.1, reduction).data
        assert loss.shape == ()
    np.testing.assert_allclose(host(loss), expected, rtol=1e-13)


@needs_emulator
def test_the_loss_mean_is_the_same_bits_under_every_schedule():
    loss = np.random.default_rng(5).standard_normal(1000).astype(np.float32)
    with backend.emulate_kernels(), launch_shapes(XENT_THREADS=64):
        same_bits_under_every_schedule(lambda: [cuda_loss.mean_loss(loss, 1e-3)], "loss mean")


@needs_emulator
def test_zero_grad_zeroes_the_flat_gradient_on_the_kernel_path():
    from minitorch_gx.optim import SGD
    p = mt.Tensor(np.ones(5), requires_grad=True)
    opt = SGD([p], lr=0.1)
    with backend.emulate_kernels():
        (p * 3.0).sum().backward()
        assert host(p.grad).tolist() == [3.0] * 5
        opt.zero_grad()
    assert host(p.grad).tolist() == [0.0] * 5 and p.grad_is_zero


def test_a_traced_training_step_runs_no_generic_cupy_operation():
    """Issue 11's first item: our kernels, cuBLAS, memsets and the batch's
    transfers only. (The first step makes the batch-norm counters and the
    seed gradient once; the second is the steady state.)"""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import gpu_step
    launches = gpu_step.trace_step("resnext_mini", 2, 32, num_classes=10)
    generic = sorted({x.name for x in launches if x.kind == "cupy"})
    assert generic == [], f"generic CuPy operations in the step: {generic}"
    names = [x.name for x in launches]
    # the strided convs' input gradients join the other gradient in one pass
    assert "scatter_pixels" not in names
    assert names.count("add_scattered") == names.count("gather_pixels") > 0
    assert {x.kind for x in launches} <= {"kernel", "gemm", "memset", "h2d"}


def test_the_seed_gradient_is_made_once_per_dtype_on_a_gpu():
    with trace.fake_gpu(record=False):
        x = mt.Tensor(trace.to_gpu(np.ones(3, np.float32)), requires_grad=True)
        (x * 2.0).sum().backward()
    with trace.fake_gpu() as launches:
        (x * 2.0).sum().backward()
        (x * 3.0).sum().backward()
    assert "ones" not in [launch.name for launch in launches]
    assert host(x.grad).tolist() == [7.0, 7.0, 7.0]  # 2, then + 2 and + 3: a seed of 1 each time
