"""Batch norm (minitorch_gx.ops.norm), every check of the op in one place:

1. forward against per-channel loops (training and eval), backward against
   the textbook formula written per channel, and PyTorch, on every
   implementation;
2. float64 gradients by finite differences (fast and reference paths);
3. the NumPy fast path == the reference;
4. the running statistics, updated inside ``batch_norm_train_forward`` (on
   the kernel path by the last block of each channel of bn_fwd_reduce),
   against PyTorch's formula and ``update_running_reference``, on every
   implementation;
5. the CUDA kernels (launchers of minitorch_gx.cuda.norm) against the
   reference, through the CPU emulator (every check on, under every schedule)
   and on a GPU when there is one, at several block sizes, in float32 and
   float64, on planes with and without whole 16-byte vectors; float32
   statistics far from zero (mean 1e4, and mean 1000 with std 0.01); the
   backward's recomputed ReLU mask is exactly the forward's; the per-channel
   arrival counts are back at zero after every launch, also after a failed
   one; the 16-byte path runs where the layout allows;
6. op-level wiring: batch_norm through the kernels (``run_on("emulated")`` /
   CuPy) equals the fast path, saved state and running statistics included,
   and ``backend.choose`` never sends NumPy arrays to a launcher outside
   ``emulate_kernels()``;
7. ggamma and gbeta written into the optimizer's own arrays
   (``Function.grad_buffer``) on every implementation; a training batch norm
   on the GPU path is four kernel launches and nothing else (traced);
8. argument checks.

``batch_norm_train_forward`` returns (y, mean, invstd), invstd = 1 / sqrt(biased
var + eps); the tests recover var = 1 / invstd^2 - eps where the old ones checked var.
"""
import numpy as np
import pytest

import minitorch_gx as mt
from minitorch_gx import backend
from minitorch_gx.cuda import device as cuda_device, emulator, norm as cuda_norm
from minitorch_gx.ops import norm
from minitorch_gx.ops.norm import batch_norm
from tests.backends import (IMPLEMENTATIONS, KERNEL_IMPLEMENTATIONS, assert_close, host,
                            launch_shapes, needs_emulator, needs_gpu, run_on,
                            same_bits_under_every_schedule, scaled)

KERNEL_FILES = ("batch_norm.cu",)  # emulator builds: tests/ops/conftest.py
BLOCK_SIZES = {"default": {}, "128-threads": {"BN_THREADS": 128},
               "64-threads": {"BN_THREADS": 64}}
KERNELS = ("emulated", "cupy")


SHAPES = [(1, 2, 3, 5), (3, 2, 5, 3), (2, 3, 1, 1), (3, 1, 4, 7)]


def naive_stats(x):
    """Per-channel mean and biased variance, one channel at a time."""
    c = x.shape[1]
    mean, var = np.zeros(c), np.zeros(c)
    for ch in range(c):
        v = x[:, ch].astype(np.float64).ravel()
        mean[ch] = sum(v) / len(v)
        var[ch] = sum((a - mean[ch]) ** 2 for a in v) / len(v)
    return mean, var


def naive_bn(x, mean, var, gamma, beta, eps, relu):
    y = np.empty(x.shape)
    for ch in range(x.shape[1]):
        y[:, ch] = gamma[ch] * (x[:, ch] - mean[ch]) / np.sqrt(var[ch] + eps) + beta[ch]
    return np.maximum(y, 0) if relu else y


def make(shape, rng, dtype=np.float64, offset=0.5):
    c = shape[1]
    x = (rng.standard_normal(shape) * 1.7 + offset).astype(dtype)
    gamma = (rng.standard_normal(c) + 1).astype(dtype)
    beta = rng.standard_normal(c).astype(dtype)
    return x, gamma, beta


def var_of(invstd, eps):
    """The biased batch variance behind invstd = 1 / sqrt(var + eps), in float64."""
    return 1 / host(invstd).astype(np.float64) ** 2 - eps


# ==========================================================================
# 1. Per-channel loops, the textbook backward, PyTorch
# ==========================================================================
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [False, True])
def test_train_forward_matches_naive(impl, shape, relu):
    rng = np.random.default_rng(1)
    x, gamma, beta = make(shape, rng)
    with run_on(impl) as dev:
        y, mean, invstd = norm.batch_norm_train_forward(dev(x), dev(gamma), dev(beta), 1e-5, relu)
    m, v = naive_stats(x)
    assert_close(mean, m, 1e-12, 1e-12, "mean")
    assert_close(invstd, 1 / np.sqrt(v + 1e-5), 1e-12, 1e-12, "invstd")
    assert_close(var_of(invstd, 1e-5), v, 1e-12, 1e-12, "var")
    assert_close(y, naive_bn(x, m, v, gamma, beta, 1e-5, relu), 1e-10, 1e-12, "y")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [False, True])
