"""conv2d (minitorch_gx.ops.conv), every check of the op in one place:

1. the op against a naive seven-loop convolution, on every implementation;
2. float64 gradients by finite differences (fast and reference paths);
3. the NumPy fast path == the im2col reference, also cut into batch chunks;
4. the CUDA kernels (launchers of minitorch_gx.cuda.conv) against the
   reference, through the CPU emulator (every check on, under every schedule)
   and on a GPU when there is one, at several block sizes, in float32 and
   float64, at every group width of ResNeXt50 (4, 8, 16, 32 channels);
5. op-level wiring: conv2d through the kernels (``run_on("emulated")`` /
   CuPy) equals the fast path, and ``backend.choose`` never sends NumPy
   arrays to a launcher outside ``emulate_kernels()``;
6. argument checks.

The naive reference loops over every output element and every kernel tap in
plain Python, so it shares nothing with the im2col, lowering or kernel code.
"""
import numpy
import pytest

import minitorch_gx as mt
from minitorch_gx import backend
from minitorch_gx.cuda import conv as cuda_conv
from minitorch_gx.cuda import device as cuda_device
from minitorch_gx.cuda import emulator
from minitorch_gx.functional import conv2d
from minitorch_gx.ops import conv
from tests.backends import (IMPLEMENTATIONS, KERNEL_IMPLEMENTATIONS, assert_close, host,
                            launch_shapes, needs_emulator, needs_gpu, run_on,
                            same_bits_under_every_schedule, scaled)

KERNEL_FILES = ("grouped_conv.cu", "grouped_conv_bwd_weight.cu")  # see tests/ops/conftest.py
# Block sizes the kernels are run at (compile-time LAUNCH entries).
BLOCK_SIZES = {"default": {},
               "128-threads": {"CONV_THREADS": 128, "WGRAD_THREADS": 128},
               "64-threads": {"CONV_THREADS": 64, "WGRAD_THREADS": 64}}


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _random(shape, rng, dtype=numpy.float64):
    return rng.standard_normal(shape).astype(dtype)


