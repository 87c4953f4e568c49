"""What one GPU training step costs, from first principles, on any machine.

    python benchmarks/gpu_step.py --arch resnext50_32x4d --batch 128 --image_size 224

One step as train.py takes it on a GPU, the second of the run (what is made
once, such as the batch-norm counters, was made by the first) (uint8 batch -> device -> normalise ->
forward -> label-smoothed cross-entropy -> backward -> SGD; the allreduce is
left out), traced by ``minitorch_gx.cuda.trace``: the package runs its real GPU
code path on arrays that record what CuPy and our launchers would launch,
without a GPU and without running the kernels. One row per kernel or GEMM
kind: launches, bytes read + written (each array a launch touches, once),
FLOPs, and the floor time on an H200, max(bytes / bandwidth, FLOPs / peak)
per launch, summed. The step is traced at batch 1 and 2 and scaled to
--batch exactly (every count is affine in the batch; the test suite checks
this against a third batch). The last line is

    step: N launches, X GB, Y GFLOP, floor Z ms

Figures assumed for the H200 (to be re-measured when a GPU is lent): 4.3 TB/s
copy bandwidth, 67 TFLOP/s fp32. Launch latency (a few microseconds each) is
not in the floor; the launch count is its own column for that reason.
Without a GPU the table is the floor only; the measured time per row is not
implemented yet.
"""
import argparse
import collections
import os
import sys
import types

import numpy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minitorch_gx import backend  # noqa: E402
from minitorch_gx.cuda import trace  # noqa: E402
from minitorch_gx.optim import SGD, WarmupCosineLR  # noqa: E402
from resnext import trainer  # noqa: E402
from resnext.model import build_model  # noqa: E402

BANDWIDTH = 4.3e12  # bytes/s, H200 device-to-device copy
PEAK = 67e12        # FLOP/s, H200 fp32 (no TF32)
KINDS = {"kernel": "ours", "gemm": "cuBLAS", "cupy": "CuPy", "h2d": "copy", "d2h": "read"}


def trace_step(arch, batch, image_size, num_classes=1000, seed=0, device="traced"):
    """The Launches of one training step at this batch size. ``device``
    "emulated": run the step for real on NumPy arrays instead (inside
    ``backend.emulate_kernels()``, the kernels run in the CPU emulator), to
    compare with; returns None."""
    model = build_model(arch, num_classes, True, seed=seed)
    optimizer = None
    if device == "emulated":
        optimizer = SGD(trainer.param_groups(model, 1e-4), lr=0.1, momentum=0.9)
    with trace.fake_gpu(record=False):
        if optimizer is None:
            model.to("gpu")
            optimizer = SGD(trainer.param_groups(model, 1e-4), lr=0.1, momentum=0.9)
    run = types.SimpleNamespace(
        model=model.train(), optimizer=optimizer, reducer=None,
        scheduler=WarmupCosineLR(optimizer, 100, 1, 10), xp=None,
        args=types.SimpleNamespace(label_smooth_factor=0.1),
        stops=types.SimpleNamespace(requested=None))
    rs = numpy.random.RandomState(seed)
    images = rs.randint(0, 256, (batch, image_size, image_size, 3)).astype(numpy.uint8)
    labels = rs.randint(0, num_classes, batch).astype(numpy.int64)
    if device == "emulated":
        run.xp = numpy
        trainer.Run.step(run, images, labels)
        return None
    with trace.fake_gpu(record=False):  # a first step: what is made once is made here
        run.xp = backend.cupy
        trainer.Run.step(run, images, labels)
    with trace.fake_gpu() as launches:  # the steady state: the second step
        run.xp = backend.cupy  # the traced CuPy
        trainer.Run.step(run, images, labels)
    return launches


def scaled(arch, batch, image_size, num_classes=1000, traced=(2, 3)):
    """The step's Launches at ``batch``, from exact traces at two small batches
    (not 1: NumPy calls an array with a dimension of 1 contiguous whatever its
    strides, so a batch of 1 can skip copies a real batch makes)."""
    n1, n2 = traced
    one, two = (trace_step(arch, n, image_size, num_classes) for n in traced)
    if [(a.kind, a.name) for a in one] != [(b.kind, b.name) for b in two]:
        raise RuntimeError(f"the step launches differently at batch {n1} and {n2}: cannot scale")

    def at(v1, v2):  # v is affine in the batch: v1 + slope * (batch - n1), exactly
        slope, rest = divmod(v2 - v1, n2 - n1)
        if rest:
            raise RuntimeError("a count is not affine in the batch")
        return v1 + slope * (batch - n1)
    return [trace.Launch(a.kind, a.name, at(a.bytes, b.bytes), at(a.flops, b.flops))
            for a, b in zip(one, two)]


def floor_s(launch):
    return max(launch.bytes / BANDWIDTH, launch.flops / PEAK)


def table(launches):
    """Rows (kind, name, launches, bytes, flops, floor seconds), costliest first."""
    rows = collections.OrderedDict()
    for launch in launches:
        row = rows.setdefault((launch.kind, launch.name), [0, 0, 0, 0.0])
        row[0] += 1
        row[1] += launch.bytes
        row[2] += launch.flops
        row[3] += floor_s(launch)
    return sorted(((k, n, *v) for (k, n), v in rows.items()), key=lambda r: -r[5])


def summary(launches):
    return (f"step: {len(launches)} launches, {sum(x.bytes for x in launches) / 1e9:.2f} GB, "
            f"{sum(x.flops for x in launches) / 1e9:.1f} GFLOP, "
            f"floor {sum(map(floor_s, launches)) * 1e3:.2f} ms")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnext50_32x4d", choices=["resnext50_32x4d", "resnext_mini"])
    p.add_argument("--batch", type=int, default=128, help="images per step")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    a = p.parse_args(argv)
    launches = scaled(a.arch, a.batch, a.image_size, a.classes)
    print(f"one training step of {a.arch}, batch {a.batch}, {a.image_size}x{a.image_size}, "
          f"float32 (traced; floors for {BANDWIDTH / 1e12:.1f} TB/s, {PEAK / 1e12:.0f} TFLOP/s)")
    print(f"{'kind':7} {'operation':44} {'launches':>8} {'GB':>9} {'GFLOP':>9} {'floor ms':>9}")
    for kind, name, count, nbytes, flops, seconds in table(launches):
        print(f"{KINDS[kind]:7} {name[:44]:44} {count:8d} {nbytes / 1e9:9.3f} {flops / 1e9:9.1f} "
              f"{seconds * 1e3:9.3f}")
    print(summary(launches))


if __name__ == "__main__":
    main()