def test_eval_forward_matches_naive(impl, shape, relu):
    rng = np.random.default_rng(2)
    x, gamma, beta = make(shape, rng)
    rm, rv = rng.standard_normal(shape[1]), rng.random(shape[1]) + 0.2
    with run_on(impl) as dev:
        y = norm.batch_norm_infer_forward(dev(x), dev(gamma), dev(beta), dev(rm), dev(rv), 1e-3,
                                          relu)
    assert_close(y, naive_bn(x, rm, rv, gamma, beta, 1e-3, relu), 1e-12, 1e-12, "y")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_backward_matches_naive_formula(impl):
    """Training backward against the textbook formula written per channel."""
    rng = np.random.default_rng(5)
    x, gamma, beta = make((3, 2, 3, 4), rng)
    gy = rng.standard_normal(x.shape)
    with run_on(impl) as dev:
        y, mean, invstd = norm.batch_norm_train_forward(dev(x), dev(gamma), dev(beta), 1e-5, False)
        grads = norm.batch_norm_backward(dev(gy), dev(x), dev(gamma), dev(beta), mean, invstd,
                                         False)
    gx, ggamma, gbeta = (host(a) for a in grads)
    mean, invstd = host(mean), host(invstd)
    for ch in range(2):
        xc, g = x[:, ch].ravel(), gy[:, ch].ravel()
        m = len(xc)
        xhat = (xc - mean[ch]) * invstd[ch]
        assert gbeta[ch] == pytest.approx(g.sum())
        assert ggamma[ch] == pytest.approx((g * xhat).sum())
        expect = gamma[ch] * invstd[ch] / m * (m * g - g.sum() - xhat * (g * xhat).sum())
        assert_close(gx[:, ch].ravel(), expect, 1e-10, 1e-12, f"gx of channel {ch}")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_matches_torch(impl):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    x, gamma, beta = make((4, 3, 5, 6), rng)
    gy = rng.standard_normal(x.shape)
    with run_on(impl) as dev:
        rm, rv = dev(np.zeros(3)), dev(np.ones(3))
        xt, gt, bt = (mt.Tensor(dev(a), True) for a in (x, gamma, beta))
        y = batch_norm(xt, rm, rv, gt, bt, training=True, momentum=0.1, relu=True)
        y.backward(dev(gy))
    txs = [torch.tensor(a, requires_grad=True) for a in (x, gamma, beta)]
    trm, trv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    ty = torch.relu(torch.nn.functional.batch_norm(txs[0], trm, trv, txs[1], txs[2],
                                                   training=True))
    ty.backward(torch.tensor(gy))
    assert_close(y.data, ty.detach().numpy(), 1e-10, 1e-12, "y")
    for ours, theirs, name in zip((xt, gt, bt), txs, ("gx", "ggamma", "gbeta")):
        assert_close(ours.grad, theirs.grad.numpy(), 1e-9, 1e-12, name)
    assert_close(rm, trm.numpy(), 1e-12, 0, "running mean")
    assert_close(rv, trv.numpy(), 1e-12, 0, "running var")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_eval_uses_running_statistics_and_leaves_them_alone(impl):
    rng = np.random.default_rng(7)
    x, gamma, beta = make((2, 3, 4, 5), rng)
    rm0, rv0 = rng.standard_normal(3), rng.random(3) + 0.5
    with run_on(impl) as dev:
        rm, rv = dev(rm0), dev(rv0)
        y = batch_norm(dev(x), rm, rv, mt.Tensor(dev(gamma)), mt.Tensor(dev(beta)),
                       training=False, eps=1e-5)
    # atol 0 as before on the host paths; the kernels (y = x * scale + shift,
    # fused multiply-adds on a GPU) may differ by ~1e-16 where y is near 0
    atol = 1e-12 if impl in KERNELS else 0
    assert_close(y.data, naive_bn(x, rm0, rv0, gamma, beta, 1e-5, False), 1e-12, atol, "y")
    np.testing.assert_array_equal(host(rm), rm0)
    np.testing.assert_array_equal(host(rv), rv0)


def test_training_without_running_statistics():
    rng = np.random.default_rng(8)
    x, gamma, beta = make((2, 3, 4, 5), rng)
    y = batch_norm(x, None, None, mt.Tensor(gamma), mt.Tensor(beta), training=True)
    m, v = naive_stats(x)
    np.testing.assert_allclose(y.data, naive_bn(x, m, v, gamma, beta, 1e-5, False), rtol=1e-10)
    with pytest.raises(ValueError, match="eval mode"):
        batch_norm(x, None, None, mt.Tensor(gamma), mt.Tensor(beta), training=False)


def test_parameters_default_to_identity_affine():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 3, 2, 2))
    y = batch_norm(x, None, None, None, None, training=True, eps=0.0)
    m, v = naive_stats(x)
    np.testing.assert_allclose(y.data, naive_bn(x, m, v, np.ones(3), np.zeros(3), 0.0, False),
                               rtol=1e-10)


# ==========================================================================
# 2. Gradients by finite differences (float64)
# ==========================================================================
@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("shape", [(1, 2, 3, 5), (3, 2, 5, 3), (2, 3, 1, 1)])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(impl, shape, relu, training):
    rng = np.random.default_rng(3)
    x, gamma, beta = make(shape, rng)
    x, gamma, beta = (mt.Tensor(a, requires_grad=True) for a in (x, gamma, beta))
    if training:  # no running statistics: gradcheck calls fn many times
        rm = rv = None
    else:
        rm, rv = rng.standard_normal(shape[1]), rng.random(shape[1]) + 0.5

    def fn(x, gamma, beta):
        return batch_norm(x, rm, rv, gamma, beta, training=training, eps=1e-3, relu=relu)

    with run_on(impl):
        mt.gradcheck(fn, [x, gamma, beta], atol=1e-6, rtol=1e-5)


# ==========================================================================
# 3. Fast path == reference
# ==========================================================================
@pytest.mark.parametrize("relu", [False, True])
def test_fast_equals_reference_float32(relu):
    """The two paths agree in float32 on a larger, odd-sized input (running
    statistics included); float32 stays float32."""
    rng = np.random.default_rng(4)
    shape = (5, 7, 9, 11)
    x, gamma, beta = make(shape, rng, np.float32, offset=3.0)
    gy = rng.standard_normal(shape).astype(np.float32)
    rm = rng.standard_normal(7).astype(np.float32)
    rv = (rng.random(7) + 0.5).astype(np.float32)
    results = {}
    for name in ("fast", "reference"):
        with backend.implementation(name):
            rm_new, rv_new = rm.copy(), rv.copy()
            y, mean, invstd = norm.batch_norm_train_forward(x, gamma, beta, 1e-5, relu, rm_new,
                                                            rv_new, 0.1)
            grads = norm.batch_norm_backward(gy, x, gamma, beta, mean, invstd, relu)
            yi = norm.batch_norm_infer_forward(x, gamma, beta, rm, rv, 1e-5, relu)
            gi = norm.batch_norm_infer_backward(gy, x, gamma, beta, rm, rv, 1e-5, relu)
            results[name] = (y, mean, invstd) + grads + (yi,) + gi + (rm_new, rv_new)
    for a, b in zip(results["fast"], results["reference"]):
        assert a.dtype == np.float32 and a.shape == b.shape
        scale = np.abs(b).max()
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * scale)


