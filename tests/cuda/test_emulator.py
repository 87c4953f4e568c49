"""The CPU emulator for CUDA kernels (minitorch_gx/cuda/emulator.py, kernels/emu/):
barriers, shared memory, warp operations, atomics, and the errors it reports.

Small test kernels, each checked against what CUDA specifies, so that the
kernel tests (tests/ops/*, the "emulated" implementation) can trust a pass.
"""
import numpy
import pytest

from minitorch_gx.cuda import emulator

pytestmark = pytest.mark.skipif(not emulator.compiler_available(),
                                reason="the CUDA emulator needs a C++ compiler (g++)")

SOURCE = r"""
// y[i] = x[block's last index - i]: needs the barrier between write and read.
extern "C" __global__ void block_reverse(const float* x, float* y) {
    __shared__ float buf[1024];
    int base = blockIdx.x * blockDim.x, t = threadIdx.x;
    buf[t] = x[base + t];
    __syncthreads();
    y[base + t] = buf[blockDim.x - 1 - t];
}

// Sum of x[0..n) by a tree in dynamic shared memory; threads t >= n return
// first, which must not stall the barriers of the others.
extern "C" __global__ void early_exit_sum(const float* x, float* out, int n) {
    extern __shared__ float part[];
    int t = threadIdx.x;
    if (t >= n) return;
    part[t] = x[t];
    __syncthreads();
    for (int s = 1; s < n; s *= 2) {
        float v = (t % (2 * s) == 0 && t + s < n) ? part[t + s] : 0.f;
        __syncthreads();
        part[t] += v;
        __syncthreads();
    }
    if (t == 0) out[0] = part[0];
}

// Threads 0..4 meet the others' first barrier at their second one.
extern "C" __global__ void divergent_barrier(float* x) {
    if (threadIdx.x < 5) __syncthreads();
    __syncthreads();
    x[threadIdx.x] = 1.f;
}

extern "C" __global__ void deadlock(float* x) {
    if (threadIdx.x == 0) __syncwarp();
    else __syncthreads();
}

// out[kind][i] for the shuffle variants at the given width.
extern "C" __global__ void shuffles(const float* x, float* out, int delta, int width) {
    int i = threadIdx.x, n = blockDim.x;
    float v = x[i];
    out[0 * n + i] = __shfl_down_sync(0xffffffffu, v, delta, width);
    out[1 * n + i] = __shfl_up_sync(0xffffffffu, v, delta, width);
    out[2 * n + i] = __shfl_xor_sync(0xffffffffu, v, delta, width);
    out[3 * n + i] = __shfl_sync(0xffffffffu, v, delta, width);
}

extern "C" __global__ void votes(const int* p, unsigned* ballot, int* any, int* all) {
    int i = threadIdx.x;
    ballot[i] = __ballot_sync(0xffffffffu, p[i]);
    any[i] = __any_sync(0xffffffffu, p[i]);
    all[i] = __all_sync(0xffffffffu, p[i]);
}

extern "C" __global__ void shuffle_after_exit(float* x) {
    if (threadIdx.x == 3) return;
    x[threadIdx.x] = __shfl_down_sync(0xffffffffu, x[threadIdx.x], 1);
}

extern "C" __global__ void count_and_sum(int* counter, float* total, double* total64) {
    atomicAdd(counter, 1);
    atomicAdd(total, 0.5f);
    atomicAdd(total64, 0.25);
}

extern "C" __global__ void read_unwritten_shared(float* y) {
    __shared__ float s[64];
    if (blockIdx.x == 0) s[threadIdx.x] = 1.f;  // block 1 never writes s
    __syncthreads();
    y[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
}

extern "C" __global__ void write_past_end(float* y, int n) {
    y[n + threadIdx.x] = 1.f;
}

// Where each thread of a 3-D launch lands.
extern "C" __global__ void coordinates(int* out) {
    int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    int i = b * blockDim.x * blockDim.y * blockDim.z + t;
    out[4 * i + 0] = threadIdx.x + 10 * threadIdx.y + 100 * threadIdx.z;
    out[4 * i + 1] = blockIdx.x + 10 * blockIdx.y + 100 * blockIdx.z;
    out[4 * i + 2] = blockDim.x + 10 * blockDim.y + 100 * blockDim.z;
    out[4 * i + 3] = gridDim.x + 10 * gridDim.y + 100 * gridDim.z;
}

extern "C" __global__ void takes_types(const double* d, long long n, float f) {}
"""


