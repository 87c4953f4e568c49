"""The GPU-step trace (minitorch_gx/cuda/trace.py, benchmarks/gpu_step.py):
it follows the real GPU code path, counts what a known answer says, and
scales exactly from small batches."""
import re
import sys
from pathlib import Path

import numpy
import pytest

import minitorch_gx as mt
from minitorch_gx import backend, functional as F
from minitorch_gx.cuda import trace
from tests.backends import needs_emulator

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_step  # noqa: E402


def test_a_grouped_conv_is_three_kernel_launches_with_their_multiply_adds():
    x = numpy.ones((3, 16, 9, 9), numpy.float32)
    W = numpy.ones((32, 4, 3, 3), numpy.float32)  # 4 groups of 4 -> 8 channels
    with trace.fake_gpu() as launches:
        xt = mt.Tensor(trace.to_gpu(x), requires_grad=True)
        y = F.conv2d(xt, mt.Tensor(trace.to_gpu(W), requires_grad=True), stride=2, padding=1,
                     groups=4)
        assert isinstance(y.data, trace.TracedArray) and y.shape == (3, 32, 5, 5)
        launches.clear()
        y.backward(trace.to_gpu(numpy.ones(y.shape, numpy.float32)))
    kernels = [launch for launch in launches if launch.kind == "kernel"]
    assert sorted(k.name for k in kernels) == ["grouped_conv2d_bwd_data",
                                               "grouped_conv2d_bwd_weight"]
    macs = 3 * 32 * 5 * 5 * 4 * 3 * 3  # N K P Q (C / groups) R S
    assert all(k.flops == 2 * macs for k in kernels)
    data = next(k for k in kernels if k.name.endswith("data"))
    assert data.bytes == (3 * 32 * 25 + 32 * 4 * 9 + 3 * 16 * 81) * 4  # gy, W read; gx written


def test_a_1x1_conv_goes_to_cublas_and_its_weight_gradient_copies_its_operands():
    x = numpy.ones((2, 8, 4, 4), numpy.float32)
    W = numpy.ones((16, 8, 1, 1), numpy.float32)
    with trace.fake_gpu() as launches:
        xt = mt.Tensor(trace.to_gpu(x), requires_grad=True)
        Wt = mt.Tensor(trace.to_gpu(W), requires_grad=True)
        y = F.conv2d(xt, Wt)
        y.backward(trace.to_gpu(numpy.ones(y.shape, numpy.float32)))
    gemms = [launch for launch in launches if launch.kind == "gemm"]
    assert [g.flops for g in gemms] == [2 * 2 * 16 * 16 * 8] * 3  # forward, both gradients
    assert sum(launch.name == "copy (tensordot operand)" for launch in launches) == 2


def test_a_device_read_is_recorded_as_a_wait():
    with trace.fake_gpu() as launches:
        a = trace.to_gpu(numpy.arange(4.0))
        assert float(a.sum()) == 6.0
    assert [(x.kind, x.name) for x in launches] == [
        ("cupy", "add.reduce"), ("d2h", "device -> host read (waits for the device)")]


def test_scaling_from_two_batches_is_exact():
    direct = gpu_step.trace_step("resnext_mini", 5, 32, num_classes=10)
    scaled = gpu_step.scaled("resnext_mini", 5, 32, num_classes=10)
    assert scaled == direct


def test_resnext50_s_step_has_the_flops_of_its_published_count():
    """torchvision: 4.23 GMACs per 224x224 image forward. A training step is
    three times that (forward, input and weight gradients) but for the
    stem's input gradient, which is not computed (118 MMACs)."""
    launches = gpu_step.scaled("resnext50_32x4d", 1, 224)
    flops = sum(x.flops for x in launches)
    assert flops == pytest.approx(2 * (3 * 4.23e9 - 0.118e9), rel=0.01)