# ==========================================================================
# 4. Running statistics, updated by batch_norm_train_forward
# ==========================================================================
def pytorch_running_update(running_mean, running_var, x, momentum):
    """PyTorch's rule, in float64: r = (1 - momentum) r + momentum * statistic,
    with the unbiased batch variance."""
    axes = (0, 2, 3)
    x = x.astype(np.float64)
    return ((1 - momentum) * running_mean.astype(np.float64) + momentum * x.mean(axis=axes),
            (1 - momentum) * running_var.astype(np.float64) + momentum * x.var(axis=axes, ddof=1))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_running_statistics_update(impl, momentum):
    """One training step, 300 channels, M = 50 values per channel; the
    kernels (where the last block of each channel updates them) at every block
    size. The update is checked twice: given the step's own batch statistics
    (the update's arithmetic, as tightly as the old test of the separate
    update kernel), and against PyTorch's rule applied to the data (the
    statistics' accuracy too)."""
    rng = np.random.default_rng(2)
    c, m = 300, 50
    x = (rng.standard_normal((2, c, 5, 5)) * 1.5 + rng.standard_normal((1, c, 1, 1))).astype(
        np.float32)
    gamma, beta = np.ones(c, np.float32), np.zeros(c, np.float32)
    rm0 = rng.standard_normal(c).astype(np.float32)
    rv0 = (rng.random(c) + 0.5).astype(np.float32)
    rm_torch, rv_torch = pytorch_running_update(rm0, rv0, x, momentum)
    # update_running_reference (biased var in, unbiased out) is that same rule
    rm64, rv64 = rm0.astype(np.float64), rv0.astype(np.float64)
    x64 = x.astype(np.float64)
    norm.update_running_reference(rm64, rv64, x64.mean(axis=(0, 2, 3)), x64.var(axis=(0, 2, 3)),
                                  m, momentum)
    assert_close(rm64, rm_torch, 1e-14, 1e-15, "update_running_reference mean")
    assert_close(rv64, rv_torch, 1e-14, 1e-15, "update_running_reference var")
    for name, threads in (BLOCK_SIZES.items() if impl in KERNELS else [("default", {})]):
        with launch_shapes(**threads), run_on(impl) as dev:
            rm, rv = dev(rm0), dev(rv0)
            _, mean, invstd = norm.batch_norm_train_forward(dev(x), dev(gamma), dev(beta), 1e-5,
                                                            True, rm, rv, momentum)
        assert rm.dtype == np.float32 and rv.dtype == np.float32
        rm_ref, rv_ref = rm0.astype(np.float64), rv0.astype(np.float64)
        norm.update_running_reference(rm_ref, rv_ref, host(mean).astype(np.float64),
                                      var_of(invstd, 1e-5), m, momentum)
        assert_close(rm, rm_ref, 1e-6, 1e-7, f"running mean from the batch mean ({name})")
        assert_close(rv, rv_ref, 1e-6, 1e-7, f"running var from the batch var ({name})")
        assert_close(rm, rm_torch, 1e-6, 1e-6, f"running mean, PyTorch's rule ({name})")
        assert_close(rv, rv_torch, 1e-6, 1e-6, f"running var, PyTorch's rule ({name})")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_running_statistics_after_several_steps(impl, momentum):
    rng = np.random.default_rng(6)
    c = 3
    expect_m, expect_v = np.zeros(c), np.ones(c)
    with run_on(impl) as dev:
        rm, rv = dev(np.zeros(c, np.float32)), dev(np.ones(c, np.float32))
        gamma = mt.Tensor(dev(np.ones(c, np.float32)), requires_grad=True)
        beta = mt.Tensor(dev(np.zeros(c, np.float32)), requires_grad=True)
        for step in range(4):
            x = (rng.standard_normal((2, c, 3, 5)) * (step + 1) + step).astype(np.float32)
            batch_norm(dev(x), rm, rv, gamma, beta, training=True, momentum=momentum)
            m, v = naive_stats(x)
            n = x.size // c
            expect_m = (1 - momentum) * expect_m + momentum * m
            expect_v = (1 - momentum) * expect_v + momentum * v * n / (n - 1)  # unbiased
    assert rm.dtype == np.float32 and rv.dtype == np.float32
    assert_close(rm, expect_m, 1e-5, 1e-6, "running mean")
    assert_close(rv, expect_v, 1e-5, 1e-6, "running var")


# ==========================================================================
# 5. The CUDA kernels against the reference (emulator; GPU when present)
# ==========================================================================
# HW = 63, 3, 1, 1517, 400, 49, 3136 (as ResNeXt50's 56x56 maps), 6 (a whole
# number of 16-byte vectors in float64 only); several chunks per channel at some
# block sizes (1x2x37x41 at 64 threads, 6x3x20x20, 2x2x56x56), tails everywhere
BN_SHAPES = [(3, 5, 7, 9), (2, 70, 3, 1), (4, 3, 1, 1), (1, 2, 37, 41), (6, 3, 20, 20),
             (2, 3, 7, 7), (2, 2, 56, 56), (3, 4, 2, 3)]
# ResNeXt50's own sizes: GPU only, far too slow for the emulator
BN_GPU_SHAPES = [(4, 256, 56, 56), (4, 2048, 7, 7), (4, 64, 112, 112)]
# (rtol, atol) per quantity, as the emulator and GPU tests had them; the
# gradients' atol is scaled(ref, factor) = factor * max(1, max |ref|)
BN_TOL = {"emulated": {"mean": (1e-6, 1e-5), "var": (1e-5, 1e-5), "y": (1e-5, 1e-5),
                       "grad": (1e-4, 2e-5)},
          "cupy": {"mean": (1e-4, 1e-4), "var": (1e-4, 1e-4), "y": (1e-4, 1e-4),
                   "grad": (1e-3, 1e-4)}}
BN_TOL_FLOAT64 = {"mean": (1e-12, 1e-12), "var": (1e-11, 1e-11), "y": (1e-11, 1e-11),
                  "grad": (1e-10, 1e-10)}


def _bn_data(shape, x_scale, x_offset, seed, dtype):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = (rng.standard_normal(shape) * x_scale + x_offset).astype(dtype)
    gamma, beta = (rng.standard_normal(c).astype(dtype) for _ in range(2))
    gy = rng.standard_normal(shape).astype(dtype)
    rmean = rng.standard_normal(c).astype(dtype)
    rvar = (rng.random(c) + 0.5).astype(dtype)
    return x, gamma, beta, gy, rmean, rvar


def _masked_by(gy64, y, relu):
    """gy where the kernels' own forward gave y > 0 (relu), else gy."""
    return gy64 * (host(y) > 0) if relu else gy64