# ==========================================================================
# 1. The naive seven-loop reference
# ==========================================================================
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


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", TINY)
def test_forward_matches_naive_loops(impl, case):
    N, C, K, H, Wd, k, stride, padding, groups = case
    rng = numpy.random.default_rng(1)
    x, W, b = _random((N, C, H, Wd), rng), _random((K, C // groups, k, k), rng), _random(K, rng)
    with run_on(impl) as dev:
        y = conv2d(dev(x), dev(W), dev(b), stride, padding, groups).data
    assert_close(y, naive_conv2d(x, W, b, stride, padding, groups), 1e-10, 1e-12, "y")


# ResNeXt-like: 32 groups of 2 or 4 channels, the stem, 1x1 with stride and on small maps
# (N, C, K, H, W, kernel, stride, padding, groups)
RESNEXT_LIKE = [
    (2, 64, 64, 15, 15, 3, 2, 1, 32),
    (2, 128, 128, 9, 9, 3, 1, 1, 32),
    (2, 3, 16, 23, 23, 7, 2, 3, 1),
    (2, 32, 64, 15, 15, 1, 2, 0, 1),
    (3, 64, 32, 7, 7, 1, 1, 0, 1),
    (2, 64, 128, 5, 5, 1, 1, 0, 1),  # layer4-like: few pixels, many channels
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", [RESNEXT_LIKE[0], RESNEXT_LIKE[3], TINY[3]])
def test_float32_stays_float32(impl, case):
    N, C, K, H, Wd, k, stride, padding, groups = case
    rng = numpy.random.default_rng(5)
    x, W, b = (_random((N, C, H, Wd), rng, numpy.float32),
               _random((K, C // groups, k, k), rng, numpy.float32), _random(K, rng, numpy.float32))
    with run_on(impl) as dev:
        xt, Wt, bt = (mt.Tensor(dev(a), requires_grad=True) for a in (x, W, b))
        y = conv2d(xt, Wt, bt, stride, padding, groups)
        y.backward(dev(_random(y.shape, rng, numpy.float32)))
    assert {t.dtype for t in (y, xt.grad, Wt.grad, bt.grad)} == {numpy.dtype(numpy.float32)}
    expected = naive_conv2d(x.astype(numpy.float64), W.astype(numpy.float64),
                            b.astype(numpy.float64), _pair(stride), _pair(padding), groups)
    assert_close(y.data, expected, 1e-4, 1e-4, "float32 y")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_matches_torch_when_available(impl):
    torch = pytest.importorskip("torch")
    rng = numpy.random.default_rng(7)
    x, W, b = _random((2, 8, 11, 10), rng), _random((8, 2, 3, 3), rng), _random(8, rng)
    gy = _random((2, 8, 6, 12), rng)
    with run_on(impl) as dev:
        xt = mt.Tensor(dev(x), requires_grad=True)
        y = conv2d(xt, dev(W), dev(b), (2, 1), (1, 2), 4)
        y.backward(dev(gy))
    x_torch = torch.tensor(x, requires_grad=True)
    y_torch = torch.nn.functional.conv2d(x_torch, torch.tensor(W), torch.tensor(b), (2, 1), (1, 2),
                                         1, 4)
    y_torch.backward(torch.tensor(gy))
    assert_close(y.data, y_torch.detach().numpy(), 1e-10, 1e-12, "y")
    assert_close(xt.grad, x_torch.grad.numpy(), 1e-10, 1e-12, "gx")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_no_input_gradient_when_the_input_needs_none(impl):
    """The stem's input is the image: backward must not compute (or store) gx."""
    rng = numpy.random.default_rng(6)
    with run_on(impl) as dev:
        x = mt.Tensor(dev(_random((1, 3, 9, 9), rng)))
        W = mt.Tensor(dev(_random((4, 3, 7, 7), rng)), requires_grad=True)
        y = conv2d(x, W, None, 2, 3)
        gx, gW = y.creator.backward(dev(numpy.ones(y.shape)))
    assert gx is None and gW.shape == W.shape


# ==========================================================================
# 2. Gradients by finite differences (float64)
# ==========================================================================
# batch 1, 2 and 3, groups 1, 2, 4, kernels 1, 3 and 7x7/2
# (N, C, K, H, W, kernel, stride, padding, groups)
GRAD_CASES = [
    (1, 4, 6, 5, 7, 3, 1, 1, 2),
    (3, 4, 4, 7, 5, 3, 2, 1, 4),
    (3, 4, 6, 5, 5, 3, 2, 0, 2),
    (1, 4, 8, 7, 7, 1, 1, 0, 1),
    (3, 4, 4, 7, 5, 1, 2, 0, 2),
    (1, 2, 3, 9, 9, 7, 2, 3, 1),
    (2, 2, 4, 4, 5, 1, 1, 1, 1),  # a padded 1x1: gx through the general lowering path
    (2, 4, 4, 5, 7, 3, 2, 1, 2),  # the old reference-path case, now with a bias too
    (4, 4, 4, 2, 2, 3, 1, 1, 2),  # a 2x2 map: one dense map of the whole image
]


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck_x_W_b(impl, case):
    N, C, K, H, Wd, k, stride, padding, groups = case
    rng = numpy.random.default_rng(2)
    x = mt.Tensor(_random((N, C, H, Wd), rng), requires_grad=True)
    W = mt.Tensor(_random((K, C // groups, k, k), rng), requires_grad=True)
    b = mt.Tensor(_random(K, rng), requires_grad=True)
    with run_on(impl):
        mt.gradcheck(lambda x, W, b: conv2d(x, W, b, stride, padding, groups), [x, W, b],
                     atol=1e-7, rtol=1e-6)


def test_gradcheck_reference_path_without_bias():
    rng = numpy.random.default_rng(3)
    x = mt.Tensor(_random((2, 4, 5, 7), rng), requires_grad=True)
    W = mt.Tensor(_random((4, 2, 3, 3), rng), requires_grad=True)
    with backend.implementation("reference"):
        mt.gradcheck(lambda x, W: conv2d(x, W, None, 2, 1, 2), [x, W], atol=1e-7, rtol=1e-6)


# ==========================================================================
# 3. Fast path == reference
# ==========================================================================
def _all_three(x, W, gy, stride, padding, groups):
    args = (stride, padding, groups)
    return (conv.conv2d_forward(x, W, *args),
            conv.conv2d_backward_data(gy, W, x.shape, *args),
            conv.conv2d_backward_weight(gy, x, W.shape, *args))


@pytest.mark.parametrize("case", RESNEXT_LIKE)
@pytest.mark.parametrize("chunk_bytes", [None, 1, 2 * 4000])
def test_fast_equals_reference(case, chunk_bytes, monkeypatch):
    """Also with the batch cut into chunks of 1 and of 2 images (ragged end)."""
    if chunk_bytes is not None:
        monkeypatch.setattr(conv, "CHUNK_BYTES", chunk_bytes)
    N, C, K, H, Wd, k, stride, padding, groups = case
    rng = numpy.random.default_rng(4)
    x, W = _random((N, C, H, Wd), rng), _random((K, C // groups, k, k), rng)
    fast_y = conv.conv2d_forward(x, W, stride, padding, groups)
    gy = _random(fast_y.shape, rng)
    fast = _all_three(x, W, gy, stride, padding, groups)
    with backend.implementation("reference"):
        ref = _all_three(x, W, gy, stride, padding, groups)
    for name, a, r in zip(["y", "gx", "gW"], fast, ref):
        assert_close(a, r, 1e-10, 1e-10, name)


# ==========================================================================
# 4. The CUDA kernels against the reference (emulator; GPU when present)
# ==========================================================================
# (N, C, H, W, K, groups, R, S, stride, padding)
CONV_CASES = [
    (2, 8, 7, 9, 12, 2, 3, 3, 1, 1),             # Kg = 6: a partial 8-row tile
    (3, 6, 9, 8, 9, 3, 3, 3, 2, 1),              # stride 2, Kg = Cg = 3
    (2, 128, 6, 5, 128, 32, 3, 3, 1, 1),         # ResNeXt layer1's 32 groups of 4
    (2, 64, 9, 9, 64, 2, 3, 3, 2, 1),            # 32 channels per group, stride 2
    (2, 8, 24, 25, 8, 2, 3, 3, 1, 1),            # more pixels than one tile holds
    (1, 3, 15, 13, 10, 1, 7, 7, 2, 3),           # a stem: 7x7 stride 2, groups 1
    (2, 4, 5, 5, 4, 4, 1, 1, 1, 0),              # depthwise 1x1
    (1, 10, 6, 7, 80, 2, 1, 5, (1, 2), (0, 2)),  # Kg = 40 > 32: two row tiles; 1x5 filter
    (1, 4, 3, 3, 4, 1, 5, 5, 1, 2),              # filter larger than the image
    (2, 64, 13, 11, 64, 8, 3, 3, 2, 1),          # 8 groups of 8, stride 2
    (2, 256, 9, 9, 256, 32, 3, 3, 1, 1),         # 32 groups of 8
    (2, 64, 7, 9, 64, 4, 3, 3, 1, 1),            # 16 per group, odd sizes
    (1, 64, 7, 5, 64, 2, 3, 3, 2, 1),            # 32 per group, stride 2, odd sizes
    (3, 16, 11, 5, 16, 4, 3, 3, 2, 1),           # 4 per group, stride 2, odd sizes
    (1, 128, 9, 9, 128, 2, 3, 3, 1, 1),          # 64 per group: 3 chunks of 22, 22, 20 channels
    (2, 4, 8, 7, 4, 1, 2, 2, 3, 0),              # 2x2 stride 3: gx phases no tap reaches
    (2, 6, 7, 7, 6, 6, 3, 3, 2, 1),              # depthwise 3x3, stride 2
    (3, 32, 9, 13, 32, 4, 3, 3, 1, 1),           # 8 per group: one block's pixels span 3 images
]
# float64, one case per ResNeXt50 group width (4, 8, 16, 32 channels), odd
# sizes, stride 1 and 2, tail tiles in both directions
CONV_CASES_FLOAT64 = [
    (1, 16, 7, 5, 16, 4, 3, 3, 2, 1),            # 4 per group, stride 2
    (1, 16, 6, 7, 16, 2, 3, 3, 1, 1),            # 8 per group
    (1, 32, 5, 7, 32, 2, 3, 3, 2, 1),            # 16 per group, stride 2
    (1, 64, 5, 5, 64, 2, 3, 3, 1, 1),            # 32 per group
    CONV_CASES[1],                               # stride 2, 3 per group
    CONV_CASES[7],                               # Kg = 40: two row tiles; 1x5 filter
]
# ResNeXt50's own shapes (batch 4 keeps the float64 host references to a few
# seconds): GPU only, far too slow for the emulator.
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
# float32 tolerances, as the emulator and GPU tests had them:
# (rtol, atol factor of y and gx, atol factor of gW) -- atol = factor * max(1, max |ref|)
FLOAT32_TOL = {"emulated": (1e-5, 2e-5, 2e-5), "cupy": (1e-4, 3e-5, 1e-4)}


def _case_id(case):
    return "x".join(map(str, case[:8]))


def _conv_data(case, dtype, seed, normalise=False):
    n, c, h, w, k, g, r, s, stride, padding = case
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    W = rng.standard_normal((k, c // g, r, s))
    W = (W / numpy.sqrt(c // g * r * s) if normalise else W).astype(dtype)
    y_ref = conv.conv2d_forward_reference(x.astype(numpy.float64), W.astype(numpy.float64),
                                          stride, padding, g)
    gy = rng.standard_normal(y_ref.shape).astype(dtype)
    return x, W, gy, y_ref


def _check_kernels(impl, case, tol, seed=0, normalise=False):
    """The three launchers on float32 data against the float64 reference."""
    rtol, factor, factor_gW = tol
    x, W, gy, y_ref = _conv_data(case, numpy.float32, seed, normalise)
    g, stride, padding = case[5], case[8], case[9]
    x64, W64, gy64 = (a.astype(numpy.float64) for a in (x, W, gy))
    gx_ref = conv.conv2d_backward_data_reference(gy64, W64, x.shape, stride, padding, g)
    gW_ref = conv.conv2d_backward_weight_reference(gy64, x64, W.shape, stride, padding, g)
    with run_on(impl) as dev:
        y = cuda_conv.conv2d_forward(dev(x), dev(W), stride, padding, g)
        gx = cuda_conv.conv2d_backward_data(dev(gy), dev(W), x.shape, stride, padding, g)
        gW = cuda_conv.conv2d_backward_weight(dev(gy), dev(x), W.shape, stride, padding, g)
    for got, ref, f, name in ((y, y_ref, factor, "forward"), (gx, gx_ref, factor, "backward data"),
                              (gW, gW_ref, factor_gW, "backward weight")):
        assert got.dtype == numpy.float32, name
        assert_close(got, ref, rtol, scaled(ref, f), f"{impl} {case} {name}")


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_conv_kernels_match_reference(impl, case, block_size):
    _check_kernels(impl, case, FLOAT32_TOL[impl], seed=len(block_size))


@pytest.mark.parametrize("impl", [pytest.param("cupy", marks=needs_gpu)])
@pytest.mark.parametrize("case", RESNEXT_CONVS, ids=_case_id)
def test_conv_kernels_at_resnext50_shapes(impl, case):
    _check_kernels(impl, case, FLOAT32_TOL[impl], normalise=True)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CONV_CASES_FLOAT64, ids=_case_id)
def test_conv_kernels_float64(impl, case):
    x, W, gy, y_ref = _conv_data(case, numpy.float64, seed=3)
    g, stride, padding = case[5], case[8], case[9]
    gx_ref = conv.conv2d_backward_data_reference(gy, W, x.shape, stride, padding, g)
    gW_ref = conv.conv2d_backward_weight_reference(gy, x, W.shape, stride, padding, g)
    with run_on(impl) as dev:
        y = cuda_conv.conv2d_forward(dev(x), dev(W), stride, padding, g)
        gx = cuda_conv.conv2d_backward_data(dev(gy), dev(W), x.shape, stride, padding, g)
        gW = cuda_conv.conv2d_backward_weight(dev(gy), dev(x), W.shape, stride, padding, g)
    assert {a.dtype for a in (y, gx, gW)} == {numpy.dtype(numpy.float64)}
    assert_close(y, y_ref, 1e-12, 1e-12, "forward")
    assert_close(gx, gx_ref, 1e-12, 1e-12, "backward data")
    assert_close(gW, gW_ref, 1e-12, 1e-11, "backward weight")


@needs_emulator
@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[1], CONV_CASES[6],
                                  CONV_CASES_FLOAT64[2]], ids=_case_id)
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_conv_kernels_give_the_same_bits_under_every_schedule(case, dtype, block_size):
    """On these small shapes each element of gW gets at most two atomicAdds
    (weight-gradient splits <= 2) onto zero, and float addition commutes, so
    even the weight gradient must not change with the order of threads."""
    x, W, gy, _ = _conv_data(case, dtype, seed=8)
    g, stride, padding = case[5], case[8], case[9]
    same_bits_under_every_schedule(lambda: (
        cuda_conv.conv2d_forward(x, W, stride, padding, g),
        cuda_conv.conv2d_backward_data(gy, W, x.shape, stride, padding, g),
        cuda_conv.conv2d_backward_weight(gy, x, W.shape, stride, padding, g)), f"conv {case}")


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("threads,message", [
    ({"CONV_THREADS": 96}, "grouped_conv.cu needs CONV_THREADS = a power of two from 32 to 256"),
    ({"CONV_THREADS": 512}, "grouped_conv.cu needs CONV_THREADS = a power of two from 32 to 256"),
    ({"WGRAD_THREADS": 48}, "grouped_conv_bwd_weight.cu needs WGRAD_THREADS = a multiple of 32"),
])
def test_conv_launchers_refuse_block_sizes_the_kernels_trap_on(impl, threads, message):
    """Before the launch: a __trap on a GPU would end the CUDA context of the process."""
    x, W = numpy.zeros((1, 4, 5, 5), numpy.float32), numpy.zeros((4, 2, 3, 3), numpy.float32)
    with run_on(impl) as dev, launch_shapes(**threads), pytest.raises(ValueError, match=message):
        cuda_conv.conv2d_forward(dev(x), dev(W), 1, 1, 2)
        cuda_conv.conv2d_backward_weight(dev(x), dev(x), W.shape, 1, 1, 2)


class _NoLaunch:
    """A device that refuses kernel launches (everything else passes through)."""

    def __init__(self, device):
        self._device = device

    def __getattr__(self, name):
        return getattr(self._device, name)

    def launch(self, file, kernel, *args, **kwargs):
        raise AssertionError(f"{kernel} was launched; a groups=1 1x1 conv should be a GEMM")


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("gemm", [True, False], ids=["gemm", "kernel"])
def test_pointwise_conv_goes_to_gemm_and_matches(impl, stride, gemm, monkeypatch):
    """groups=1 1x1 convs: the cuBLAS route (no kernel launched) and our kernel
    give the same answer as the reference."""
    monkeypatch.setattr(cuda_conv, "GEMM_FOR_1X1", gemm)
    if gemm:
        device_for = cuda_conv.device_for
        monkeypatch.setattr(cuda_conv, "device_for", lambda a: _NoLaunch(device_for(a)))
    case = (2, 8, 5, 7, 6, 1, 1, 1, stride, 0)
    _check_kernels(impl, case, FLOAT32_TOL[impl], seed=5)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_conv_kernels_reject_bad_shapes(impl):
    x = numpy.zeros((1, 6, 5, 5), numpy.float32)
    with run_on(impl) as dev:
        with pytest.raises(ValueError, match="groups"):
            cuda_conv.conv2d_forward(dev(x), dev(numpy.zeros((4, 4, 3, 3), numpy.float32)), 1, 1,
                                     2)
        with pytest.raises(TypeError, match="float32 or float64"):
            cuda_conv.conv2d_forward(dev(x.astype(numpy.float16)),
                                     dev(numpy.zeros((6, 3, 3, 3), numpy.float16)), 1, 1, 2)


@needs_emulator
def test_conv_kernel_refuses_a_block_size_it_was_not_compiled_for():
    """grouped_conv.cu's tile geometry is fixed at compile time: a launch with
    another block size must fail loudly (__trap), not compute garbage."""
    dev = emulator.device()
    x, W = dev.zeros((1, 4, 5, 5), numpy.float32), dev.zeros((4, 2, 3, 3), numpy.float32)
    y = dev.empty((1, 4, 5, 5), numpy.float32)
    # N C H W K P Q G R S sh sw ph pw BM, then x's and y's image and channel strides (NCHW)
    dims = [1, 4, 5, 5, 4, 5, 5, 2, 3, 3, 1, 1, 1, 1, 4, 100, 25, 100, 25]
    module = emulator.build("grouped_conv.cu", dict(cuda_device.builds())["grouped_conv.cu"])
    with pytest.raises(emulator.EmuError, match="__trap"):
        module.launch("grouped_conv2d_fwd", (1, 2), 128, [x, W, y] + [numpy.int32(v) for v in dims])


# ==========================================================================
# 5. Op-level wiring: conv2d through the kernels equals the fast path
# ==========================================================================
LAUNCHERS = ("conv2d_forward", "conv2d_backward_data", "conv2d_backward_weight")


def _spy_on_launchers(monkeypatch):
    """Count the calls of each launcher in minitorch_gx.cuda.conv."""
    calls = {name: 0 for name in LAUNCHERS}
    for name in LAUNCHERS:
        def wrapper(*args, _launch=getattr(cuda_conv, name), _name=name, **kwargs):
            calls[_name] += 1
            return _launch(*args, **kwargs)
        monkeypatch.setattr(cuda_conv, name, wrapper)
    return calls


def _conv_op(impl, x, W, b, gy, stride, padding, groups):
    """(y, gx, gW, gb) of conv2d run on ``impl``, as NumPy arrays."""
    with run_on(impl) as dev:
        xt, Wt = mt.Tensor(dev(x), requires_grad=True), mt.Tensor(dev(W), requires_grad=True)
        bt = None if b is None else mt.Tensor(dev(b), requires_grad=True)
        y = conv2d(xt, Wt, bt, stride, padding, groups)
        y.backward(dev(gy))
    return [host(a) for a in (y.data, xt.grad, Wt.grad) + (() if b is None else (bt.grad,))]


def _close_to_fast(a, b, tol=2e-5, what=""):
    """As the old op-level tests: rtol = tol, atol = tol * max(1, max |fast|)."""
    assert_close(a, b, tol, tol * max(1.0, float(numpy.abs(b).max())), what)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("stride,groups", [(1, 4), (2, 4), (2, 1)])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_conv2d_op_through_the_kernels(impl, stride, groups, bias, monkeypatch):
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((2, 8, 9, 7)).astype(numpy.float32)
    W = rng.standard_normal((8, 8 // groups, 3, 3)).astype(numpy.float32)
    b = rng.standard_normal(8).astype(numpy.float32) if bias else None
    gy = numpy.random.default_rng(9).standard_normal(
        (2, 8, (9 + 2 - 3) // stride + 1, (7 + 2 - 3) // stride + 1)).astype(numpy.float32)
    fast = _conv_op("fast", x, W, b, gy, stride, 1, groups)
    calls = _spy_on_launchers(monkeypatch)
    kernels = _conv_op(impl, x, W, b, gy, stride, 1, groups)
    assert calls == {name: 1 for name in LAUNCHERS}, "each launcher runs once"
    for got, want, name in zip(kernels, fast, ["y", "gx", "gW", "gb"]):
        assert got.dtype == numpy.float32, name
        _close_to_fast(got, want, what=name)


def test_launchers_are_not_called_for_host_arrays(monkeypatch):
    """backend.choose: NumPy arrays outside emulate_kernels() take the fast
    (or reference) path, never a CUDA launcher."""
    def refuse(*args, **kwargs):
        raise AssertionError("a CUDA launcher was called for NumPy arrays")

    for name in LAUNCHERS:
        monkeypatch.setattr(cuda_conv, name, refuse)
    rng = numpy.random.default_rng(11)
    x = rng.standard_normal((2, 4, 6, 6)).astype(numpy.float32)
    W = rng.standard_normal((4, 2, 3, 3)).astype(numpy.float32)
    gy = numpy.ones((2, 4, 6, 6), numpy.float32)
    for impl in ("fast", "reference"):
        _conv_op(impl, x, W, None, gy, 1, 1, 2)
    with pytest.raises(AssertionError, match="launcher was called"):  # the patch is live
        _conv_op("emulated", x, W, None, gy, 1, 1, 2)


# ==========================================================================
# 6. Argument checks
# ==========================================================================
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


# ==========================================================================
# 6. CNHW memory (the GPU path's layout): the same results, in the same layout
# ==========================================================================
def cnhw(a, dev):
    """The logical (N, C, H, W) array ``a`` held in C-contiguous (C, N, H, W) memory."""
    return dev(numpy.ascontiguousarray(a.transpose(1, 0, 2, 3))).transpose(1, 0, 2, 3)


CNHW_CASES = [CONV_CASES[0], CONV_CASES[2], CONV_CASES[3], CONV_CASES[5], CONV_CASES[13],
              (2, 8, 6, 5, 12, 1, 1, 1, 1, 0),   # 1x1: one GEMM
              (3, 8, 7, 6, 12, 1, 1, 1, 2, 0)]   # 1x1 stride 2


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CNHW_CASES, ids=_case_id)
def test_cnhw_inputs_give_the_nchw_results_in_cnhw_memory(impl, case):
    x, W, gy, _ = _conv_data(case, numpy.float32, 3)
    g, stride, padding = case[5], case[8], case[9]
    with run_on(impl) as dev:
        expected = (cuda_conv.conv2d_forward(dev(x), dev(W), stride, padding, g),
                    cuda_conv.conv2d_backward_data(dev(gy), dev(W), x.shape, stride, padding, g),
                    cuda_conv.conv2d_backward_weight(dev(gy), dev(x), W.shape, stride, padding,
                                                     g))
        got = (cuda_conv.conv2d_forward(cnhw(x, dev), dev(W), stride, padding, g),
               cuda_conv.conv2d_backward_data(cnhw(gy, dev), dev(W), x.shape, stride, padding,
                                              g),
               cuda_conv.conv2d_backward_weight(cnhw(gy, dev), cnhw(x, dev), W.shape, stride,
                                                padding, g))
        if x.shape[0] > 1:  # (with one image the two layouts are the same memory)
            assert cuda_device.is_cnhw(got[0]) and cuda_device.is_cnhw(got[1])
    for a, b, name in zip(got, expected, ("forward", "backward data", "backward weight")):
        assert_close(a, b, 1e-5, scaled(b, 1e-5), f"{impl} {case} {name} CNHW vs NCHW")


FAST_CNHW_CASES = CONV_CASES + [(2, 8, 6, 5, 12, 1, 1, 1, 1, 0),  # 1x1: one GEMM
                                 (3, 8, 7, 6, 12, 1, 1, 1, 2, 0),  # 1x1 stride 2
                                 (4, 64, 2, 2, 32, 1, 1, 1, 1, 0)]  # a thin 1x1 (layer4's maps)


@pytest.mark.parametrize("case", FAST_CNHW_CASES, ids=_case_id)
def test_the_fast_path_keeps_cnhw_memory_and_gives_the_nchw_results(case):
    """The NumPy path's activations are CNHW (``normalize`` writes it): every
    direction of every geometry gives the reference's NCHW values, in CNHW
    memory, and an NCHW input still gives NCHW output."""
    x, W, gy, _ = _conv_data(case, numpy.float64, 5)
    g, stride, padding = case[5], case[8], case[9]
    expected = (conv.conv2d_forward_reference(x, W, stride, padding, g),
                conv.conv2d_backward_data_reference(gy, W, x.shape, stride, padding, g),
                conv.conv2d_backward_weight_reference(gy, x, W.shape, stride, padding, g))
    for layout in (numpy.array, lambda a: cnhw(a, numpy.array)):
        got = (conv.conv2d_forward(layout(x), W, stride, padding, g),
               conv.conv2d_backward_data(layout(gy), W, x.shape, stride, padding, g),
               conv.conv2d_backward_weight(layout(gy), layout(x), W.shape, stride, padding, g))
        for a in got[:2]:
            if x.shape[0] > 1 and a.shape[1] > 1:  # (else both layouts are the same memory)
                assert cuda_device.is_cnhw(a) == cuda_device.is_cnhw(layout(x)), case
        for a, b, name in zip(got, expected, ("forward", "backward data", "backward weight")):
            assert_close(a, b, 1e-10, scaled(b, 1e-12), f"fast {case} {name}")
    # gy in the other layout than x: brought to x's
    gW = conv.conv2d_backward_weight(gy, cnhw(x, numpy.array), W.shape, stride, padding, g)
    assert_close(gW, expected[2], 1e-10, scaled(expected[2], 1e-12), f"fast {case} mixed gW")


@pytest.mark.parametrize("transposed_up_to", [0, 1 << 30], ids=["gy-cols^T", "cols-gy^T"])
@pytest.mark.parametrize("fold_bytes", [1, 20000, conv.FOLD_BYTES])
@pytest.mark.parametrize("case", [(3, 16, 7, 6, 16, 2, 3, 3, 1, 1),    # 8 per group
                                  (5, 64, 9, 9, 64, 8, 3, 3, 2, 1),    # stride 2, per tap
                                  (4, 64, 8, 10, 64, 8, 3, 3, 2, 1),   # stride 2, on phases
                                  (2, 24, 6, 5, 48, 3, 3, 3, (2, 1), (1, 1)),
                                  (2, 24, 6, 5, 48, 3, 3, 2, (2, 1), (1, 0))], ids=_case_id)
def test_the_folded_grouped_conv_equals_the_reference_in_every_blocking(monkeypatch, case,
                                                                       fold_bytes,
                                                                       transposed_up_to):
    """CNHW grouped convolutions with >= 8 outputs per group run as one GEMM
    per group over the batch; the blocks of groups and images (one group and
    one image each at fold_bytes=1) change nothing but the order of work,
    and the weight gradient is the same taken either way round."""
    monkeypatch.setattr(conv, "FOLD_BYTES", fold_bytes)
    monkeypatch.setattr(conv, "TRANSPOSED_WEIGHT_GRADIENT_MAX_OUT_CHANNELS", transposed_up_to)
    monkeypatch.setattr(conv, "FOLD_MAX_PIXELS", 1 << 30)  # these maps are larger than 7x7
    x, W, gy, _ = _conv_data(case, numpy.float64, 6)
    g, stride, padding = case[5], case[8], case[9]
    geometry = conv._Geometry(x.shape, W.shape, stride, padding, g)
    assert conv._folds(cnhw(x, numpy.array), geometry)
    got = (conv._forward_fast(cnhw(x, numpy.array), W, stride, padding, g),
           conv._backward_data_fast(cnhw(gy, numpy.array), W, x.shape, stride, padding, g),
           conv._backward_weight_fast(cnhw(gy, numpy.array), cnhw(x, numpy.array), W.shape,
                                      stride, padding, g))
    expected = (naive_conv2d(x, W, None, _pair(stride), _pair(padding), g),
                conv.conv2d_backward_data_reference(gy, W, x.shape, stride, padding, g),
                conv.conv2d_backward_weight_reference(gy, x, W.shape, stride, padding, g))
    assert cuda_device.is_cnhw(got[0]) and cuda_device.is_cnhw(got[1])
    for a, b, name in zip(got, expected, ("forward", "backward data", "backward weight")):
        assert_close(a, b, 1e-10, scaled(b, 1e-12), f"folded {case} {name}")


@pytest.mark.parametrize("transposed_up_to", [0, 1 << 30], ids=["gy-cols^T", "cols-gy^T"])
@pytest.mark.parametrize("fold_bytes", [1, 20000, conv.FOLD_BYTES])
@pytest.mark.parametrize("case", [(3, 3, 16, 14, 8, 1, 7, 7, 2, 3),        # the stem
                                  (2, 2, 8, 9, 5, 1, 3, 4, (2, 3), (1, 1)),
                                  (2, 4, 8, 8, 6, 1, 2, 2, 2, 0),          # no padding
                                  (2, 1, 12, 8, 3, 1, 5, 3, (3, 2), (2, 1))], ids=_case_id)
def test_the_stems_kind_of_conv_runs_on_stride_phases_equal_to_the_reference(monkeypatch, case,
                                                                             fold_bytes,
                                                                             transposed_up_to):
    """A strided kernel over few channels in one group is folded, its im2col
    read from the image's stride phases by shifted copies; the blocks of
    images (one each at fold_bytes=1) change nothing but the order of work,
    nor does the orientation of the weight gradient's GEMM."""
    monkeypatch.setattr(conv, "FOLD_BYTES", fold_bytes)
    monkeypatch.setattr(conv, "TRANSPOSED_WEIGHT_GRADIENT_MAX_OUT_CHANNELS", transposed_up_to)
    monkeypatch.setattr(conv, "STEM_MIN_OUT_CHANNELS", 1)  # these have few outputs
    x, W, gy, _ = _conv_data(case, numpy.float64, 7)
    stride, padding = case[8], case[9]
    x_c = cnhw(x, numpy.array)
    x_c = x_c if cuda_device.is_cnhw(x_c) else x  # one channel: CNHW memory is NCHW memory
    geometry = conv._Geometry(x.shape, W.shape, stride, padding, 1)
    assert conv._tiles(geometry) and conv._stem_like(geometry)
    assert conv._folds(x_c, geometry) == cuda_device.is_cnhw(x_c)
    got = (conv._forward_fast(x_c, W, stride, padding, 1),
           conv._backward_weight_fast(cnhw(gy, numpy.array), x_c, W.shape, stride, padding, 1))
    expected = (naive_conv2d(x, W, None, _pair(stride), _pair(padding), 1),
                conv.conv2d_backward_weight_reference(gy, x, W.shape, stride, padding, 1))
    for a, b, name in zip(got, expected, ("forward", "backward weight")):
        assert_close(a, b, 1e-10, scaled(b, 1e-12), f"stem-like {case} {name}")


@pytest.mark.parametrize("x_shape, W_shape, stride, padding, tiles", [
    ((2, 3, 64, 64), (64, 3, 7, 7), 2, 3, True),     # the stem: 32x32 phases, 32x32 outputs
    ((2, 3, 65, 64), (64, 3, 7, 7), 2, 3, False),    # an odd height: 33 rows out of 65
    ((2, 256, 16, 16), (256, 8, 3, 3), 2, 1, True),  # layer2's first at 64x64
    ((2, 256, 15, 15), (256, 8, 3, 3), 2, 1, False),
    ((2, 64, 9, 7), (64, 8, 3, 3), 1, 1, True),      # stride 1, "same": x is its one phase
    ((2, 64, 9, 7), (64, 8, 3, 3), 1, 0, False),     # "valid": 7x5 out of 9x7
    ((2, 64, 8, 8), (64, 8, 2, 2), 2, 0, True)])
def test_which_convolutions_split_into_phases_of_the_outputs_size(x_shape, W_shape, stride,
                                                                  padding, tiles):
    g = conv._Geometry(x_shape, W_shape, stride, padding, x_shape[1] // W_shape[1])
    assert conv._tiles(g) == tiles
    assert conv._stem_like(g) == (tiles and x_shape[1] == 3)  # an odd stem runs MEC


@pytest.mark.parametrize("case", [(3, 16, 4, 4, 16, 2, 3, 3, 1, 1),     # shifted copies
                                  (2, 16, 5, 6, 32, 2, 3, 3, 2, 1),     # strided taps
                                  (2, 16, 6, 8, 32, 2, 3, 3, 2, 1),     # strided phases
                                  (2, 24, 6, 5, 48, 3, 3, 2, (2, 1), (1, 0)),
                                  (2, 3, 14, 12, 64, 1, 7, 7, 2, 3),    # the stem's phases
                                  (4, 16, 2, 2, 16, 2, 3, 3, 1, 1),     # a whole-map conv
                                  (2, 8, 9, 9, 8, 2, 3, 3, 1, 1)],      # MEC
                         ids=_case_id)
def test_every_scratch_value_a_convolution_reads_was_written_first(monkeypatch, case):
    """The lowered blocks and cols live in reused, uninitialised buffers,
    and their padding is zeroed by fix-ups; the folded input gradient starts
    uninitialised too, each block writing its own part: hand out buffers and
    outputs full of NaN and the result still equals the reference (a value
    read unwritten, or an output left unwritten, shows)."""
    real, real_new = conv._scratch, conv.new_in_layout

    def poisoned(name, shape, dtype, xp):
        buf = real(name, shape, dtype, xp)
        buf[...] = numpy.nan
        return buf

    def poisoned_new(xp, shape, dtype, cnhw, zeros=False):
        a = real_new(xp, shape, dtype, cnhw, zeros)
        if not zeros:
            a[...] = numpy.nan
        return a

    monkeypatch.setattr(conv, "_scratch", poisoned)
    monkeypatch.setattr(conv, "new_in_layout", poisoned_new)
    monkeypatch.setattr(conv, "FOLD_MAX_PIXELS", 30)  # folded: all but the last two
    x, W, gy, _ = _conv_data(case, numpy.float64, 8)
    g, stride, padding = case[5], case[8], case[9]
    xc, gyc = cnhw(x, numpy.array), cnhw(gy, numpy.array)
    got = (conv._forward_fast(xc, W, stride, padding, g),
           conv._backward_data_fast(gyc, W, x.shape, stride, padding, g),
           conv._backward_weight_fast(gyc, xc, W.shape, stride, padding, g))
    expected = (naive_conv2d(x, W, None, _pair(stride), _pair(padding), g),
                conv.conv2d_backward_data_reference(gy, W, x.shape, stride, padding, g),
                conv.conv2d_backward_weight_reference(gy, x, W.shape, stride, padding, g))
    for a, b, name in zip(got, expected, ("forward", "backward data", "backward weight")):
        assert_close(a, b, 1e-10, scaled(b, 1e-12), f"{case} {name}")


@pytest.mark.parametrize("x_shape, W_shape, groups, stride, folds", [
    ((2, 3, 64, 64), (64, 3, 7, 7), 1, 2, True),         # the stem, on its stride phases
    ((2, 3, 64, 64), (64, 3, 7, 7), 1, 1, False),        # no stride: MEC
    ((2, 3, 48, 48), (16, 3, 7, 7), 1, 2, False),        # the demo's 16 outputs: MEC
    ((2, 8, 64, 64), (64, 8, 7, 7), 1, 2, False),        # 32 channels once split: MEC
    ((2, 16, 4, 4), (32, 16, 3, 3), 1, 1, True),         # one group, a small map
    ((2, 512, 4, 4), (512, 16, 3, 3), 32, 1, True),      # layer3 at 64x64: a 4x4 map
    ((2, 1024, 7, 7), (1024, 32, 3, 3), 32, 1, True),    # layer4 at 224x224
    ((2, 256, 8, 8), (256, 8, 3, 3), 32, 1, False),      # layer2 at 64x64: MEC
    ((2, 512, 14, 14), (512, 16, 3, 3), 32, 1, False),   # layer3 at 224x224: MEC
    ((2, 512, 8, 8), (512, 16, 3, 3), 32, 2, True),      # layer3's first at 64x64: onto 4x4
    ((2, 512, 28, 28), (512, 16, 3, 3), 32, 2, True),    # and at 224x224: onto 14x14
    ((2, 256, 16, 16), (256, 8, 3, 3), 32, 2, True),     # layer2's first: on its phases
    ((2, 256, 56, 56), (256, 8, 3, 3), 32, 2, True),     # and at 224x224
    ((2, 256, 15, 15), (256, 8, 3, 3), 32, 2, False),    # 8 per group, odd: MEC
    ((2, 512, 30, 30), (512, 16, 3, 3), 32, 2, True),    # onto 15x15, on its phases
    ((2, 512, 29, 29), (512, 16, 3, 3), 32, 2, False),   # onto 15x15, odd: MEC
    ((2, 512, 27, 27), (512, 16, 3, 3), 32, 2, True),    # onto 14x14, odd, 16 per group
    ((2, 8, 32, 32), (8, 8, 3, 3), 1, 2, False),         # one group of 8 outputs: MEC
    ((2, 128, 2, 2), (128, 4, 3, 3), 32, 1, False)])     # 4 outputs per group: MEC
def test_which_convolutions_run_folded(x_shape, W_shape, groups, stride, folds):
    g = conv._Geometry(x_shape, W_shape, stride, W_shape[2] // 2, groups)  # ResNeXt's padding
    x = numpy.zeros(x_shape, numpy.float32)
    assert conv._folds(cnhw(x, numpy.array), g) == folds
    assert not conv._folds(x, g)  # NCHW memory never folds


# (N, C, H, W, K, groups, R, S, stride, padding): maps of at most half the kernel's taps
WHOLE_MAP_CASES = [
    (4, 16, 2, 2, 16, 2, 3, 3, 1, 1),            # layer4's 2x2 maps at 64x64, 8 per group
    (5, 6, 3, 4, 6, 3, 5, 5, 2, 2),              # stride 2: 2x2 outputs, each tap two apart
    (3, 8, 1, 1, 8, 2, 3, 3, 1, 1),              # a 1x1 map: 8 of the 9 taps read only padding
    (2, 4, 3, 2, 6, 1, 5, 5, 1, 2),              # one group, a kernel larger than the image
    (3, 6, 2, 3, 6, 3, 3, 5, (1, 2), (1, 2)),    # strides, paddings, kernel sides unequal
    (4, 4, 1, 3, 4, 1, 3, 3, 1, (1, 0)),         # no padding along the width
]


@pytest.mark.parametrize("case", WHOLE_MAP_CASES, ids=_case_id)
def test_maps_no_larger_than_the_kernel_run_as_one_dense_map_equal_to_the_naive_loops(
        monkeypatch, case):
    """On such maps each group's convolution is one dense matrix from an
    image's values to its outputs, one GEMM per group in every direction:
    in NCHW and in CNHW memory it gives the naive loops' outputs and the
    reference's gradients (a tap no output reads gets a zero gradient)."""
    calls = []
    for name in ("_whole_map_forward", "_whole_map_backward_data", "_whole_map_backward_weight"):
        real = getattr(conv, name)
        monkeypatch.setattr(conv, name, lambda *a, _real=real, _name=name:
                            calls.append(_name) or _real(*a))
    x, W, gy, _ = _conv_data(case, numpy.float64, 9)
    g, stride, padding = case[5], case[8], case[9]
    assert conv._whole_map(conv._Geometry(x.shape, W.shape, stride, padding, g))
    expected = (naive_conv2d(x, W, None, _pair(stride), _pair(padding), g),
                conv.conv2d_backward_data_reference(gy, W, x.shape, stride, padding, g),
                conv.conv2d_backward_weight_reference(gy, x, W.shape, stride, padding, g))
    for layout in (numpy.array, lambda a: cnhw(a, numpy.array)):
        calls.clear()
        got = (conv.conv2d_forward(layout(x), W, stride, padding, g),
               conv.conv2d_backward_data(layout(gy), W, x.shape, stride, padding, g),
               conv.conv2d_backward_weight(layout(gy), layout(x), W.shape, stride, padding, g))
        assert calls == ["_whole_map_forward", "_whole_map_backward_data",
                         "_whole_map_backward_weight"]
        for a in got[:2]:
            assert cuda_device.is_cnhw(a) == cuda_device.is_cnhw(layout(x)), case
        for a, b, name in zip(got, expected, ("forward", "backward data", "backward weight")):
            assert_close(a, b, 1e-10, scaled(b, 1e-12), f"whole map {case} {name}")
    if case[2] * case[3] == 1:  # only the centre tap reads the image: the 8 others get 0
        unread = got[2].copy()
        unread[:, :, 1, 1] = 0
        assert not unread.any() and got[2][:, :, 1, 1].any()


@pytest.mark.parametrize("x_shape, W_shape, groups, stride, whole", [
    ((32, 1024, 2, 2), (1024, 32, 3, 3), 32, 1, True),   # layer4 at 64x64
    ((32, 1024, 1, 1), (1024, 32, 3, 3), 32, 1, True),   # layer4 at 32x32: a 1x1 map
    ((32, 512, 3, 3), (512, 16, 3, 3), 32, 1, False),    # 3x3 maps: as many pixels as taps
    ((32, 256, 3, 3), (256, 32, 3, 3), 8, 2, False),     # the demo's layer4: 3x3 onto 2x2
    ((32, 512, 4, 4), (512, 16, 3, 3), 32, 1, False),    # layer3 at 64x64
    ((16, 1024, 7, 7), (1024, 32, 3, 3), 32, 1, False),  # layer4 at 224x224
    ((4, 1024, 2, 2), (1024, 32, 3, 3), 32, 1, False),   # 4 images: Wmap > their im2col
    ((32, 1024, 2, 2), (2048, 1024, 1, 1), 1, 1, False)])  # 1x1: one GEMM already
def test_which_convolutions_run_as_the_dense_map_of_whole_images(x_shape, W_shape, groups,
                                                                 stride, whole):
    g = conv._Geometry(x_shape, W_shape, stride, W_shape[2] // 2, groups)  # ResNeXt's padding
    assert conv._whole_map(g) == whole


@pytest.mark.parametrize("x_shape, W_shape, stride, groups", [
    ((4, 3, 16, 16), (64, 3, 7, 7), 2, 1),      # the stem, folded on stride phases
    ((4, 128, 4, 4), (128, 8, 3, 3), 1, 16),    # folded, small GEMMs per group
    ((4, 64, 8, 8), (64, 2, 3, 3), 1, 32),      # MEC, small GEMMs per image
    ((4, 16, 8, 8), (16, 16, 3, 3), 1, 1)])     # MEC, one group
@pytest.mark.parametrize("min_macs, split", [(0, True), (1 << 40, False)])
def test_a_forward_splits_its_blocks_over_the_threads_when_large_enough(
        monkeypatch, x_shape, W_shape, stride, groups, min_macs, split):
    monkeypatch.setattr(conv, "THREADED_MIN_MACS", min_macs)
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1)  # one image per chunk
    monkeypatch.setattr(conv, "FOLD_BYTES", 1)   # one group and one image per block
    calls = []
    real = conv.cpu.run_blocks

    def spy(fn, n, min_rows=1):
        calls.append((n, n >= 2 * min_rows))
        return real(fn, n, min_rows)

    monkeypatch.setattr(conv.cpu, "run_blocks", spy)
    x = cnhw(numpy.ones(x_shape, numpy.float32), numpy.array)
    conv._forward_fast(x, numpy.ones(W_shape, numpy.float32), stride, W_shape[2] // 2, groups)
    assert calls and all(n >= 4 and splits == split for n, splits in calls), calls


@pytest.mark.parametrize("x_shape, W_shape, groups, split", [
    ((32, 128, 16, 16), (128, 4, 3, 3), 32, True),   # ResNeXt50's layer1, batch 32, 64x64
    ((32, 32, 12, 12), (32, 4, 3, 3), 8, False)])    # the demo's resnext_mini, 48x48
def test_the_bound_splits_resnext50s_grouped_convolutions_and_not_the_demos(
        x_shape, W_shape, groups, split):
    g = conv._Geometry(x_shape, W_shape, 1, 1, groups)
    N, C, H, W = x_shape
    assert g.macs == N * W_shape[0] * H * W * W_shape[1] * 9  # every output, every tap
    assert (g.macs >= conv.THREADED_MIN_MACS) == split


@pytest.mark.parametrize("x_shape, W_shape, stride, groups", [
    ((4, 64, 8, 8), (64, 2, 3, 3), 1, 32),     # MEC
    ((4, 128, 4, 4), (128, 8, 3, 3), 2, 16),   # folded, on stride phases
    ((4, 32, 2, 2), (32, 4, 3, 3), 1, 8)])     # the dense map of whole images
def test_backward_computes_gx_and_gw_side_by_side_with_the_bits_of_one_after_the_other(
        monkeypatch, x_shape, W_shape, stride, groups):
    """Conv2d.backward runs gx and gW on two threads (``cpu.side_by_side``)
    for kernels larger than 1x1; the gradients must be those of running
    them in turn, bit for bit, gW written into W's own gradient array."""
    monkeypatch.setenv("MINITORCH_GX_THREADS", "2")
    rng = numpy.random.default_rng(4)
    x = cnhw(_random(x_shape, rng).astype(numpy.float32), numpy.array)
    W = _random(W_shape, rng).astype(numpy.float32)
    gy = None
    pairs = []
    real = conv.cpu.side_by_side
    monkeypatch.setattr(conv.cpu, "side_by_side", lambda f, g: pairs.append(1) or real(f, g))
    grads = {}
    for way in ("side by side", "in turn"):
        if way == "in turn":
            monkeypatch.setattr(conv, "_side_by_side", lambda gy, W: False)
        xt, Wt = mt.Tensor(x.copy(), requires_grad=True), mt.Tensor(W.copy(), requires_grad=True)
        Wt.grad, Wt.grad_is_zero = numpy.zeros_like(W), True  # as SGD.zero_grad leaves it
        W_grad = Wt.grad
        y = conv2d(xt, Wt, None, stride, 1, groups)
        if gy is None:
            gy = _random(y.shape, rng).astype(numpy.float32)
        (y * mt.Tensor(gy)).sum().backward()  # y's gradient: gy
        assert Wt.grad is W_grad  # gW written into W's own gradient array
        grads[way] = (xt.grad.copy(), Wt.grad.copy())
    assert pairs == [1]  # side by side once, in turn without it
    for a, b in zip(grads["side by side"], grads["in turn"]):
        assert a.tobytes() == b.tobytes()
    expected = (conv.conv2d_backward_data_reference(gy, W, x.shape, stride, 1, groups),
                conv.conv2d_backward_weight_reference(gy, x, W.shape, stride, 1, groups))
    for got, want in zip(grads["side by side"], expected):
        assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_which_backwards_run_side_by_side():
    grouped, pointwise = (numpy.ones(s, numpy.float32) for s in ((8, 2, 3, 3), (8, 8, 1, 1)))
    gy = numpy.ones((2, 8, 4, 4), numpy.float32)
    assert conv._side_by_side(gy, grouped)
    assert not conv._side_by_side(gy, pointwise)  # its GEMMs use OpenBLAS's own threads
    with backend.implementation("reference"):
        assert not conv._side_by_side(gy, grouped)
    with backend.emulate_kernels():  # the kernels' launchers, not the NumPy fast path
        assert not conv._side_by_side(gy, grouped)


def test_a_1x1_conv_on_cnhw_memory_reads_x_in_place_on_the_numpy_path():
    """One GEMM over the batch reading x's own memory: y's memory is the
    GEMM's output, x is never copied (a copy would show as a new base)."""
    rng = numpy.random.default_rng(2)
    x = cnhw(rng.standard_normal((4, 8, 6, 5)), numpy.array)
    W = rng.standard_normal((12, 8, 1, 1))
    g = conv._Geometry(x.shape, W.shape, 1, 0, 1)
    matrix = conv._channel_matrix(x, 1)
    assert numpy.shares_memory(matrix, x) and matrix.shape == (1, 8, 4 * 30)
    y = conv._pointwise_forward(x, W, g)
    assert cuda_device.is_cnhw(y) and y.base is not None and y.base.shape == (1, 12, 4 * 30)


def test_writes_through_a_view_never_land_in_a_copy():
    a = numpy.zeros((2, 3, 4, 5)).transpose(1, 0, 2, 3)  # CNHW memory
    conv._view_as(a, (3, 2, 20))[0, 0, 0] = 1  # merging (H, W): a view
    assert a[0, 0, 0, 0] == 1
    with pytest.raises(AttributeError):
        conv._view_as(a, (3, 40))  # merging (N, H, W) of this memory needs a copy


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", [CONV_CASES[2], CNHW_CASES[-2]], ids=_case_id)
def test_the_weight_gradient_accumulates_into_the_array_it_is_given(impl, case):
    x, W, gy, _ = _conv_data(case, numpy.float32, 4)
    g, stride, padding = case[5], case[8], case[9]
    with run_on(impl) as dev:
        expected = cuda_conv.conv2d_backward_weight(dev(gy), dev(x), W.shape, stride, padding, g)
        out = dev(numpy.zeros(W.shape, numpy.float32))
        got = cuda_conv.conv2d_backward_weight(dev(gy), dev(x), W.shape, stride, padding, g,
                                               out=out)
        assert got is out
        with pytest.raises(ValueError, match="out must be C-contiguous"):
            cuda_conv.conv2d_backward_weight(dev(gy), dev(x), W.shape, stride, padding, g,
                                             out=dev(numpy.zeros(W.shape, numpy.float64)))
    assert_close(got, expected, 1e-5, scaled(expected, 1e-5), f"{impl} {case} gW into out")


def test_a_1x1_conv_on_cnhw_memory_is_one_gemm_and_no_copy():
    from minitorch_gx.cuda import trace
    x = numpy.ones((2, 8, 6, 5), numpy.float32)
    W = numpy.ones((12, 8, 1, 1), numpy.float32)
    with trace.fake_gpu() as launches:
        xt = cnhw(x, trace.to_gpu)
        y = cuda_conv.conv2d_forward(xt, trace.to_gpu(W), 1, 0, 1)
        gx = cuda_conv.conv2d_backward_data(y, trace.to_gpu(W), x.shape, 1, 0, 1)
        gW = cuda_conv.conv2d_backward_weight(y, xt, W.shape, 1, 0, 1,
                                              out=trace.to_gpu(numpy.zeros(W.shape, numpy.float32)))
    assert [launch.name for launch in launches] == ["cuBLAS GEMM (matmul)"] * 3
    assert cuda_device.is_cnhw(y) and cuda_device.is_cnhw(gx) and gW.shape == W.shape


@pytest.mark.parametrize("shape, kernel, padding", [((2, 4, 5, 7), 3, 1), ((1, 3, 6, 6), 5, 2),
                                                     ((3, 2, 1, 4), 3, 1)])
def test_lowering_by_row_shifts_equals_the_windowed_lowering(shape, kernel, padding):
    """The fast path's lowering for stride-1 "same" convolutions (one long
    shifted copy per tap) fills exactly what the general one fills."""
    x = numpy.random.default_rng(3).standard_normal(shape)
    g = conv._Geometry(shape, (4, shape[1], kernel, kernel), (1, 1), (padding, padding), 1)
    assert conv._shifts_along_rows(x, g)
    fast, general = (numpy.full(g.lowered_shape(shape[0]), numpy.nan) for _ in range(2))
    conv._lower_by_shifts(x, g, fast)
    for s, f, (h0, h1, q0, q1), (rows, cols) in conv._lowered_windows(g):  # the general rule
        general[:, :, s, f] = 0
        general[:, :, s, f, h0:h1, q0:q1] = x[:, :, rows, cols]
    numpy.testing.assert_array_equal(fast, general)


@pytest.mark.parametrize("layout, stride", [("cnhw", 1), ("cnhw", 2), ("nchw", 1)])
def test_a_1x1_weight_gradient_is_written_into_the_array_it_is_given(monkeypatch, layout,
                                                                     stride):
    """On the NumPy path the one GEMM of a CNHW 1x1 weight gradient writes
    into ``out`` itself (the parameter's gradient array: no temporary and no
    copy after); every path returns ``out`` holding the reference's values,
    also for an ``out`` that is not contiguous."""
    rng = numpy.random.default_rng(11)
    x, W = _random((3, 8, 6, 4), rng), _random((12, 4, 1, 1), rng)
    y_shape = (3, 12, 6 // stride, 4 // stride)
    gy = _random(y_shape, rng)
    expected = conv.conv2d_backward_weight_reference(gy, x, W.shape, stride, 0, 2)
    as_layout = (lambda a: cnhw(a, numpy.array)) if layout == "cnhw" else (lambda a: a)
    outs, real = [], numpy.matmul

    def spy(*args, **kwargs):
        outs.append(kwargs.get("out"))
        return real(*args, **kwargs)

    monkeypatch.setattr(numpy, "matmul", spy)
    out = numpy.zeros(W.shape)
    got = conv.conv2d_backward_weight(as_layout(gy), as_layout(x), W.shape, stride, 0, 2, out=out)
    assert got is out
    assert_close(out, expected, 1e-12, scaled(expected, 1e-12), f"{layout} gW into out")
    if layout == "cnhw":
        assert len(outs) == 1 and numpy.shares_memory(outs[0], out)
    strided = numpy.zeros(W.shape[::-1]).T  # W's shape, Fortran order
    assert not strided.flags.c_contiguous
    got = conv.conv2d_backward_weight(as_layout(gy), as_layout(x), W.shape, stride, 0, 2,
                                      out=strided)
    assert got is strided
    assert_close(strided, expected, 1e-12, scaled(expected, 1e-12), f"{layout} gW into a view")
