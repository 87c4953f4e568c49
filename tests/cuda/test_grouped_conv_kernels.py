"""kernels/grouped_conv.cu and grouped_conv_bwd_weight.cu against the kernels
they replaced, kept as reference kernels in tests/cuda/reference_kernels/
(llm.c-style: the old kernel beside the new one, run on the same inputs), and
the code paths only the new kernels have. All through the CPU emulator, every
sanitizer check on:

1. old and new agree on ResNeXt50's group widths (4, 8, 16, 32 channels),
   small batches and maps (7x7 and odd sizes), stride 1 and 2, NCHW and CNHW
   memory, float32 and float64, and on the 7x7 stride-2 stem;
2. every block size the launchers allow, under every schedule: the same bits
   each time, and the reference's values;
3. the new paths, against the NumPy reference: several chunks of channels and
   several column tiles (the launchers' shared pools shrunk), gradient phases
   no tap reaches, weight-gradient boxes and splits, and the checks that
   stop a launch that would not fit;
4. the SASS of the new kernels (where nvcc and cuobjdump are installed): no
   run-time integer division in any loop, mostly FMAs in the main loops;
5. conv.py's copies of the kernels' constants.
(tests/ops/test_conv.py checks the launchers against the NumPy reference.)
"""
import re
import sys
import zlib
from pathlib import Path

import numpy
import pytest

from minitorch_gx.cuda import conv as cuda_conv
from minitorch_gx.cuda import device as cuda_device
from minitorch_gx.cuda import emulator
from minitorch_gx.ops import conv
from tests.backends import assert_close, launch_shapes, needs_emulator, scaled

pytestmark = needs_emulator

REFERENCE_KERNELS = Path(__file__).with_name("reference_kernels")
KERNELS = emulator.kernel_dir()
_REAL = {4: "float", 8: "double"}


# --------------------------------------------------------------------------
# The replaced kernels, launched as their launcher (conv.py before them) did
# --------------------------------------------------------------------------
def _old_module(file, dtype, threads_name, threads):
    defines = tuple(sorted([("REAL", _REAL[numpy.dtype(dtype).itemsize]),
                            (threads_name, threads)]))
    return emulator.build(str(REFERENCE_KERNELS / file), defines)


def _i32(values):
    return [numpy.int32(v) for v in values]