def _check_kernels(impl, shape, relu, x_scale, x_offset, seed, dtype=np.float32):
    """Every launcher of cuda/norm.py against the float64 reference."""
    tol = BN_TOL[impl] if dtype == np.float32 else BN_TOL_FLOAT64
    x, gamma, beta, gy, rmean, rvar = _bn_data(shape, x_scale, x_offset, seed, dtype)
    x64, gy64 = x.astype(np.float64), gy.astype(np.float64)

    with run_on(impl) as dev:
        xd, gd, bd, gyd = dev(x), dev(gamma), dev(beta), dev(gy)
        y, mean, invstd = cuda_norm.batch_norm_train_forward(xd, gd, bd, 1e-5, relu)
        train_grads = cuda_norm.batch_norm_backward(gyd, xd, gd, bd, mean, invstd, relu)
        yi = cuda_norm.batch_norm_infer_forward(xd, gd, bd, dev(rmean), dev(rvar), 1e-5, relu)
        infer_grads = cuda_norm.batch_norm_infer_backward(gyd, xd, gd, bd, dev(rmean),
                                                          dev(rvar), 1e-5, relu)
    for a in (y, mean, invstd, yi) + train_grads + infer_grads:
        assert a.dtype == dtype

    y_ref, mean_ref, invstd_ref = norm.batch_norm_train_forward_reference(x64, gamma, beta, 1e-5,
                                                                          relu)
    var_ref = x64.var(axis=(0, 2, 3))
    assert_close(mean, mean_ref, *tol["mean"], "batch mean")
    assert_close(var_of(invstd, 1e-5), var_ref, *tol["var"], "batch var")
    assert_close(invstd, invstd_ref, tol["var"][0], 0, "batch invstd")
    assert_close(y, y_ref, *tol["y"], "train forward y")

    # the reference without relu on gy masked where the kernels' forward gave y > 0:
    # a backward kernel whose recomputed mask differed anywhere would be far off there
    rtol, factor = tol["grad"]
    refs = norm.batch_norm_backward_reference(_masked_by(gy64, y, relu), x64, gamma, beta,
                                              host(mean), host(invstd), False)
    for got, ref, name in zip(train_grads, refs, ("gx", "ggamma", "gbeta")):
        assert_close(got, ref, rtol, scaled(ref, factor), f"train backward {name}")

    yi_ref = norm.batch_norm_infer_forward_reference(x64, gamma, beta, rmean, rvar, 1e-5, relu)
    assert_close(yi, yi_ref, *tol["y"], "inference forward")
    refs = norm.batch_norm_infer_backward_reference(_masked_by(gy64, yi, relu), x64, gamma, beta,
                                                    rmean, rvar, 1e-5, False)
    for got, ref, name in zip(infer_grads, refs, ("gx", "ggamma", "gbeta")):
        assert_close(got, ref, rtol, scaled(ref, factor), f"inference backward {name}")


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_batch_norm_kernels_match_reference(impl, shape, relu, block_size):
    _check_kernels(impl, shape, relu, x_scale=3, x_offset=5, seed=7)  # a mean far from 0


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", [BN_SHAPES[0], BN_SHAPES[1], BN_SHAPES[3], BN_SHAPES[6],
                                   BN_SHAPES[7]], ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_kernels_float64(impl, shape, block_size):
    _check_kernels(impl, shape, True, x_scale=3, x_offset=5, seed=8, dtype=np.float64)


