"""The emulator as a sanitizer (minitorch_gx/cuda/emulator.py, kernels/emu/):
memcheck, racecheck, initcheck, synccheck and the permuted schedules.

Each planted bug of tests/cuda/planted_bugs.cu must be caught with a message
naming the kernel, block, thread, array, element, extent, kind of access and
source line; the clean kernels beside them must pass every check under every
schedule. (tests/ops/* run every kernel of kernels/ under all the checks.)
"""
import re
from pathlib import Path

import numpy
import pytest

from minitorch_gx.cuda import conv as cuda_conv, elementwise as cuda_elementwise, emulator
from minitorch_gx.cuda import loss as cuda_loss, norm as cuda_norm, pool as cuda_pool

pytestmark = pytest.mark.skipif(not emulator.compiler_available(),
                                reason="the CUDA emulator needs a C++ compiler (g++)")

PLANTED = Path(__file__).with_name("planted_bugs.cu")
F32 = numpy.float32


def line(marker):
    """planted_bugs.cu:N, the line carrying the comment '// @marker'."""
    for n, text in enumerate(PLANTED.read_text().splitlines(), 1):
        if re.search(rf"// @{marker}\b", text):
            return f"planted_bugs.cu:{n}"
    raise KeyError(marker)


@pytest.fixture(scope="module")
def mod():
    return emulator.build_source(PLANTED.read_text(), PLANTED.name)


@pytest.fixture(scope="module")
def dev():
    return emulator.device()


def reported(launch, *args, **kwargs):
    """The EmuError message a launch ends with."""
    with pytest.raises(emulator.EmuError) as e:
        launch(*args, **kwargs)
    return str(e.value)


def arange(dev, n, dtype=F32):
    return dev.input(numpy.arange(n, dtype=dtype), dtype)


# --------------------------------------------------------------------------
# racecheck
# --------------------------------------------------------------------------
def test_missing_barrier_read_after_write(mod, dev):
    msg = reported(mod.launch, "missing_barrier", 1, 64, [arange(dev, 64), dev.empty(64, F32)])
    assert msg == (
        f"missing_barrier<<<(1, 1, 1), (64, 1, 1)>>>: racecheck: thread (1,0,0) of block "
        f"(0,0,0) reads shared s[0] at {line('raw_read')} after thread (0,0,0) wrote it at "
        f"{line('raw_write')}, with no __syncthreads between them (read-after-write hazard "
        f"on shared s (float[64]))")


def test_missing_barrier_in_reverse_order_is_a_write_after_read_or_an_uninitialised_read(mod,
                                                                                         dev):
    args = [arange(dev, 64), dev.empty(64, F32)]
    with emulator.schedule("reverse"):
        msg = reported(mod.launch, "missing_barrier", 1, 64, args)
        assert (f"initcheck: thread (63,0,0) of block (0,0,0) reads shared s[62] at "
                f"{line('raw_read')} before any thread of the block wrote it") in msg
        with emulator.checks("racecheck"):
            msg = reported(mod.launch, "missing_barrier", 1, 64, args)
    assert (f"racecheck: thread (62,0,0) of block (0,0,0) writes shared s[62] at "
            f"{line('raw_write')} after thread (63,0,0) read it at {line('raw_read')}, with no "
            f"__syncthreads between them (write-after-read hazard") in msg


@pytest.mark.parametrize("order", emulator.SCHEDULES)
def test_the_barrier_makes_it_clean(mod, dev, order):
    y = dev.empty(64, F32)
    mod.launch("with_barrier", 1, 64, [arange(dev, 64), y], schedule=order, seed=5)
    numpy.testing.assert_array_equal(y, numpy.r_[0, numpy.arange(63)])


def test_write_after_read(mod, dev):
    msg = reported(mod.launch, "write_after_read", 1, 64, [dev.empty(64, F32)])
    assert msg.endswith(
        f"racecheck: thread (1,0,0) of block (0,0,0) writes shared s[1] at {line('war_write')} "
        f"after thread (0,0,0) read it at {line('war_read')}, with no __syncthreads between them "
        f"(write-after-read hazard on shared s (float[64]))")


