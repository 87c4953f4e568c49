"""The ops' GPU path, wired end to end, on the CPU: under
``backend.emulate_kernels()`` conv, batch norm, max pool, cross-entropy and
SGD call their CUDA launchers, whose kernels run on the emulator. Results must
equal the NumPy fast path. This checks what the per-kernel tests cannot: that
each op passes the right arrays, shapes and saved state to its launcher."""
import numpy
import pytest

import minitorch_gx as mt
from minitorch_gx import backend
from minitorch_gx import functional as F
from minitorch_gx.optim import SGD
from resnext.model import ResNeXt
from resnext.trainer import param_groups

pytestmark = pytest.mark.skipif(not __import__("shutil").which("g++"),
                                reason="the emulator needs g++")


def both_paths(fn, *arrays):
    """fn(*tensors) -> (output, grads) on the fast path and through the kernels."""
    results = []
    for emulate in (False, True):
        tensors = [mt.Tensor(a.copy(), requires_grad=True) for a in arrays]
        if emulate:
            with backend.emulate_kernels():
                y = fn(*tensors)
                y.backward(numpy.random.default_rng(9).standard_normal(y.shape).astype(y.dtype))
        else:
            y = fn(*tensors)
            y.backward(numpy.random.default_rng(9).standard_normal(y.shape).astype(y.dtype))
        results.append((y.data, [t.grad for t in tensors]))
    return results


def assert_close(a, b, tol=2e-5):
    scale = max(1.0, float(numpy.abs(a).max()))
    numpy.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("stride,groups", [(1, 4), (2, 4), (2, 1)])
def test_conv2d_through_the_kernels(stride, groups):
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((2, 8, 9, 7)).astype(numpy.float32)
    W = rng.standard_normal((8, 8 // groups, 3, 3)).astype(numpy.float32)
    (y0, g0), (y1, g1) = both_paths(lambda a, w: F.conv2d(a, w, None, stride, 1, groups), x, W)
    assert_close(y0, y1)
    for a, b in zip(g0, g1):
        assert_close(a, b)


@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_through_the_kernels(relu):
    rng = numpy.random.default_rng(1)
    x = rng.standard_normal((3, 5, 7, 6)).astype(numpy.float32) * 3 + 1
    gamma, beta = rng.uniform(0.5, 1.5, 5).astype(numpy.float32), rng.standard_normal(5).astype(numpy.float32)
    stats = []

    def fn(a, g, b):
        rm, rv = numpy.zeros(5, numpy.float32), numpy.ones(5, numpy.float32)
        stats.append((rm, rv))
        return F.batch_norm(a, rm, rv, g, b, training=True, relu=relu)

    (y0, g0), (y1, g1) = both_paths(fn, x, gamma, beta)
    assert_close(y0, y1)
    for a, b in zip(g0, g1):
        assert_close(a, b, 1e-4)
    for a, b in zip(stats[0], stats[1]):   # running statistics updated alike
        assert_close(a, b)


def test_max_pool_and_cross_entropy_through_the_kernels():
    rng = numpy.random.default_rng(2)
    x = rng.standard_normal((2, 3, 9, 8)).astype(numpy.float32)
    (y0, g0), (y1, g1) = both_paths(lambda a: F.max_pool2d(a, 3, 2, 1), x)
    assert_close(y0, y1)
    assert_close(g0[0], g1[0])
    logits = rng.standard_normal((5, 7)).astype(numpy.float32)
    labels = numpy.array([0, 6, 3, 3, 1])
    (l0, g0), (l1, g1) = both_paths(lambda z: F.cross_entropy(z, labels, label_smoothing=0.1),
                                    logits)
    assert_close(l0, l1)
    assert_close(g0[0], g1[0])


def test_a_training_step_of_a_small_resnext_through_the_kernels():
    # float64: with two images, the last stage's batch norm sees a handful of
    # values per channel and would amplify float32 rounding past any tolerance
    rng = numpy.random.default_rng(3)
    x = rng.standard_normal((2, 3, 40, 40))
    labels = numpy.array([1, 3])
    weights = []
    for emulate in (False, True):
        net = ResNeXt((1, 1, 1, 1), groups=4, width_per_group=2, num_classes=4, base_planes=8,
                      zero_init_residual=False, seed=0).to(numpy.float64)
        opt = SGD(param_groups(net, 1e-4), lr=0.1, momentum=0.9)
        ctx = backend.emulate_kernels() if emulate else backend.implementation("fast")
        with ctx:
            for _ in range(2):
                opt.zero_grad()
                F.cross_entropy(net(mt.Tensor(x)), labels, label_smoothing=0.1).backward()
                opt.step()
        weights.append(net.state_dict())
    for name, value in weights[0].items():
        assert_close(value, weights[1][name], 1e-9)