@pytest.fixture(scope="module")
def mod():
    return emulator.build_source(SOURCE, "emulator_selftest.cu")


@pytest.fixture(scope="module")
def dev():
    return emulator.device()


@pytest.mark.parametrize("threads,workers", [(32, 1), (96, 2), (1024, 1)])
def test_barrier_orders_shared_memory(mod, dev, threads, workers):
    blocks = 3
    x = dev.input(numpy.arange(blocks * threads, dtype=numpy.float32), numpy.float32)
    y = dev.empty(x.shape, numpy.float32)
    mod.launch("block_reverse", blocks, threads, [x, y], workers=workers)
    expected = x.reshape(blocks, threads)[:, ::-1].ravel()
    numpy.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("n", [1, 5, 37, 64])
def test_threads_that_return_leave_the_barrier(mod, dev, n):
    x = dev.input(numpy.arange(1, 65, dtype=numpy.float32), numpy.float32)
    out = dev.zeros(1, numpy.float32)
    mod.launch("early_exit_sum", 1, 96, [x, out, numpy.int32(n)], shared_mem=96 * 4)
    assert out[0] == n * (n + 1) / 2


def test_divergent_barrier_is_reported(mod, dev):
    with pytest.raises(emulator.EmuError, match="different __syncthreads"):
        mod.launch("divergent_barrier", 1, 64, [dev.zeros(1, numpy.float32)])


def test_deadlock_is_reported_not_hung(mod, dev):
    with pytest.raises(emulator.EmuError, match="deadlock"):
        mod.launch("deadlock", 1, 64, [dev.zeros(1, numpy.float32)])


def _expected_shuffles(x, delta, width):
    """CUDA's definitions, lane by lane (numbers as in the Programming Guide)."""
    n = x.size
    down, up, xor, idx = (x.copy() for _ in range(4))
    for i in range(n):
        lane, warp_base = i % 32, i - i % 32
        seg = lane % width
        if seg + delta < width:
            down[i] = x[i + delta]
        if seg >= delta:
            up[i] = x[i - delta]
        src = lane ^ delta
        if src < lane - seg + width:  # later width-groups give your own value
            xor[i] = x[warp_base + src]
        idx[i] = x[warp_base + lane - seg + delta % width]
    return numpy.stack([down, up, xor, idx])


@pytest.mark.parametrize("delta,width", [(1, 32), (5, 32), (16, 32), (3, 8), (1, 4), (7, 16)])
def test_shuffles_follow_cuda(mod, dev, delta, width):
    n = 64
    x = dev.input(numpy.arange(n, dtype=numpy.float32) * 1.5, numpy.float32)
    out = dev.empty((4, n), numpy.float32)
    mod.launch("shuffles", 1, n, [x, out, numpy.int32(delta), numpy.int32(width)])
    expected = _expected_shuffles(numpy.asarray(x), delta, width)
    for row, name in enumerate(["down", "up", "xor", "idx"]):
        numpy.testing.assert_array_equal(out[row], expected[row], err_msg=f"__shfl_{name}_sync")


