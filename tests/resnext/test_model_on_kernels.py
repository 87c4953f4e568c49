"""Whole ResNeXt models on this project's CUDA kernels.

1. On the CPU: under ``backend.emulate_kernels()`` every op of a small ResNeXt
   and the SGD step call their launchers (minitorch_gx/cuda/), whose kernels
   run on the emulator; two training steps equal the NumPy fast path.
2. On a GPU (skipped without one): a whole resnext50_32x4d forward and
   backward on CuPy arrays against the NumPy backend: logits, loss, every
   parameter gradient, the running statistics.
3. Training on a GPU: a few SGD steps equal the same steps on the CPU, and a
   short run on a fixed batch brings the loss down.
On CuPy arrays the ops pick the kernels themselves (``backend.choose``); the
``kernels_used`` fixture counts the launcher calls, so each test also checks
that the kernels, not a generic CuPy path, did the work.
benchmarks/gpu_check.py runs this file on the lent GPU machine.
"""
import collections
import functools
import inspect

import numpy
import pytest

import minitorch_gx as mt
from minitorch_gx import backend
from minitorch_gx import functional as F
from minitorch_gx.backend import cupy
from minitorch_gx.cuda import conv as cuda_conv
from minitorch_gx.cuda import elementwise as cuda_elementwise
from minitorch_gx.cuda import loss as cuda_loss
from minitorch_gx.cuda import norm as cuda_norm
from minitorch_gx.cuda import pool as cuda_pool
from minitorch_gx.cuda import sgd as cuda_sgd
from minitorch_gx.optim import SGD
from resnext.model import ResNeXt, resnext50_32x4d
from resnext.trainer import param_groups
from tests.backends import assert_close, needs_emulator, needs_gpu, scaled

LAUNCHER_MODULES = (cuda_conv, cuda_norm, cuda_pool, cuda_loss, cuda_elementwise, cuda_sgd)
# what one training-mode forward and backward of a ResNeXt launches
FORWARD_BACKWARD = {"conv.conv2d_forward", "conv.conv2d_backward_data",
                    "conv.conv2d_backward_weight", "norm.batch_norm_train_forward",
                    "norm.batch_norm_backward", "pool.max_pool2d_forward",
                    "pool.max_pool2d_backward", "loss.softmax_cross_entropy_forward",
                    "loss.softmax_cross_entropy_backward", "elementwise.add_relu_forward",
                    "elementwise.relu_backward"}
TRAINING_STEP = FORWARD_BACKWARD | {"sgd.sgd_momentum_update"}


@pytest.fixture
def kernels_used(monkeypatch):
    """A Counter of launcher calls, "module.function" (e.g. "conv.conv2d_forward"),
    for every public launcher of minitorch_gx/cuda/ while the test runs."""
    calls = collections.Counter()

    def counting(fn, name):
        @functools.wraps(fn)
        def launcher(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return launcher

    for module in LAUNCHER_MODULES:
        short = module.__name__.rsplit(".", 1)[1]
        for name, fn in list(vars(module).items()):
            if (inspect.isfunction(fn) and fn.__module__ == module.__name__
                    and not name.startswith("_")):
                monkeypatch.setattr(module, name, counting(fn, f"{short}.{name}"))
    return calls


def assert_launched(calls, expected):
    missing = sorted(expected - set(calls))
    assert not missing, f"these launchers were never called: {missing} (called: {dict(calls)})"


# --------------------------------------------------------------------------
# 1. A small ResNeXt through the kernels, on the CPU emulator
# --------------------------------------------------------------------------
@needs_emulator
def test_a_training_step_of_a_small_resnext_through_the_kernels(kernels_used):
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
        if not emulate:
            assert not kernels_used, f"the fast path called launchers: {dict(kernels_used)}"
    assert_launched(kernels_used, TRAINING_STEP)
    for name, value in weights[0].items():
        assert_close(value, weights[1][name], rtol=1e-9, atol=scaled(value, 1e-9), what=name)


# --------------------------------------------------------------------------
# 2. and 3. resnext50_32x4d on a GPU
# --------------------------------------------------------------------------
def _run_model(model, xp, x, labels, dtype):
    model.train()
    model.zero_grad()
    logits = model(mt.Tensor(xp.asarray(x, dtype=dtype)))
    loss = F.cross_entropy(logits, xp.asarray(labels), label_smoothing=0.1)
    loss.backward()
    grads = {name: backend.to_numpy(p.grad) for name, p in model.named_parameters()}
    buffers = {name: backend.to_numpy(b) for name, b in model.named_buffers()}
    return backend.to_numpy(logits.data), float(backend.to_numpy(loss.data)), grads, buffers


def _relative(a, b):
    return float(numpy.linalg.norm(a - b) / max(numpy.linalg.norm(b), 1e-30))


@needs_gpu
@pytest.mark.parametrize("dtype,rtol", [(numpy.float64, 1e-8), (numpy.float32, 5e-3)],
                         ids=["float64", "float32"])
def test_resnext50_forward_backward_matches_numpy(dtype, rtol, kernels_used):
    rng = numpy.random.default_rng(7)
    x = rng.standard_normal((2, 3, 112, 112))
    labels = rng.integers(0, 1000, 2)
    cpu_model = resnext50_32x4d(seed=0, zero_init_residual=False).to(dtype)
    gpu_model = resnext50_32x4d(seed=0, zero_init_residual=False).to(dtype).to("gpu")
    logits_c, loss_c, grads_c, bufs_c = _run_model(cpu_model, numpy, x, labels, dtype)
    assert not kernels_used, f"the NumPy run called launchers: {dict(kernels_used)}"
    logits_g, loss_g, grads_g, bufs_g = _run_model(gpu_model, cupy, x, labels, dtype)
    assert_launched(kernels_used, FORWARD_BACKWARD)
    assert _relative(logits_g, logits_c) < rtol, "logits differ"
    assert abs(loss_g - loss_c) <= rtol * abs(loss_c), (loss_g, loss_c)
    worst = max(grads_c, key=lambda k: _relative(grads_g[k], grads_c[k]))
    assert _relative(grads_g[worst], grads_c[worst]) < rtol * 10, \
        f"gradient of {worst}: relative error {_relative(grads_g[worst], grads_c[worst]):.3g}"
    for name in bufs_c:
        assert _relative(bufs_g[name], bufs_c[name]) < rtol, f"buffer {name}"


@needs_gpu
def test_training_steps_match_numpy(kernels_used):
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
        params[device] = {n: backend.to_numpy(p.data) for n, p in model.named_parameters()}
        if device == "cpu":
            assert not kernels_used, f"the NumPy run called launchers: {dict(kernels_used)}"
    assert_launched(kernels_used, TRAINING_STEP)
    numpy.testing.assert_allclose(losses["gpu"], losses["cpu"], rtol=1e-8)
    for name in params["cpu"]:
        assert _relative(params["gpu"][name], params["cpu"][name]) < 1e-8, name


@needs_gpu
def test_short_training_run_reduces_the_loss(kernels_used):
    rng = numpy.random.default_rng(9)
    x = rng.standard_normal((16, 3, 64, 64)).astype(numpy.float32)
    labels = rng.integers(0, 10, 16)
    model = resnext50_32x4d(num_classes=10, seed=0).to("gpu")
    opt = SGD(param_groups(model, 1e-4), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        losses.append(_run_model(model, cupy, x, labels, numpy.float32)[1])
        opt.step()
    assert_launched(kernels_used, TRAINING_STEP)
    assert numpy.isfinite(losses).all(), losses
    assert losses[-1] < 0.7 * losses[0], f"loss did not fall on a fixed batch: {losses}"