def test_gpu_step_prints_its_table_and_the_summary_line(capsys):
    gpu_step.main(["--arch", "resnext_mini", "--batch", "8", "--image_size", "32"])
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"step: \d+ launches, \d+\.\d\d GB, \d+\.\d GFLOP, floor \d+\.\d\d ms",
                        lines[-1])
    assert any(line.startswith("ours    grouped_conv2d_fwd") for line in lines)
    launches = int(re.match(r"step: (\d+)", lines[-1]).group(1))
    assert lines[-2].startswith("bytes: ") and "x the" in lines[-2]
    assert launches == sum(int(line.split()[-4]) for line in lines[2:-2])


@needs_emulator
def test_the_trace_launches_the_kernels_an_emulated_step_runs(monkeypatch):
    """The same step run for real on the emulated kernels: the trace follows
    the very code path (the same kernels, in the same order)."""
    from minitorch_gx import backend
    from minitorch_gx.cuda import emulator
    ran, real_launch = [], emulator.EmuDevice.launch

    def recorded(self, file, kernel, *args, **kwargs):
        ran.append(kernel)
        return real_launch(self, file, kernel, *args, **kwargs)
    monkeypatch.setattr(emulator.EmuDevice, "launch", recorded)
    with backend.emulate_kernels():
        gpu_step.trace_step("resnext_mini", 2, 32, num_classes=10, device="emulated")
    traced = gpu_step.trace_step("resnext_mini", 2, 32, num_classes=10)
    assert ran == [x.name for x in traced if x.kind == "kernel"]


def test_the_batch_norm_step_counter_stays_on_the_host():
    from minitorch_gx import nn
    bn = nn.BatchNorm2d(4)
    with trace.fake_gpu(record=False):
        bn.to("gpu")
    assert isinstance(bn.weight.data, trace.TracedArray)
    assert type(bn.num_batches_tracked) is numpy.ndarray  # a host counter
    with trace.fake_gpu() as launches:
        bn(mt.Tensor(trace.to_gpu(numpy.ones((2, 4, 3, 3), numpy.float32))))
    assert int(bn.num_batches_tracked) == 1
    assert [x.name for x in launches if x.kind == "cupy"] == []  # only the BN kernels


class _ClockEvent:
    """A stand-in for cupy.cuda.Event: the host clock when recorded."""

    def record(self, stream=None):
        import time
        self.t = time.perf_counter()

    def synchronize(self):
        pass


def test_the_measured_rows_bracket_every_operation_the_trace_lists():
    """gpu_step --measure times each device operation with a pair of events
    (minitorch_gx/cuda/timing.py); run here on the traced GPU path with clock
    stand-ins, every row of the trace must come back with its count: an
    operation that slipped past the brackets would leave its row unmeasured."""
    traced = gpu_step.trace_step("resnext_mini", 3, 32, num_classes=10)
    with trace.fake_gpu(record=False):
        rows, whole = gpu_step.measure_step(
            "resnext_mini", 3, 32, num_classes=10, repeat=2, warmup=1, event=_ClockEvent,
            elapsed=lambda a, b: (b.t - a.t) * 1e3, sync=lambda: None)
    counts = {}
    for launch in traced:
        counts[(launch.kind, launch.name)] = counts.get((launch.kind, launch.name), 0) + 1
    assert {key: n for key, (n, _) in rows.items()} == counts
    assert all(ms >= 0 for _, ms in rows.values()) and len(whole) == 2
    assert backend.cupy is None or not isinstance(backend.cupy, trace.FakeCupy)


def test_the_step_moves_at_most_1_3_times_the_bytes_of_one_pass_per_op():
    """Issue 11's target for bytes: every op touches each array once, but for
    batch norm's statistics, read in a pass of their own."""
    launches = gpu_step.scaled("resnext50_32x4d", 128, 224)
    total = sum(x.bytes for x in launches)
    once = gpu_step.one_pass_bytes(launches)
    assert {x.name for x in launches} >= set(gpu_step.REREADING)
    assert once < total <= 1.3 * once, f"{total / once:.3f}x one pass"