def test_shuffle_from_a_lane_past_the_block_reads_poison(mod, dev):
    # blockDim 48: the second warp has lanes 0..15 only; lane 8 + 16 does not exist
    x = dev.input(numpy.arange(48, dtype=numpy.float32), numpy.float32)
    out = dev.empty((4, 48), numpy.float32)
    mod.launch("shuffles", 1, 48, [x, out, numpy.int32(16), numpy.int32(32)])
    assert numpy.isnan(out[0, 32:48]).all()  # undefined on the GPU: poison here
    numpy.testing.assert_array_equal(out[0, :16], numpy.arange(16, 32))


def test_votes(mod, dev):
    rng = numpy.random.default_rng(0)
    p = (rng.random(64) < 0.5).astype(numpy.int32)
    p[32:] = 1  # the second warp is unanimous
    ballot, any_, all_ = (dev.empty(64, t) for t in (numpy.uint32, numpy.int32, numpy.int32))
    mod.launch("votes", 1, 64, [dev.input(p, numpy.int32), ballot, any_, all_])
    for w in range(2):
        bits = sum(int(p[w * 32 + j]) << j for j in range(32))
        assert (ballot[w * 32:(w + 1) * 32] == bits).all()
        assert (any_[w * 32:(w + 1) * 32] == int(p[w * 32:(w + 1) * 32].any())).all()
        assert (all_[w * 32:(w + 1) * 32] == int(p[w * 32:(w + 1) * 32].all())).all()


def test_mask_naming_a_returned_lane_is_reported(mod, dev):
    with pytest.raises(emulator.EmuError, match="returned"):
        mod.launch("shuffle_after_exit", 1, 32, [dev.zeros(32, numpy.float32)])


@pytest.mark.parametrize("workers", [1, 2])
def test_atomics_are_exact_across_workers(mod, dev, workers):
    counter, total, total64 = dev.zeros(1, numpy.int32), dev.zeros(1, numpy.float32), \
        dev.zeros(1, numpy.float64)
    mod.launch("count_and_sum", 40, 100, [counter, total, total64], workers=workers)
    assert counter[0] == 4000 and total[0] == 2000.0 and total64[0] == 1000.0


def test_shared_memory_is_fresh_and_poisoned_per_block(mod, dev):
    """(With initcheck, the read of block 1 is reported: tests/cuda/test_sanitizer.py.)"""
    y = dev.empty(128, numpy.float32)
    mod.launch("read_unwritten_shared", 2, 64, [y], workers=1, checks="memcheck,racecheck")
    assert (y[:64] == 1).all()
    assert numpy.isnan(y[64:]).all()  # block 1 did not inherit block 0's values


def test_out_of_bounds_write_is_caught(mod, dev):
    y = dev.empty(10, numpy.float32)
    with pytest.raises(emulator.EmuError, match=r"memcheck: .* writes y\[10\] .*: outside y"):
        mod.launch("write_past_end", 1, 4, [y, numpy.int32(10)])
    with pytest.raises(emulator.EmuError, match="outside the bounds of argument 0"):
        mod.launch("write_past_end", 1, 4, [y, numpy.int32(10)], checks=False)  # guard zones


def test_3d_launch_coordinates(mod, dev):
    grid, block = (2, 3, 2), (4, 2, 3)
    nb, nt = 12, 24
    out = dev.empty((nb * nt, 4), numpy.int32)
    mod.launch("coordinates", grid, block, [out])
    b = numpy.arange(nb)
    t = numpy.arange(nt)
    bx, by, bz = b % 2, b // 2 % 3, b // 6
    tx, ty, tz = t % 4, t // 4 % 2, t // 8
    out = out.reshape(nb, nt, 4)
    numpy.testing.assert_array_equal(out[:, :, 0], numpy.tile(tx + 10 * ty + 100 * tz, (nb, 1)))
    numpy.testing.assert_array_equal(out[:, :, 1], numpy.repeat(bx + 10 * by + 100 * bz, nt)
                                     .reshape(nb, nt))
    assert (out[:, :, 2] == 4 + 20 + 300).all() and (out[:, :, 3] == 2 + 30 + 200).all()