def old_conv(kernel, src, W, dst_shape, geo, threads):
    """grouped_conv_v1.cu's forward or backward-data kernel: BM x BN tiles,
    BN = THREADS*16/BM pixels, grid (ceil(J / BN), G * ceil(M / BM))."""
    dev = emulator.device()
    n, c, h, w, k, p, q, g = geo[:8]
    data = kernel.endswith("data")
    rows = c // g if data else k // g
    bm = cuda_conv._tile_rows(rows)
    cols = n * (h * w if data else p * q)
    src_memory, ssn, ssc = cuda_device.planes(dev, src, src.dtype)
    dst, dst_memory, dsn, dsc = cuda_device.empty_planes(dev, dst_shape, src.dtype,
                                                         cuda_device.is_cnhw(src))
    module = _old_module("grouped_conv_v1.cu", src.dtype, "CONV_THREADS", threads)
    grid = (-(-cols // (threads * 16 // bm)), g * -(-rows // bm))
    module.launch(kernel, grid, threads, [src_memory, dev.input(W, src.dtype), dst_memory] +
                  _i32(geo) + _i32([bm, ssn, ssc, dsn, dsc]))
    return dst


def old_bwd_weight(gy, x, W_shape, geo, threads):
    """grouped_conv_bwd_weight_v1.cu: pieces of 4 channels x 9 taps, pixels split."""
    dev = emulator.device()
    n, c, h, w, k, p, q, g, r, s = geo[:10]
    gy_memory, gysn, gysc = cuda_device.planes(dev, gy, gy.dtype)
    x_memory, xsn, xsc = cuda_device.planes(dev, x, x.dtype)
    pieces = g * (c // g) * -(-(k // g) // 4) * -(-(r * s) // 9)
    pixels = n * p * q
    splits = -(-pixels // (threads * 32))
    if pieces * splits < 1024:
        splits = max(splits, min(-(-pixels // (threads * 4)), -(-1024 // pieces)))
    gW = dev.zeros(tuple(W_shape), gy.dtype)
    module = _old_module("grouped_conv_bwd_weight_v1.cu", gy.dtype, "WGRAD_THREADS", threads)
    module.launch("grouped_conv2d_bwd_weight", (pieces, max(1, min(splits, 65535))), threads,
                  [gy_memory, x_memory, gW] + _i32(geo) + _i32([gysn, gysc, xsn, xsc]))
    return gW


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------
def _as_cnhw(a):
    """The logical (N, C, H, W) array ``a`` held in C-contiguous (C, N, H, W) memory."""
    return numpy.ascontiguousarray(a.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)


def _data(case, dtype, layout, seed):
    """x, W, gy for case (N, C, K, groups, H, W, R, stride, pad), in ``layout``."""
    n, c, k, g, h, w, r, stride, pad = case
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    W = (rng.standard_normal((k, c // g, r, r)) / numpy.sqrt(c // g * r * r)).astype(dtype)
    p, q = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - r) // stride + 1
    gy = rng.standard_normal((n, k, p, q)).astype(dtype)
    if layout == "CNHW":
        x, gy = _as_cnhw(x), _as_cnhw(gy)
    return x, W, gy


def _new(x, W, gy, case):
    """y, gx, gW from the launchers of the new kernels."""
    g, stride, pad = case[3], case[7], case[8]
    return (cuda_conv.conv2d_forward(x, W, stride, pad, g),
            cuda_conv.conv2d_backward_data(gy, W, x.shape, stride, pad, g),
            cuda_conv.conv2d_backward_weight(gy, x, W.shape, stride, pad, g))


def _reference(x, W, gy, case):
    """y, gx, gW from ops/conv.py's plain references (float64)."""
    g, stride, pad = case[3], case[7], case[8]
    x, W, gy = (numpy.asarray(a, numpy.float64) for a in (x, W, gy))
    return (conv.conv2d_forward_reference(x, W, stride, pad, g),
            conv.conv2d_backward_data_reference(gy, W, x.shape, stride, pad, g),
            conv.conv2d_backward_weight_reference(gy, x, W.shape, stride, pad, g))


def _schedule(request):
    """One of the emulator's schedules, picked from the test's id (as tests/ops/conftest.py)."""
    crc = zlib.crc32(request.node.nodeid.encode())
    return emulator.schedule(emulator.SCHEDULES[crc % len(emulator.SCHEDULES)], seed=crc)


def _tolerance(dtype, ref):
    return (1e-12, 1e-12 * max(1.0, float(numpy.abs(ref).max()))) if dtype == numpy.float64 \
        else (1e-5, scaled(ref, 1e-5))


NAMES = ("forward", "backward data", "backward weight")


# ==========================================================================
# 1. Old and new kernels agree
# ==========================================================================
# (N, C, K, groups, H, W, R, stride, pad): ResNeXt50's group widths, its
# stride-2 first blocks, 7x7 and odd maps; its 32 groups of 4; the stem
CASES = [
    (2, 16, 16, 4, 7, 7, 3, 1, 1),      # 4 per group, 7x7 (layer4's map)
    (2, 16, 16, 4, 9, 11, 3, 2, 1),     # 4 per group, stride 2, odd
    (2, 128, 128, 32, 5, 6, 3, 1, 1),   # 32 groups of 4, as layer1
    (1, 16, 16, 2, 14, 14, 3, 1, 1),    # 8 per group, 14x14
    (2, 16, 16, 2, 7, 9, 3, 2, 1),      # 8 per group, stride 2
    (1, 32, 32, 2, 7, 7, 3, 1, 1),      # 16 per group
    (2, 32, 32, 2, 6, 5, 3, 2, 1),      # 16 per group, stride 2, even
    (1, 64, 64, 2, 7, 7, 3, 1, 1),      # 32 per group, 7x7 (layer4)
    (1, 64, 64, 2, 9, 7, 3, 2, 1),      # 32 per group, stride 2
    (1, 3, 64, 1, 17, 15, 7, 2, 3),     # the stem: 7x7 stride 2, groups 1, K = 64
]
# block sizes cycled over the cases: (CONV_THREADS, WGRAD_THREADS)
THREADS = [(256, 256), (128, 96), (64, 64), (32, 32)]


def _case_id(case):
    n, c, k, g, h, w, r, stride, pad = case
    return f"{n}x{c}x{h}x{w}-k{k}-g{g}-{r}x{r}s{stride}"


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["NCHW", "CNHW"])
@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_old_and_new_kernels_agree(index, layout, dtype, request):
    case = CASES[index]
    conv_threads, wgrad_threads = THREADS[index % len(THREADS)]
    x, W, gy = _data(case, dtype, layout, seed=index)
    geo = cuda_conv._conv_geometry(x.shape, W.shape, case[7], case[8], case[3])
    with _schedule(request), launch_shapes(CONV_THREADS=conv_threads,
                                           WGRAD_THREADS=wgrad_threads):
        new = _new(x, W, gy, case)
        old = (old_conv("grouped_conv2d_fwd", x, W, gy.shape, geo, conv_threads),
               old_conv("grouped_conv2d_bwd_data", gy, W, x.shape, geo, conv_threads),
               old_bwd_weight(gy, x, W.shape, geo, wgrad_threads))
    for got, want, name in zip(new, old, NAMES):
        assert got.dtype == dtype and got.shape == want.shape, name
        if name != "backward weight":  # written in the input's layout
            assert cuda_device.is_cnhw(got) == cuda_device.is_cnhw(want), name
        rtol, atol = _tolerance(dtype, want)
        assert_close(got, want, rtol, atol, f"{case} {layout} {name}: new vs old kernel")


# ==========================================================================
# 2. Every block size, every schedule: the same bits, the reference's values
# ==========================================================================
SCHEDULED = [(2, 16, 16, 4, 7, 9, 3, 2, 1),   # CONV_TM = 4, WGRAD_TK = 4, phases
             (2, 32, 48, 2, 5, 7, 3, 1, 1)]   # Kg = 24, Cg = 16: TM = 8, TK = 8, partial tiles


# (and the largest weight-gradient block the launcher allows in float32: 31
# warps, a prime, so one thread group of 992 lanes)
@pytest.mark.parametrize("threads", THREADS + [(256, 992)], ids=lambda t: f"{t[0]}-{t[1]}")
@pytest.mark.parametrize("case", SCHEDULED, ids=_case_id)
def test_every_block_size_under_every_schedule(case, threads):
    x, W, gy = _data(case, numpy.float32, "CNHW", seed=7)
    geo = cuda_conv._conv_geometry(x.shape, W.shape, case[7], case[8], case[3])
    with launch_shapes(CONV_THREADS=threads[0], WGRAD_THREADS=threads[1]):
        (_, splits, _), _, _ = cuda_conv._wgrad_plan(geo, threads[1], 4,
                                                     cuda_conv.WGRAD_POOL_BYTES)
        assert splits <= 2  # at most two atomicAdds onto zero per element: order-free
        runs = {}
        for order in emulator.SCHEDULES:
            with emulator.schedule(order, seed=3):
                runs[order] = [numpy.array(a) for a in _new(x, W, gy, case)]
    for order, arrays in runs.items():
        for got, want, name in zip(arrays, runs["forward"], NAMES):
            assert got.tobytes() == want.tobytes(), f"{name}: the {order} schedule changes it"
    for got, want, name in zip(runs["forward"], _reference(x, W, gy, case), NAMES):
        assert_close(got, want, 1e-5, scaled(want, 1e-5), f"{case} {threads} {name}")


# ==========================================================================
# 3. The new kernels' own paths, against the reference
# ==========================================================================
@pytest.fixture
def small_pools(monkeypatch):
    """Shared pools of 2 KiB (grouped_conv.cu) and 4 KiB (the weight gradient,
    64 threads): blocks must cut their channels into chunks and the launchers
    the output columns into tiles. (The launchers pass the sizes as -D defines.)"""
    monkeypatch.setattr(cuda_conv, "CONV_POOL_BYTES", 2048)
    monkeypatch.setattr(cuda_conv, "WGRAD_POOL_BYTES", 4096)
    with launch_shapes(CONV_THREADS=64, WGRAD_THREADS=64):
        yield


# (N, C, K, groups, H, W, R, stride, pad)
SMALL_POOL_CASES = [
    (1, 8, 8, 2, 5, 37, 3, 1, 1),       # one channel per chunk, four chunks
    (1, 8, 8, 2, 5, 100, 3, 1, 1),      # a padded row too wide: two column tiles
    (2, 12, 8, 2, 6, 61, 3, 2, 1),      # stride 2: backward phases and tiles
    (1, 3, 4, 1, 11, 41, 7, 2, 3),      # a 7x7 stem: few channels, wide filter
    (2, 16, 16, 2, 9, 9, 1, 2, 0),      # 1x1 stride 2: phases no tap reaches
]


def _plan(case):
    """(BM, CONV_TM, grid) of grouped_conv.cu's forward launch for case."""
    n, c, k, g, h, w, r, stride, pad = case
    geo = cuda_conv._conv_geometry((n, c, h, w), (k, c // g, r, r), stride, pad, g)
    return cuda_conv._conv_plan("grouped_conv2d_fwd", geo, k // g,
                                cuda_device.LAUNCH["CONV_THREADS"], 4, cuda_conv.CONV_POOL_BYTES)


@pytest.mark.parametrize("case", SMALL_POOL_CASES, ids=_case_id)
def test_chunks_and_column_tiles_match_the_reference(case, small_pools, monkeypatch, request):
    monkeypatch.setattr(cuda_conv, "GEMM_FOR_1X1", False)  # (1x1 too: through the kernels)
    x, W, gy = _data(case, numpy.float32, "CNHW", seed=5)
    with _schedule(request):
        got = _new(x, W, gy, case)
    for a, want, name in zip(got, _reference(x, W, gy, case), NAMES):
        assert_close(a, want, 1e-5, scaled(want, 1e-5), f"{case} {name}")


def test_the_small_pools_reach_chunks_and_column_tiles(small_pools):
    """The cases above do what they claim: a wide row takes several column
    tiles, and a block's channels several chunks."""
    assert _plan(SMALL_POOL_CASES[1])[2][2] == 2      # grid z: two column tiles
    bm, tm, grid = _plan(SMALL_POOL_CASES[0])
    assert grid[2] == 1 and (bm, tm) == (4, 4)
    # one block holds all 185 pixels: 7 rows of 39 columns per channel, and
    # 9 taps x BM weights; the 2 KiB pool has room for one channel of 4
    n, c, k, g, h, w, r, stride, pad = SMALL_POOL_CASES[0]
    pitch = (h + r - 1) * (w + 2 * pad)
    assert (2048 // 4 - 3) // (pitch + r * r * bm) == 1 < c // g


def test_a_launch_that_cannot_fit_is_refused_or_trapped(monkeypatch):
    """The launcher refuses a filter whose taps alone overflow the pool (a
    ValueError naming the cause); a kernel launched with too few column
    tiles for its pool stops with __trap instead of writing past its tile."""
    monkeypatch.setattr(cuda_conv, "CONV_POOL_BYTES", 512)
    x = numpy.zeros((1, 2, 9, 9), numpy.float32)
    with pytest.raises(ValueError, match="do not fit in the kernels' shared memory"):
        cuda_conv.conv2d_forward(x, numpy.zeros((32, 2, 5, 5), numpy.float32), 1, 2, 1)
    dev = emulator.device()
    x, W = dev.zeros((1, 4, 5, 40), numpy.float32), dev.zeros((4, 4, 3, 3), numpy.float32)
    y = dev.empty((1, 4, 5, 40), numpy.float32)
    # N C H W K P Q G R S sh sw ph pw BM, then x's and y's image and channel strides
    dims = [1, 4, 5, 40, 4, 5, 40, 1, 3, 3, 1, 1, 1, 1, 4, 800, 200, 800, 200]
    module = emulator.build("grouped_conv.cu", (("CONV_POOL_BYTES", 512), ("CONV_THREADS", 64),
                                                ("CONV_TM", 4), ("REAL", "float")))
    with pytest.raises(emulator.EmuError, match="__trap"):
        module.launch("grouped_conv2d_fwd", (1, 1, 1), 64, [x, W, y] + _i32(dims))


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=["f32", "f64"])
def test_weight_gradient_boxes_and_splits(dtype, monkeypatch, request):
    """Many boxes of pixels, several per split, and several splits adding into
    gW; a group of 6 output channels (a partial tile of 8) and 3x3 combos."""
    monkeypatch.setattr(cuda_conv, "WGRAD_POOL_BYTES", 4096)
    case = (3, 12, 12, 2, 25, 40, 3, 1, 1)
    x, W, gy = _data(case, dtype, "NCHW", seed=9)
    geo = cuda_conv._conv_geometry(x.shape, W.shape, 1, 1, 2)
    with launch_shapes(WGRAD_THREADS=32), _schedule(request):
        (pieces, splits, tiles), (agk, agc, box, rows), tk = cuda_conv._wgrad_plan(
            geo, 32, numpy.dtype(dtype).itemsize, cuda_conv.WGRAD_POOL_BYTES)
        boxes = -(-3 * 25 * 40 // box)
        assert splits > 1 and boxes > splits and tk == 8  # the paths this test is for
        gW = cuda_conv.conv2d_backward_weight(gy, x, W.shape, 1, 1, 2)
    want = _reference(x, W, gy, case)[2]
    rtol, atol = (1e-11, 1e-11 * float(numpy.abs(want).max())) if dtype == numpy.float64 \
        else (1e-5, scaled(want, 1e-5))
    assert_close(gW, want, rtol, atol, "backward weight over boxes and splits")


# (N, C, K, groups, H, W, R, stride, pad): filters whose combos (c, r, s) do
# not come 9 to a channel, and gradient phases no tap reaches
ODD_FILTERS = [
    (2, 18, 8, 1, 5, 6, 1, 1, 0),       # 1x1: 9 channels per thread group
    (1, 4, 6, 2, 9, 8, 5, 1, 2),        # 5x5: combos across channels
    (2, 4, 4, 1, 8, 7, 2, 3, 0),        # 2x2 stride 3: no tap reaches h or w = 2 (mod 3)
    (1, 6, 6, 6, 7, 7, 3, 2, 1),        # depthwise 3x3 stride 2
]


@pytest.mark.parametrize("case", ODD_FILTERS, ids=_case_id)
def test_odd_filters_and_phases_match_the_reference(case, monkeypatch, request):
    monkeypatch.setattr(cuda_conv, "GEMM_FOR_1X1", False)
    x, W, gy = _data(case, numpy.float64, "NCHW", seed=2)
    with _schedule(request):
        got = _new(x, W, gy, case)
    for a, want, name in zip(got, _reference(x, W, gy, case), NAMES):
        assert_close(a, want, 1e-12, 1e-12 * max(1.0, float(numpy.abs(want).max())),
                     f"{case} {name}")


# ==========================================================================
# 4. The SASS of the new kernels
# ==========================================================================
def _sass_tools():
    sys.path.insert(0, str(KERNELS.parent / "benchmarks"))
    import conv_sass
    try:
        return conv_sass, conv_sass.find_nvcc(), conv_sass.find_cuobjdump()
    except SystemExit as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("file,kernel,defines,least", [
    ("grouped_conv.cu", "grouped_conv2d_fwd", (("CONV_TM", 4),), 0.6),
    ("grouped_conv.cu", "grouped_conv2d_bwd_data", (), 0.7),
    ("grouped_conv_bwd_weight.cu", "grouped_conv2d_bwd_weight", (("WGRAD_TK", 4),), 0.55),
    ("grouped_conv_bwd_weight.cu", "grouped_conv2d_bwd_weight", (), 0.65),
])
def test_main_loops_are_fmas_and_no_loop_divides(file, kernel, defines, least, tmp_path):
    """nvcc for sm_90 with the launchers' defines; benchmarks/conv_sass.py's
    reading of the SASS: the main loop is mostly FFMA, and no loop of the
    kernel holds an integer division (I2F.RP + MUFU.RCP, IMAD.HI or a call)."""
    conv_sass, nvcc, cuobjdump = _sass_tools()
    threads = "CONV_THREADS" if file == "grouped_conv.cu" else "WGRAD_THREADS"
    defines = tuple(sorted(defines + (("REAL", "float"), (threads, 256))))
    code = conv_sass.sass(KERNELS / file, defines, "sm_90", nvcc, cuobjdump, tmp_path)[kernel]
    best, _ = conv_sass.main_loop(code, "FFMA")
    main = conv_sass.stats(code, best, "FFMA")
    assert main["fma"] >= least * main["instructions"], main
    for loop in conv_sass.loops(code):
        found = conv_sass.stats(code, loop, "FFMA")
        assert conv_sass.division(found) == "none", (loop, found)


# ==========================================================================
# 5. conv.py's copies of the kernels' constants
# ==========================================================================
def _defined(file, name):
    text = (KERNELS / file).read_text()
    m = re.search(rf"^#\s*define\s+{name}\s+\(?([\d\s*]+)\)?", text, re.MULTILINE)
    assert m, f"{file} defines no {name}"
    return eval(m.group(1))  # a product of integer literals, e.g. "47 * 1024"


@pytest.mark.parametrize("file,name,copy", [
    ("grouped_conv.cu", "TN", "CONV_TN"),
    ("grouped_conv.cu", "CONV_POOL_BYTES", "CONV_POOL_BYTES"),
    ("grouped_conv_bwd_weight.cu", "BOX_MAX", "WGRAD_BOX_MAX"),
    ("grouped_conv_bwd_weight.cu", "SUMS", "WGRAD_SUMS"),
    ("grouped_conv_bwd_weight.cu", "WGRAD_POOL_BYTES", "WGRAD_POOL_BYTES"),
])
def test_the_launchers_know_the_kernels_constants(file, name, copy):
    assert getattr(cuda_conv, copy) == _defined(file, name)
    if copy in cuda_conv._FILE_DEFAULTS:
        assert cuda_conv._FILE_DEFAULTS[copy] == _defined(file, name)