def test_two_threads_writing_one_global_element(mod, dev):
    msg = reported(mod.launch, "all_write_one", 2, 4, [dev.zeros(1, F32)])
    assert msg.endswith(
        f"racecheck: thread (1,0,0) of block (0,0,0) writes y[0] at {line('all_write_one')} "
        f"after thread (0,0,0) of block (0,0,0) wrote it at {line('all_write_one')}, with no "
        f"__syncthreads between them (write-after-write hazard on y (float32, 1 element))")


def test_a_block_reading_what_another_block_wrote(mod, dev):
    msg = reported(mod.launch, "block_reads_other_block", 2, 4, [dev.zeros(4, F32),
                                                                dev.zeros(4, F32)])
    assert msg.endswith(
        f"racecheck: thread (0,0,0) of block (1,0,0) reads y[0] at {line('other_block_read')} "
        f"after thread (0,0,0) of block (0,0,0) wrote it at {line('other_block_write')}, in "
        f"the same launch (blocks are not ordered) (read-after-write hazard on y (float32, "
        f"4 elements))")


@pytest.mark.parametrize("order", emulator.SCHEDULES)
def test_a_barrier_orders_global_memory_within_a_block(mod, dev, order):
    y, z = dev.empty(64, F32), dev.empty(64, F32)
    mod.launch("global_through_barrier", 1, 64, [y, z], schedule=order)
    numpy.testing.assert_array_equal(z, numpy.arange(64)[::-1])


@pytest.mark.parametrize("order", emulator.SCHEDULES)
@pytest.mark.parametrize("threads", [32, 96, 256])
def test_warp_synchronous_shuffle_code_is_not_flagged(mod, dev, order, threads):
    x = dev.input(numpy.random.default_rng(0).integers(0, 9, 2 * threads), F32)
    y = dev.empty(2, F32)
    mod.launch("shuffle_sum", 2, threads, [x, y], schedule=order, seed=1)
    numpy.testing.assert_array_equal(y, x.reshape(2, threads).sum(1))


@pytest.mark.parametrize("order", emulator.SCHEDULES)
def test_shared_memory_ordered_by_syncwarp_is_not_flagged(mod, dev, order):
    y = dev.empty(1, F32)
    mod.launch("syncwarp_sum", 1, 32, [arange(dev, 32), y], schedule=order, seed=2)
    assert y[0] == 31 * 32 / 2


def test_warp_synchronous_shared_memory_without_syncwarp_is_a_race(mod, dev):
    args = [arange(dev, 32), dev.empty(1, F32)]
    # in index order lane 0 reads s[16] before lane 16 has written it ...
    assert (f"initcheck: thread (0,0,0) of block (0,0,0) reads shared s[16] at "
            f"{line('unsynced_read')} before any thread of the block wrote it"
            in reported(mod.launch, "unsynced_warp_sum", 1, 32, args))
    # ... in reverse order lane 15 reads s[31] after lane 31 wrote it, unordered
    assert (f"racecheck: thread (15,0,0) of block (0,0,0) reads shared s[31] at "
            f"{line('unsynced_read')} after thread (31,0,0) wrote it at {line('unsynced_write')}"
            f", with no __syncthreads between them (read-after-write hazard"
            in reported(mod.launch, "unsynced_warp_sum", 1, 32, args, schedule="reverse"))


def test_a_partial_syncwarp_orders_only_the_lanes_it_names(mod, dev):
    msg = reported(mod.launch, "half_warp_sync", 1, 32, [dev.empty(32, F32)])
    assert (f"racecheck: thread (0,0,0) of block (0,0,0) reads shared s[16] at "
            f"{line('half_read')} after thread (16,0,0) wrote it at {line('half_write')}") in msg


@pytest.mark.parametrize("workers", [1, 2])
def test_atomics_are_exempt_from_racecheck_and_exact(mod, dev, workers):
    counter, total = dev.zeros(1, numpy.int32), dev.zeros(1, F32)
    mod.launch("count", 40, 100, [counter, total], workers=workers)
    assert counter[0] == 4000 and total[0] == 2000.0


def test_atomics_are_bounds_checked(mod, dev):
    msg = reported(mod.launch, "atomic_past_end", 1, 1, [dev.zeros(3, F32), numpy.int32(3)])
    assert msg.endswith(f"memcheck: thread (0,0,0) of block (0,0,0) atomically updates total[3] "
                        f"at {line('atomic_past_end')}: outside total (float32, 3 elements)")