def test_arguments_are_checked_against_the_kernel_signature(mod, dev):
    assert mod.signature("takes_types") == ["pd", "q", "f"]
    d = dev.zeros(3, numpy.float64)
    mod.launch("takes_types", 1, 1, [d, numpy.int64(3), numpy.float32(1)])
    with pytest.raises(emulator.EmuError, match="dtype float32"):
        mod.launch("takes_types", 1, 1, [dev.zeros(3, numpy.float32), numpy.int64(3),
                                         numpy.float32(1)])
    with pytest.raises(emulator.EmuError, match="NumPy scalars"):
        mod.launch("takes_types", 1, 1, [d, 3, numpy.float32(1)])
    with pytest.raises(emulator.EmuError, match="int32 scalar"):
        mod.launch("takes_types", 1, 1, [d, numpy.int32(3), numpy.float32(1)])


def test_launches_the_gpu_would_refuse_fail(mod, dev):
    y = dev.zeros(4096, numpy.float32)
    with pytest.raises(emulator.EmuError, match="at most 1024"):
        mod.launch("block_reverse", 1, 2048, [y, y])
    with pytest.raises(emulator.EmuError, match="48 KiB"):
        mod.launch("early_exit_sum", 1, 32, [y, y, numpy.int32(4)], shared_mem=64 * 1024)
    with pytest.raises(emulator.EmuError, match="grid too large"):
        mod.launch("block_reverse", (1, 70000), 32, [y, y])


def test_translate_rewrites_shared_declarations_and_pointers():
    text, kernels = emulator.translate(
        'typedef float real;\n'
        'extern "C" __global__ void k(const real* __restrict__ x, unsigned char* y, int n) {\n'
        '    __shared__ float tile[8][33];\n'
        '    extern __shared__ double dyn[];\n'
        '    const real* row = x + n;\n'
        '    float v = n > 0 ? row[0] : 0;\n'
        '}\n', "k.cu")
    assert kernels == {"k": ["x", "y", "n"]}
    body = text.split("// ---- emulator entry points")[0]
    assert "k(emu::ptr<const real> x, emu::ptr<unsigned char> y, int n)" in body
    assert ('emu::arr<float[8][33]> tile = emu::shared_array<float[8][33]>(0, "tile", "float");'
            in body)
    assert 'emu::ptr<double> dyn = emu::dynamic_shared<double>("dyn", "double");' in body
    assert "emu::ptr<const real> row = x + n;" in body
    assert "n > 0 ? emu::val( row[0] ) : emu::val( 0);" in body
    assert "__shared__" not in body
    # the lines of the source stay where they were (body line 0 is the #line directive)
    assert body.splitlines().index("    emu::ptr<const real> row = x + n;") == 5


VALUES = r"""
// A checked reference (what p[i] returns) must behave as the value it reads.
extern "C" __global__ void values(const float* x, float* y, int* z) {
    int i = threadIdx.x;
    y[i] = i % 2 ? x[i] : 0;        // a float, not truncated to the 0's int
    auto v = y[i];                  // a copy, not an alias of y[i]
    y[i] = -1.f;
    y[i] += v + (x[i] > 0.25f ? 1 : 2);
    z[i] = z[i]++ + ++z[i];         // (unsequenced in C++ before 17; fine here)
    atomicAdd(&z[i], 10);
}
"""


def test_checked_references_behave_as_values(dev):
    mod = emulator.build_source(VALUES, "values.cu")
    x = dev.input(numpy.full(4, 0.5), numpy.float32)
    y, z = dev.empty(4, numpy.float32), dev.zeros(4, numpy.int32)
    mod.launch("values", 1, 4, [x, y, z])
    numpy.testing.assert_array_equal(y, [-1 + 0 + 1, -1 + 0.5 + 1, 0, 0.5])
    numpy.testing.assert_array_equal(z, [0 + 2 + 10] * 4)