@needs_emulator
@pytest.mark.parametrize("shape", [BN_SHAPES[0], BN_SHAPES[3], BN_SHAPES[4], BN_SHAPES[6]],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_kernels_give_the_same_bits_under_every_schedule(shape, dtype, block_size):
    """Also with several chunks per channel (6x3x20x20, 2x2x56x56 at every block
    size): the channel's last block differs from schedule to schedule, its
    merge of the partials does not."""
    x, gamma, beta, gy, rmean, rvar = _bn_data(shape, 3, 5, 9, dtype)

    def run():
        rm, rv = rmean.copy(), rvar.copy()
        y, mean, invstd = cuda_norm.batch_norm_train_forward(x, gamma, beta, 1e-5, True, rm, rv)
        grads = cuda_norm.batch_norm_backward(gy, x, gamma, beta, mean, invstd, True)
        yi = cuda_norm.batch_norm_infer_forward(x, gamma, beta, rmean, rvar, 1e-5, True)
        return (y, mean, invstd, rm, rv, yi) + grads + cuda_norm.batch_norm_infer_backward(
            gy, x, gamma, beta, rmean, rvar, 1e-5, True)

    same_bits_under_every_schedule(run, f"batch norm {shape}")


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("threads", [48, 2048])
def test_batch_norm_launchers_refuse_block_sizes_the_kernels_trap_on(impl, threads):
    """Before the launch: a __trap on a GPU would end the CUDA context of the process."""
    x, gamma, beta, *_ = _bn_data((2, 3, 4, 5), 1, 0, 0, np.float32)
    with run_on(impl) as dev, launch_shapes(BN_THREADS=threads), \
            pytest.raises(ValueError, match="batch_norm.cu needs BN_THREADS = a multiple of 32 "
                                            f"up to 1024, got {threads}"):
        cuda_norm.batch_norm_train_forward(dev(x), dev(gamma), dev(beta), 1e-5, False)


@pytest.mark.parametrize("impl", [pytest.param("cupy", marks=needs_gpu)])
@pytest.mark.parametrize("shape", BN_GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_batch_norm_kernels_at_resnext50_shapes(impl, shape, relu):
    _check_kernels(impl, shape, relu, x_scale=2, x_offset=3, seed=1)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("std,shape,seed,rtol", [(1.0, (8, 2, 16, 16), 9, 1e-3),
                                                 (0.1, (4, 3, 16, 16), 11, 2e-3)],
                         ids=["std1", "std0.1"])
def test_float32_variance_is_stable_under_a_large_mean(impl, std, shape, seed, rtol):
    """mean 1e4: E[x^2] - E[x]^2 (a sum of squares) in float32 would lose every digit."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * std + 1e4).astype(np.float32)
    c = shape[1]
    ones, zeros = np.ones(c, np.float32), np.zeros(c, np.float32)
    with run_on(impl) as dev:
        y, mean, invstd = norm.batch_norm_train_forward(dev(x), dev(ones), dev(zeros), 1e-5, False)
    assert invstd.dtype == np.float32
    _, v = naive_stats(x)
    assert_close(var_of(invstd, 1e-5), v, rtol, 0, "variance")
    assert_close(host(y).reshape(shape[0], c, -1).std(axis=(0, 2)), np.ones(c), rtol, 0,
                 "std of y")


# (rtol of the variance) the kernels centre on their exact mean; the host paths
# on a float32 mean, off by up to half an ulp of 1000 (fast) or a float32
# summation error (reference), which adds its square to the variance
LARGE_MEAN_RTOL = {"reference": 5e-4, "fast": 5e-5, "emulated": 2e-6, "cupy": 2e-6}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", [(8, 2, 16, 16), (4, 3, 7, 7)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("outlier", [False, True], ids=["plain", "first-value-50-std-out"])
def test_float32_statistics_at_mean_1000_std_0_01(impl, shape, outlier):
    """x = 1000 + 0.01 * noise in float32, where E[x^2] - E[x]^2 keeps no digit
    of the variance (checked here) and the old kernels' Welford means (1000,
    to float32's 6e-5) left 1e-3: against the float64 statistics of the same
    float32 data, the kernels at every block size (vector and scalar paths,
    one and several chunks per channel), also when the first value of every
    channel, the kernels' pivot, is 50 standard deviations out."""
    rng = np.random.default_rng(13)
    x = (1000 + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    if outlier:
        x[0, :, 0, 0] = 1000.5
    c = shape[1]
    x64 = x.astype(np.float64)
    mean64, var64 = x64.mean(axis=(0, 2, 3)), x64.var(axis=(0, 2, 3))
    naive = (x * x).mean(axis=(0, 2, 3)) - x.mean(axis=(0, 2, 3)) ** 2  # all float32
    assert np.all(np.abs(naive / var64 - 1) > 0.5), "the naive variance should fail here"
    ones, zeros = np.ones(c, np.float32), np.zeros(c, np.float32)
    for name, threads in (BLOCK_SIZES.items() if impl in KERNELS else [("default", {})]):
        with launch_shapes(**threads), run_on(impl) as dev:
            y, mean, invstd = norm.batch_norm_train_forward(dev(x), dev(ones), dev(zeros), 0.0,
                                                            False)
        assert_close(mean, mean64, 2e-7, 0, f"mean ({name})")
        assert_close(var_of(invstd, 0.0), var64, LARGE_MEAN_RTOL[impl], 0, f"variance ({name})")
        assert_close(host(y).astype(np.float64).reshape(shape[0], c, -1).std(axis=(0, 2)),
                     np.ones(c), LARGE_MEAN_RTOL[impl], 0, f"std of y ({name})")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_backward_relu_mask_is_exactly_the_forward_s(impl, dtype, training):
    """The backward recomputes the ReLU mask from x instead of reading y. Every
    value of a channel sits at one of five levels, and beta puts y at one level
    within rounding of 0 (either side); with gy = 1, gbeta counts the values
    the backward let through, which must be exactly the forward's count of
    y > 0: one rounding done differently would flip that whole level."""
    rng = np.random.default_rng(21)
    shape, c = (4, 8, 5, 6), 8  # the rounding is upward in about half of the channels
    levels = np.array([0.0, 0.7, 1.3, 2.9, 4.1], dtype)
    x = levels[rng.integers(0, 5, shape)]
    gamma = rng.uniform(0.5, 1.5, c).astype(dtype)
    rm, rv = rng.uniform(1, 2, c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    if training:  # the statistics as this implementation computes them (beta plays no part)
        with run_on(impl) as dev:
            _, mean, invstd = norm.batch_norm_train_forward(dev(x), dev(gamma), dev(gamma), 1e-5,
                                                            True)
        mean, invstd = host(mean), host(invstd)
    else:  # as the kernels compute them
        mean, invstd = rm, 1 / np.sqrt(rv + dtype(1e-5))
    d0 = levels[2] - mean  # x - mean at level 1.3, in x's dtype
    beta = -(d0 * (gamma * invstd))  # y = d0 * k + beta: the rounding of d0 * k, or 0
    ones = np.ones(shape, dtype)
    with run_on(impl) as dev:
        if training:
            y, m, s = norm.batch_norm_train_forward(dev(x), dev(gamma), dev(beta), 1e-5, True)
            _, _, gbeta = norm.batch_norm_backward(dev(ones), dev(x), dev(gamma), dev(beta), m,
                                                   s, True)
        else:
            y = norm.batch_norm_infer_forward(dev(x), dev(gamma), dev(beta), dev(rm), dev(rv),
                                              1e-5, True)
            _, _, gbeta = norm.batch_norm_infer_backward(dev(ones), dev(x), dev(gamma), dev(beta),
                                                         dev(rm), dev(rv), 1e-5, True)
    np.testing.assert_array_equal(host(gbeta), (host(y) > 0).sum(axis=(0, 2, 3)))


@needs_emulator
def test_the_arrival_counts_are_zero_after_every_launch(block_size):
    """Launches in a row share the per-channel counts: training forward and
    backward at two shapes of 3 channels (one chunk per channel, and several),
    then the first again. Both runs of it give the same bits, and every count
    is back at 0 (one left over would make a later launch finalize too early,
    reading partials not yet written, or never)."""
    def step(shape, seed):
        x, gamma, beta, gy, rm, rv = _bn_data(shape, 3, 5, seed, np.float32)
        y, mean, invstd = cuda_norm.batch_norm_train_forward(x, gamma, beta, 1e-5, True, rm, rv)
        return (y, mean, invstd, rm, rv) + cuda_norm.batch_norm_backward(gy, x, gamma, beta, mean,
                                                                        invstd, True)

    first = step((6, 3, 20, 20), 1)
    step((1, 3, 2, 2), 2)
    again = step((6, 3, 20, 20), 1)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    counts = cuda_norm._arrival_counts(emulator.device(), first[0], cuda_norm.MAX_CHANNELS)
    assert not counts.any()


@needs_emulator
def test_a_launch_stopped_part_way_leaves_no_count_behind(monkeypatch):
    """A reduce launch that stops after one block has counted itself (here a
    stand-in EmuError) must not hand that count to the next launch."""
    x, gamma, beta, *_ = _bn_data((6, 3, 20, 20), 3, 5, 0, np.float32)  # 2 chunks per channel
    expect = cuda_norm.batch_norm_train_forward(x, gamma, beta, 1e-5, True)
    launch = emulator.EmuDevice.launch

    def stopped(self, file, kernel, grid, block, args, *rest, **kwargs):
        if kernel == "bn_fwd_reduce":
            args[2][0] += 1  # block (0, 0) arrived
            raise emulator.EmuError("stopped part-way")
        return launch(self, file, kernel, grid, block, args, *rest, **kwargs)

    monkeypatch.setattr(emulator.EmuDevice, "launch", stopped)
    with pytest.raises(emulator.EmuError, match="part-way"):
        cuda_norm.batch_norm_train_forward(x, gamma, beta, 1e-5, True)
    monkeypatch.setattr(emulator.EmuDevice, "launch", launch)
    for a, b in zip(cuda_norm.batch_norm_train_forward(x, gamma, beta, 1e-5, True), expect):
        np.testing.assert_array_equal(a, b)


@needs_emulator
@pytest.mark.parametrize("dtype,plane,vec", [(np.float32, (20, 20), 1), (np.float32, (7, 9), 0),
                                             (np.float32, (7, 7), 0), (np.float32, (1, 1), 0),
                                             (np.float64, (2, 3), 1), (np.float64, (7, 7), 0)])
def test_the_kernels_move_16_bytes_at_a_time_where_the_layout_allows(dtype, plane, vec,
                                                                    monkeypatch):
    """vec = 1 (16-byte loads and stores) exactly when a plane holds whole
    16-byte vectors (HW % 4 == 0 in float32, % 2 in float64) and the arrays
    are aligned; a view one element off its buffer's alignment gets 0."""
    seen, launch = [], emulator.EmuDevice.launch

    def spy(self, file, kernel, grid, block, args, *rest, **kwargs):
        params = emulator.build(file, tuple(kwargs.get("defines", ()))).parameters(kernel)
        if "vec" in params:
            seen.append((kernel, int(args[params.index("vec")])))
        return launch(self, file, kernel, grid, block, args, *rest, **kwargs)

    monkeypatch.setattr(emulator.EmuDevice, "launch", spy)
    x, gamma, beta, gy, rm, rv = _bn_data((2, 3) + plane, 1, 0, 0, dtype)
    y, mean, invstd = cuda_norm.batch_norm_train_forward(x, gamma, beta, 1e-5, True)
    cuda_norm.batch_norm_backward(gy, x, gamma, beta, mean, invstd, True)
    cuda_norm.batch_norm_infer_forward(x, gamma, beta, rm, rv, 1e-5, True)
    cuda_norm.batch_norm_infer_backward(gy, x, gamma, beta, rm, rv, 1e-5, True)
    assert seen == [(k, vec) for k in ("bn_fwd_reduce", "bn_fwd_apply", "bn_bwd_reduce",
                                       "bn_bwd_apply", "bn_fwd_apply", "bn_bwd_reduce",
                                       "bn_bwd_apply")]
    a = np.zeros(1604, np.float32)
    start = (-a.ctypes.data % 16) // 4  # the first 16-byte aligned element
    assert cuda_norm._vec(400, a[start:start + 1600]) == 1
    assert cuda_norm._vec(400, a[start + 1:start + 1601]) == 0


# ==========================================================================
# 6. Op-level wiring: batch_norm through the kernels equals the fast path
# ==========================================================================
LAUNCHERS = ("batch_norm_train_forward", "batch_norm_backward", "batch_norm_infer_forward",
             "batch_norm_infer_backward")


def _spy_on_launchers(monkeypatch):
    """Count the calls of each launcher in minitorch_gx.cuda.norm."""
    calls = {name: 0 for name in LAUNCHERS}
    for name in LAUNCHERS:
        def wrapper(*args, _launch=getattr(cuda_norm, name), _name=name, **kwargs):
            calls[_name] += 1
            return _launch(*args, **kwargs)
        monkeypatch.setattr(cuda_norm, name, wrapper)
    return calls


def _bn_op(impl, x, gamma, beta, training, relu):
    """batch_norm run on ``impl`` -> y, its gradients, the state saved for
    backward (batch mean, invstd) and the running statistics."""
    c = x.shape[1]
    rng = np.random.default_rng(9)
    gy = rng.standard_normal(x.shape).astype(x.dtype)
    if training:
        rm0, rv0 = np.zeros(c, np.float32), np.ones(c, np.float32)
    else:
        rm0, rv0 = rng.standard_normal(c).astype(np.float32), (rng.random(c) + 0.5).astype(
            np.float32)
    with run_on(impl) as dev:
        rm, rv = dev(rm0), dev(rv0)
        tensors = [mt.Tensor(dev(a), requires_grad=True) for a in (x, gamma, beta)]
        y = batch_norm(tensors[0], rm, rv, tensors[1], tensors[2], training=training, relu=relu)
        f = y.creator
        saved = {"mean": host(f.mean), "invstd": host(f.invstd)} if training else {}
        # the kernels recompute the ReLU mask from x; the NumPy path reads y > 0
        assert hasattr(f, "y") == (impl in ("fast", "reference") and relu)
        y.backward(dev(gy))
    grads = [host(t.grad) for t in tensors]
    return host(y.data), grads, saved, (host(rm), host(rv))


def _close_to_fast(a, b, tol=2e-5, what=""):
    """As the old op-level tests: rtol = tol, atol = tol * max(1, max |fast|)."""
    assert_close(a, b, tol, tol * max(1.0, float(np.abs(b).max())), what)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", [(3, 5, 7, 6), (3, 4, 5, 7)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_op_through_the_kernels(impl, shape, relu, training, monkeypatch):
    rng = np.random.default_rng(1)
    c = shape[1]
    x = rng.standard_normal(shape).astype(np.float32) * 3 + 1
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32)
    y0, g0, saved0, stats0 = _bn_op("fast", x, gamma, beta, training, relu)
    calls = _spy_on_launchers(monkeypatch)
    y1, g1, saved1, stats1 = _bn_op(impl, x, gamma, beta, training, relu)
    used = LAUNCHERS[:2] if training else LAUNCHERS[2:]
    assert calls == {name: int(name in used) for name in LAUNCHERS}
    assert y1.dtype == np.float32
    _close_to_fast(y1, y0, what="y")
    for a, b, name in zip(g1, g0, ("gx", "ggamma", "gbeta")):
        assert a.dtype == np.float32, name
        _close_to_fast(a, b, 1e-4, name)
    assert saved1.keys() == saved0.keys()
    for name in saved0:
        _close_to_fast(saved1[name], saved0[name], what=f"saved {name}")
    for a, b, name in zip(stats1, stats0, ("running mean", "running var")):
        assert a.dtype == np.float32, name
        _close_to_fast(a, b, what=name)


def test_launchers_are_not_called_for_host_arrays(monkeypatch):
    """backend.choose: NumPy arrays outside emulate_kernels() take the fast
    (or reference) path, never a CUDA launcher."""
    def refuse(*args, **kwargs):
        raise AssertionError("a CUDA launcher was called for NumPy arrays")

    for name in LAUNCHERS:
        monkeypatch.setattr(cuda_norm, name, refuse)
    x, gamma, beta = make((2, 2, 3, 3), np.random.default_rng(11))
    for impl in ("fast", "reference"):
        for training in (True, False):
            _bn_op(impl, x, gamma, beta, training, True)
    with pytest.raises(AssertionError, match="launcher was called"):  # the patch is live
        _bn_op("emulated", x, gamma, beta, True, True)


# ==========================================================================
# 7. Parameter gradients into the optimizer's arrays; the GPU path's launches
# ==========================================================================
def _bn_with_parameters(impl, training, zero_grad, dtype=np.float32):
    """batch_norm (relu) forward and backward with gamma, beta as Parameters of
    an SGD (its zero_grad() called when zero_grad) -> gamma, beta, the SGD."""
    from minitorch_gx.nn import Parameter
    from minitorch_gx.optim import SGD
    x, gamma, beta, gy, rm, rv = _bn_data((3, 4, 5, 6), 2, 1, 5, dtype)
    with run_on(impl) as dev:
        g, b = Parameter(dev(gamma)), Parameter(dev(beta))
        opt = SGD([g, b], lr=0.1)
        if zero_grad:
            opt.zero_grad()
        y = batch_norm(mt.Tensor(dev(x)), dev(rm), dev(rv), g, b, training=training, relu=True)
        y.backward(dev(gy))
    return g, b, opt


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parameter_gradients_are_written_into_the_optimizer_s_arrays(impl, training, dtype):
    """After zero_grad() the backward writes ggamma and gbeta into the
    optimizer's own gradient views (Function.grad_buffer), which stay the
    parameters' grad, with the very values of the plain path."""
    plain = _bn_with_parameters(impl, training, False, dtype)
    g, b, opt = _bn_with_parameters(impl, training, True, dtype)
    for p, (_, view, _), q in zip((g, b), opt._views, plain):
        assert p.grad is view and not p.grad_is_zero and p.grad.dtype == dtype
        np.testing.assert_array_equal(host(p.grad), host(q.grad))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("out_dtype", [np.float32, np.float64], ids=["same-dtype", "float64"])
def test_backward_steps_return_the_arrays_they_are_given(impl, out_dtype):
    """ggamma_out, gbeta_out: filled (every element; they start as NaN) and
    returned themselves, values as without them; an array of another dtype
    than x is filled too (the kernels write a new one and copy it in)."""
    x, gamma, beta, gy, rm, rv = _bn_data((3, 4, 5, 6), 2, 1, 6, np.float32)
    with run_on(impl) as dev:
        args = [dev(gy), dev(x), dev(gamma), dev(beta)]
        _, mean, invstd = norm.batch_norm_train_forward(dev(x), dev(gamma), dev(beta), 1e-5, True)
        steps = [(norm.batch_norm_backward, args + [mean, invstd, True]),
                 (norm.batch_norm_infer_backward, args + [dev(rm), dev(rv), 1e-5, True])]
        for step, step_args in steps:
            expect = step(*step_args)
            outs = [dev(np.full(4, np.nan, out_dtype)) for _ in range(2)]
            got = step(*step_args, *outs)
            assert got[1] is outs[0] and got[2] is outs[1]
            for a, b in zip(got, expect):
                assert_close(a, b, 0 if out_dtype == np.float32 else 1e-7, 0, step.__name__)


def test_a_training_batch_norm_is_four_launches_on_the_gpu_path():
    """Traced (no GPU needed): forward and backward of a training batch norm
    with gamma and beta learned are bn_fwd_reduce, bn_fwd_apply,
    bn_bwd_reduce, bn_bwd_apply and nothing else (no generic CuPy operation:
    the parameter gradients land in the optimizer's arrays, nothing is added
    or copied), touching the tensor 1 + 2 times forward and 2 + 3 backward (y
    is not read back). The per-channel counts are one host-to-device copy the
    first time on a device, never again."""
    from minitorch_gx.cuda import trace
    from minitorch_gx.nn import Parameter
    from minitorch_gx.optim import SGD
    shape, c = (4, 8, 6, 6), 8
    rng = np.random.default_rng(0)
    with trace.fake_gpu(record=False):
        gamma = Parameter(trace.to_gpu(np.ones(c, np.float32)))
        beta = Parameter(trace.to_gpu(np.zeros(c, np.float32)))
        opt = SGD([gamma, beta], lr=0.1)
        rm, rv = trace.to_gpu(np.zeros(c, np.float32)), trace.to_gpu(np.ones(c, np.float32))
        x = mt.Tensor(trace.to_gpu(rng.standard_normal(shape).astype(np.float32)))
        gy = trace.to_gpu(rng.standard_normal(shape).astype(np.float32))
    steps = []
    with trace.fake_gpu() as launches:
        for _ in range(2):
            with trace.fake_gpu(record=False):
                opt.zero_grad()
            launches.clear()
            batch_norm(x, rm, rv, gamma, beta, training=True, relu=True).backward(gy)
            steps.append(list(launches))
    first, second = steps
    # the counts' copy, unless an earlier test on the (one) fake device made them
    made = [k for k in first if k.kind == "h2d"]
    assert [(k.kind, k.name) for k in made] in ([], [("h2d", "host -> device copy")])
    kernels = ["bn_fwd_reduce", "bn_fwd_apply", "bn_bwd_reduce", "bn_bwd_apply"]
    for launched in (first[len(made):], second):
        assert [(k.kind, k.name) for k in launched] == [("kernel", name) for name in kernels]
        assert [k.bytes // x.data.nbytes for k in launched] == [1, 2, 2, 3]
    for p, (_, view, _) in zip((gamma, beta), opt._views):
        assert p.grad is view


# ==========================================================================
# 8. Argument checks
# ==========================================================================
def test_bad_arguments_raise():
    x = np.zeros((1, 3, 1, 1))
    with pytest.raises(ValueError, match="more than one value per channel"):
        batch_norm(x, None, None, None, None, training=True)
    with pytest.raises(ValueError, match="weight has shape"):
        batch_norm(np.zeros((2, 3, 2, 2)), None, None, mt.Tensor(np.ones(4)), None, training=True)


@pytest.mark.parametrize("impl", ["fast"] + KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("relu", [False, True])
def test_cnhw_memory_is_normalised_as_it_is_and_keeps_its_layout(impl, relu):
    """The CNHW activations of the GPU and the NumPy paths: the same results as
    NCHW (to rounding: the statistics are summed in another order), outputs
    and gradients in CNHW memory, in training and in eval mode."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 6, 5, 7)).astype(np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    gamma, beta = (rng.standard_normal(6).astype(np.float32) for _ in range(2))
    with run_on(impl) as dev:
        def cnhw(a):
            return dev(np.ascontiguousarray(a.transpose(1, 0, 2, 3))).transpose(1, 0, 2, 3)
        results = []
        for layout in (dev, cnhw):
            rm, rv = dev(np.zeros(6, np.float32)), dev(np.ones(6, np.float32))
            y, mean, invstd = norm.batch_norm_train_forward(layout(x), dev(gamma), dev(beta),
                                                            1e-5, relu, rm, rv, 0.1)
            gx, gg, gb = norm.batch_norm_backward(layout(gy), layout(x), dev(gamma),
                                                  dev(beta), mean, invstd, relu)
            yi = norm.batch_norm_infer_forward(layout(x), dev(gamma), dev(beta), rm, rv,
                                               1e-5, relu)
            gxi, ggi, gbi = norm.batch_norm_infer_backward(layout(gy), layout(x), dev(gamma),
                                                           dev(beta), rm, rv, 1e-5, relu)
            results.append([y, gx, yi, gxi, mean, invstd, gg, gb, ggi, gbi, rm, rv])
        for a in results[1][:4]:
            assert cuda_device.is_cnhw(a)
    names = "y gx y_infer gx_infer mean invstd ggamma gbeta ggamma_infer gbeta_infer " \
            "running_mean running_var"
    for name, a, b in zip(names.split(),
                          *results):
        assert_close(a, b, 1e-5, 1e-5, f"{impl} CNHW vs NCHW {name}")


@pytest.mark.parametrize("shape", [(8, 3, 16, 16), (6, 4, 1, 1), (2, 5, 33, 32)])
def test_the_fast_path_on_cnhw_memory_equals_the_float64_reference(shape):
    """CNHW rows reduced in pieces of whole images (8 images of 16x16: two
    pieces of 4; 1x1 maps: one piece; 33x32: one image per piece)."""
    rng = np.random.default_rng(12)
    x = (rng.standard_normal(shape) * 3 + 5)  # a mean far from 0: cancellation would show
    gy = rng.standard_normal(shape)
    gamma, beta = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    x_cnhw = np.ascontiguousarray(x.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    gy_cnhw = np.ascontiguousarray(gy.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    for relu in (False, True):
        y_ref, mean_ref, invstd_ref = norm.batch_norm_train_forward_reference(
            x, gamma, beta, 1e-5, relu)
        y, mean, invstd = norm._train_forward_fast(x_cnhw, gamma, beta, 1e-5, relu, None, None,
                                                   0.1)
        assert cuda_device.is_cnhw(y)
        expected = norm.batch_norm_backward_reference(gy, x, gamma, beta, mean_ref, invstd_ref,
                                                      relu)
        got = norm._backward_fast(gy_cnhw, x_cnhw, gamma, beta, mean, invstd, relu, y=y)
        assert cuda_device.is_cnhw(got[0])
        for name, a, b in zip(("y", "mean", "invstd", "gx", "ggamma", "gbeta"),
                              (y, mean, invstd) + tuple(got),
                              (y_ref, mean_ref, invstd_ref) + tuple(expected)):
            assert_close(a, b, 1e-10, 1e-10, f"CNHW fast {shape} relu={relu} {name}")


@pytest.mark.parametrize("shape", [(8, 12, 4, 4), (2, 7, 33, 32)])
def test_the_pieces_of_channels_change_no_bit_on_cnhw_memory(shape, monkeypatch):
    """PIECE_BYTES only says how many channels a pass takes at a time: one
    channel per piece, a few, and the whole block give the same bits, in
    the forward (its running statistics too) and the backward."""
    rng = np.random.default_rng(14)
    x, gy = (np.ascontiguousarray(rng.standard_normal(shape).astype(np.float32)
                                  .transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3) for _ in range(2))
    gamma, beta = (rng.standard_normal(shape[1]).astype(np.float32) for _ in range(2))
    per_channel = shape[0] * shape[2] * shape[3] * 4
    results = []
    for piece_bytes in (1, 5 * per_channel, norm.PIECE_BYTES):
        monkeypatch.setattr(norm, "PIECE_BYTES", piece_bytes)
        rm, rv = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
        y, mean, invstd = norm._train_forward_fast(x, gamma, beta, 1e-5, True, rm, rv, 0.1)
        results.append((y, mean, invstd, rm, rv)
                       + norm._backward_fast(gy, x, gamma, beta, mean, invstd, True, y=y))
    for other in results[1:]:
        for name, a, b in zip(("y", "mean", "invstd", "running mean", "running var", "gx",
                               "ggamma", "gbeta"), results[0], other):
            assert a.tobytes() == b.tobytes(), f"{shape} {name} depends on the pieces"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_fast_backward_reading_y_gives_the_bits_of_recomputing_it(dtype):
    """The NumPy path reads the forward's y > 0 (one pass fewer); the mask is
    the one recomputing gives, so every bit of the gradients is the same."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal((3, 5, 6, 7)).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    gamma, beta = (rng.standard_normal(5).astype(dtype) for _ in range(2))
    y, mean, invstd = norm._train_forward_fast(x, gamma, beta, 1e-5, True, None, None, 0.1)
    read = norm._backward_fast(gy, x, gamma, beta, mean, invstd, True, y=y)
    recomputed = norm._backward_fast(gy, x, gamma, beta, mean, invstd, True)
    for a, b in zip(read, recomputed):
        assert np.array_equal(a, b)