# --------------------------------------------------------------------------
# memcheck
# --------------------------------------------------------------------------
def test_reading_one_element_past_the_end(mod, dev):
    msg = reported(mod.launch, "read_past_end", 1, 64, [arange(dev, 10), dev.empty(10, F32),
                                                        numpy.int32(10)])
    assert msg == (f"read_past_end<<<(1, 1, 1), (64, 1, 1)>>>: memcheck: thread (10,0,0) of "
                   f"block (0,0,0) reads x[10] at {line('read_past_end')}: outside x (float32, "
                   f"10 elements)")


def test_writing_one_element_past_the_end(mod, dev):
    msg = reported(mod.launch, "write_past_end", 2, 8, [arange(dev, 12), dev.empty(12, F32),
                                                        numpy.int32(12)])
    assert msg.endswith(f"memcheck: thread (4,0,0) of block (1,0,0) writes y[12] at "
                        f"{line('write_past_end')}: outside y (float32, 12 elements)")


def test_reading_far_past_the_end_is_caught_not_garbage(mod, dev):
    msg = reported(mod.launch, "read_far", 1, 4, [arange(dev, 256), dev.empty(4, F32),
                                                  numpy.int32(5000)])
    assert msg.endswith(f"memcheck: thread (0,0,0) of block (0,0,0) reads x[5000] at "
                        f"{line('read_far')}: outside x (float32, 256 elements)")
    # threadIdx.x is unsigned: threadIdx.x - 3 wraps to 2^32 - 3 in thread 0, as on a GPU
    msg = reported(mod.launch, "read_far", 1, 4, [arange(dev, 256), dev.empty(4, F32),
                                                  numpy.int32(-3)])
    assert f"reads x[{2**32 - 3}] at {line('read_far')}" in msg


def test_a_view_is_bounded_by_the_view(mod, dev):
    big = arange(dev, 1024)
    msg = reported(mod.launch, "read_far", 1, 4, [big[100:356], dev.empty(4, F32),
                                                  numpy.int32(254)])
    assert msg.endswith(f"reads x[256] at {line('read_far')}: outside x (float32, 256 elements)")


def test_shared_index_past_a_dimension(mod, dev):
    msg = reported(mod.launch, "shared_row_past_end", 1, 9, [dev.empty(9, F32)])
    assert msg.endswith(f"memcheck: thread (8,0,0) of block (0,0,0) writes shared t with index 8 "
                        f"in dimension 0 at {line('row_past_end')}: outside [0, 8) of shared t "
                        f"(float[8][33])")
    msg = reported(mod.launch, "shared_column_past_end", 1, 34, [dev.empty(34, F32)])
    assert msg.endswith(f"thread (33,0,0) of block (0,0,0) writes shared t with index 33 in "
                        f"dimension 1 at {line('column_past_end')}: outside [0, 33) of shared t "
                        f"(float[8][33])")


def test_dynamic_shared_memory_past_the_launch_size(mod, dev):
    msg = reported(mod.launch, "dynamic_past_end", 1, 32, [dev.empty(32, F32)], shared_mem=64)
    assert msg.endswith(f"memcheck: thread (16,0,0) of block (0,0,0) writes shared dyn[16] at "
                        f"{line('dynamic_past_end')}: outside dynamic shared dyn (float, 16 "
                        f"elements in the launch's 64 bytes of shared_mem)")


def test_with_the_checks_off_only_the_guard_zones_catch_writes(mod, dev):
    y = dev.empty(12, F32)
    with emulator.checks(False):
        mod.launch("read_past_end", 1, 12, [arange(dev, 12), y, numpy.int32(11)])  # unseen
        with pytest.raises(emulator.EmuError, match="outside the bounds of argument 1"):
            mod.launch("write_past_end", 1, 13, [arange(dev, 12), y, numpy.int32(12)])


# --------------------------------------------------------------------------
# initcheck
# --------------------------------------------------------------------------
def test_uninitialised_shared_read(mod, dev):
    msg = reported(mod.launch, "uninitialised_shared", 1, 64, [dev.empty(64, F32)])
    assert msg.endswith(f"initcheck: thread (0,0,0) of block (0,0,0) reads shared s[63] at "
                        f"{line('uninitialised_read')} before any thread of the block wrote it")


def test_an_output_element_left_unwritten(mod, dev):
    y = dev.empty((4, 25), F32)
    mod.launch("fill_but_last", 2, 32, [y, numpy.int32(100)])
    with pytest.raises(emulator.EmuError) as e:
        dev.check_written(y)
    assert str(e.value) == ("initcheck: fill_but_last (parameter y) left 1 of the 100 elements of "
                            "y (4, 25) float32 unwritten; the first is y[3, 24] (flat index 99)")
    full = dev.empty((4, 25), F32)
    mod.launch("fill", 2, 32, [full, numpy.int32(100)])
    dev.check_written(full)


def test_initcheck_follows_an_empty_array_from_launch_to_launch(mod, dev):
    y = dev.empty(100, F32)
    mod.launch("fill_but_last", 1, 32, [y, numpy.int32(100)])  # y[99] is never written
    msg = reported(mod.launch, "copy", 4, 32, [y, dev.empty(100, F32), numpy.int32(100)])
    assert msg.endswith(f"initcheck: thread (3,0,0) of block (3,0,0) reads x[99] at "
                        f"{line('copy_read')} before anything wrote it (x (float32, 100 "
                        f"elements): it came from EmuDevice.empty and no kernel has written "
                        f"this element)")
    mod.launch("copy", 1, 99, [y, dev.empty(100, F32), numpy.int32(99)])  # y[0..99) is fine


def test_host_writes_into_empty_arrays_are_declared_with_mark_written(mod, dev):
    y = dev.empty(64, F32)
    y[...] = 3
    with pytest.raises(emulator.EmuError, match="initcheck"):
        mod.launch("copy", 1, 64, [y, dev.empty(64, F32), numpy.int32(64)])
    dev.mark_written(y)
    out = dev.empty(64, F32)
    mod.launch("copy", 1, 64, [y, out, numpy.int32(64)])
    dev.check_written(out)
    assert (out == 3).all()


def test_mark_written_and_check_written_take_any_view(mod, dev):
    y = dev.empty((6, 4), F32)
    dev.mark_written(y[::2, 1:])   # rows 0, 2, 4, columns 1..3, from the host
    with pytest.raises(emulator.EmuError) as e:
        dev.check_written(y)
    assert str(e.value) == ("initcheck: no kernel wrote 15 of the 24 elements of this (6, 4) "
                            "float32 array from EmuDevice.empty (no launch took it); the first "
                            "is [0, 0] (flat index 0)")
    dev.check_written(y[::2, 1:], y[4, :0])
    with pytest.raises(emulator.EmuError, match=r"wrote 6 of the 12 elements .* first is \[1, 0\]"):
        dev.check_written(y[:, ::-2])  # columns 3 and 1


def test_zeros_input_and_plain_numpy_arrays_count_as_written(mod, dev):
    for x in (dev.zeros(8, F32), dev.input(numpy.ones(8), F32), numpy.ones(8, F32)):
        mod.launch("copy", 1, 8, [x, dev.empty(8, F32), numpy.int32(8)])


def test_a_launch_without_initcheck_leaves_its_arrays_counted_as_written(mod, dev):
    y = dev.empty(100, F32)
    with emulator.checks("memcheck"):
        mod.launch("fill_but_last", 1, 32, [y, numpy.int32(100)])
    mod.launch("copy", 1, 100, [y, dev.empty(100, F32), numpy.int32(100)])  # no false report
    dev.check_written(y)


# --------------------------------------------------------------------------
# synccheck
# --------------------------------------------------------------------------
def test_a_barrier_in_a_divergent_branch(mod, dev):
    msg = reported(mod.launch, "barrier_in_branch", 1, 64, [arange(dev, 64), dev.empty(64, F32)])
    assert msg == (
        f"barrier_in_branch<<<(1, 1, 1), (64, 1, 1)>>>: synccheck: the threads of block (0,0,0) "
        f"wait at different __syncthreads calls (a barrier in code that not every thread "
        f"reaches): threads 0, 2, ..., 62 at {line('even_barrier')}, threads 1, 3, ..., 63 at "
        f"{line('odd_barrier')}")


def test_lanes_that_disagree_on_a_shuffle_mask(mod, dev):
    msg = reported(mod.launch, "mismatched_masks", 1, 32, [dev.empty(32, F32)])
    assert msg.endswith(f"synccheck: in block (0,0,0), thread 0 waits in a warp operation at "
                        f"{line('mismatched_masks')} with mask 0x0000ffff, thread 16 in one at "
                        f"{line('mismatched_masks')} with mask 0xffffffff: the lanes of a warp "
                        f"operation must pass the same mask")


# --------------------------------------------------------------------------
# Bugs planted in the project's own kernels, run through their launchers
# --------------------------------------------------------------------------
def _data(*shape):
    return numpy.random.default_rng(0).standard_normal(shape).astype(F32)


_CONV = (lambda: cuda_conv.conv2d_forward(_data(2, 8, 7, 9), _data(8, 4, 3, 3), 1, 1, 2))
_WGRAD = (lambda: cuda_conv.conv2d_backward_weight(_data(2, 8, 7, 9), _data(2, 8, 7, 9),
                                                   (8, 4, 3, 3), 1, 1, 2))
_XENT = (lambda: cuda_loss.softmax_cross_entropy_forward(_data(3, 40), numpy.array([1, 2, 3]),
                                                         0.1))
# (file, text, planted replacement, launch, what the message must say)
PLANTED_IN_KERNELS = [
    pytest.param(
        "add_relu.cu", "i < n;\n         i += (long long)gridDim.x * blockDim.x) {\n        real v",
        "i < n - 1;\n         i += (long long)gridDim.x * blockDim.x) {\n        real v",
        lambda: cuda_elementwise.add_relu_forward(_data(3, 5, 7), _data(3, 5, 7)),
        (r"initcheck: add_relu_fwd \(parameter y\) left 1 of the 105 elements of y \(3, 5, 7\) "
         r"float32 unwritten; the first is y\[2, 4, 6\]"), id="add_relu-loop-bound"),
    pytest.param(
        "max_pool.cu", "o < total;", "o <= total;",
        lambda: cuda_pool.max_pool2d_forward(_data(2, 3, 9, 11), 3, 2, 1),
        (r"memcheck: thread \(180,0,0\) of block \(0,0,0\) reads x\[594\] at max_pool.cu:\d+: "
         r"outside x \(float32, 594 elements\)"), id="max_pool-loop-bound"),
    pytest.param(
        "batch_norm.cu", "    __syncthreads();\n    if (threadIdx.x == 0) {\n        Stats total",
        "    if (threadIdx.x == 0) {\n        Stats total",
        lambda: cuda_norm.batch_norm_train_forward(_data(3, 5, 7, 9), numpy.ones(5, F32),
                                                   numpy.zeros(5, F32), 1e-5, False),
        (r"bn_fwd_reduce<<<.*>>>: initcheck: thread \(0,0,0\) of block \(0,0,0\) reads shared "
         r"warp_stats\[1\] at batch_norm.cu:\d+ before any thread of the block wrote it"),
        id="batch_norm-no-barrier"),
    pytest.param(
        "softmax_cross_entropy.cu",
        "    __syncthreads();  // scratch is reused by the next reduction", "", _XENT,
        (r"racecheck: thread \(0,0,0\) of block \(0,0,0\) writes shared scratch\[0\] at "
         r"softmax_cross_entropy.cu:\d+ after thread \(\d+,0,0\) read it at .*write-after-read"),
        id="softmax-no-second-barrier"),
    pytest.param(
        "softmax_cross_entropy.cu", "k < K; k += blockDim.x) m =", "k <= K; k += blockDim.x) m =",
        _XENT, (r"memcheck: thread \(40,0,0\) of block \(2,0,0\) reads z\[120\] at "
                r"softmax_cross_entropy.cu:\d+: outside z \(float32, 120 elements\)"),
        id="softmax-loop-bound"),
    pytest.param(
        "grouped_conv.cu", "            __syncthreads();\n\n            for (int cc = 0;",
        "\n            for (int cc = 0;", _CONV,
        (r"initcheck: thread \(0,0,0\) of block \(0,0,0\) reads shared pool\[\d+\] at "
         r"grouped_conv.cu:\d+ before any thread"), id="conv-no-barrier"),
    pytest.param(
        "grouped_conv.cu", "const bool ok = j0 + tc + v * tcols < J;",
        "const bool ok = j0 + tc + v * tcols <= J;", _CONV,
        (r"memcheck: thread \(126,0,0\) of block \(0,0,0\) writes y\[1008\] at "
         r"grouped_conv.cu:\d+: outside y \(float32, 1008 elements\)"), id="conv-bound"),
    pytest.param(
        "grouped_conv_bwd_weight.cu",
        "            __syncthreads();\n            if (t < nparts) {", "            if (t < nparts) {",
        _WGRAD, (r"initcheck: thread \(0,0,0\) of block \(0,0,0\) reads shared pool\[\d+\] at "
                 r"grouped_conv_bwd_weight.cu:\d+ before any thread"), id="wgrad-no-barrier"),
    pytest.param(
        "grouped_conv_bwd_weight.cu", "jl < nbox; jl += WGRAD_THREADS",
        "jl <= nbox; jl += WGRAD_THREADS", _WGRAD,
        r"memcheck: thread \(126,0,0\) of block \(0,0,0\) reads gy\[1008\]", id="wgrad-bound"),
]


@pytest.mark.parametrize("file,text,planted,launch,message", PLANTED_IN_KERNELS)
def test_a_bug_planted_in_a_project_kernel_is_caught(file, text, planted, launch, message,
                                                     monkeypatch):
    """An off-by-one bound or a missing barrier in kernels/*.cu, found by the
    launchers' ordinary calls (the old emulator let such bugs through)."""
    source = (emulator.kernel_dir() / file).read_text()
    assert source.count(text) == 1, f"{file} no longer holds the text to plant the bug in"
    build = emulator.build
    monkeypatch.setattr(emulator, "build", lambda f, defines=(): emulator.build_source(
        source.replace(text, planted), file, defines) if f == file else build(f, defines))
    with pytest.raises(emulator.EmuError, match=message):
        launch()


# --------------------------------------------------------------------------
# Schedules, and the switches
# --------------------------------------------------------------------------
def test_what_the_trackers_cannot_see_shows_under_another_schedule(mod, dev):
    """order_dependent: a global write-after-read between blocks is not tracked,
    but its result changes with the order of the blocks."""
    # block 0 first: block 1 reads what block 0 wrote, which racecheck sees
    assert "read-after-write" in reported(mod.launch, "order_dependent", 2, 1, [dev.zeros(2, F32)])
    # block 1 first: nothing to report, only the result differs
    y = dev.zeros(2, F32)
    mod.launch("order_dependent", 2, 1, [y], schedule="reverse")
    assert tuple(y) == (10, 1)
    with emulator.checks("memcheck", "initcheck"):
        mod.launch("order_dependent", 2, 1, [y], schedule="forward")
    assert tuple(y) == (10, 11)


def test_random_schedules_are_seeded():
    src = r'''extern "C" __global__ void first(int* who) {
        __shared__ int order[1];
        if (threadIdx.x == 0) order[0] = 0;
        __syncthreads();
        int n = atomicAdd(&order[0], 1);
        who[n] = threadIdx.x;
    }'''
    mod, dev = emulator.build_source(src, "first.cu"), emulator.device()

    def run(order, seed=0):
        who = dev.empty(64, numpy.int32)
        mod.launch("first", 1, 64, [who], schedule=order, seed=seed)
        return tuple(who)

    assert run("forward") == tuple(range(64)) and run("reverse") == tuple(range(63, -1, -1))
    assert run("random", 1) == run("random", 1) != run("random", 2)
    assert sorted(run("random", 3)) == list(range(64))


def test_the_switches(monkeypatch):
    monkeypatch.setenv("MINITORCH_GX_EMU_CHECKS", "memcheck, racecheck")
    assert emulator.enabled_checks() == {"memcheck", "racecheck"}
    monkeypatch.setenv("MINITORCH_GX_EMU_CHECKS", "0")
    assert emulator.enabled_checks() == set()
    with emulator.checks("all"):
        assert emulator.enabled_checks() == set(emulator.CHECKS)
    monkeypatch.delenv("MINITORCH_GX_EMU_CHECKS")
    assert emulator.enabled_checks() == set(emulator.CHECKS)  # the default: everything
    with emulator.checks():
        assert emulator.enabled_checks() == set()
    monkeypatch.setenv("MINITORCH_GX_EMU_SCHEDULE", "random:7")
    assert emulator.current_schedule() == ("random", 7)
    with emulator.schedule("reverse"):
        assert emulator.current_schedule() == ("reverse", 0)
    monkeypatch.delenv("MINITORCH_GX_EMU_SCHEDULE")
    assert emulator.current_schedule() == ("forward", 0)
    with pytest.raises(ValueError, match="unknown check 'memchek'"), emulator.checks("memchek"):
        pass
    with pytest.raises(ValueError, match="forward, reverse or random"), \
            emulator.schedule("backwards"):
        pass
