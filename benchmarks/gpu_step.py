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
this against a third batch). A line before the last compares the bytes
with the step's one-pass floor: every op reading each input and writing each
output once (only batch norm's statistics passes read a tensor again). The
last line is

    step: N launches, X GB, Y GFLOP, floor Z ms

Figures assumed for the H200: 4.3 TB/s copy bandwidth, 67 TFLOP/s fp32.
Launch latency (a few microseconds each) is not in the floor; the launch
count is its own column for that reason.

On a GPU (``--measure``, the default when one is usable) the real step also
runs there, after warm-up steps, with CUDA events around each device
operation (``minitorch_gx.cuda.timing``): a "measured ms" column beside the
floor, the median over --repeat steps. Then the step without those events,
the device's copy bandwidth (a 1 GiB device-to-device copy) and its fp32
GEMM rate (cuBLAS sgemm 8192^3), each measured; the floors stay those of the
assumed figures, so that tables from different machines compare.
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
KINDS = {"kernel": "ours", "gemm": "cuBLAS", "cupy": "CuPy", "memset": "memset", "h2d": "copy",
         "d2h": "read"}


def _training_step(arch, batch, image_size, num_classes, seed, on_gpu):
    """(run, images, labels): the parts of train.py's Run that ``Run.step``
    reads, with the model on the GPU (the current one, real or traced) when
    ``on_gpu``, and one host batch."""
    model = build_model(arch, num_classes, True, seed=seed)
    if on_gpu:
        model.to("gpu")
    optimizer = SGD(trainer.param_groups(model, 1e-4), lr=0.1, momentum=0.9)
    run = types.SimpleNamespace(
        model=model.train(), optimizer=optimizer, reducer=None,
        scheduler=WarmupCosineLR(optimizer, 100, 1, 10),
        xp=backend.cupy if on_gpu else numpy,
        args=types.SimpleNamespace(label_smooth_factor=0.1),
        stops=types.SimpleNamespace(requested=None))
    rs = numpy.random.RandomState(seed)
    images = rs.randint(0, 256, (batch, image_size, image_size, 3)).astype(numpy.uint8)
    labels = rs.randint(0, num_classes, batch).astype(numpy.int64)
    return run, images, labels


def trace_step(arch, batch, image_size, num_classes=1000, seed=0, device="traced"):
    """The Launches of one training step at this batch size. ``device``
    "emulated": run the step for real on NumPy arrays instead (inside
    ``backend.emulate_kernels()``, the kernels run in the CPU emulator), to
    compare with; returns None."""
    if device == "emulated":
        trainer.Run.step(*_training_step(arch, batch, image_size, num_classes, seed, False))
        return None
    with trace.fake_gpu(record=False):  # a first step: what is made once is made here
        run, images, labels = _training_step(arch, batch, image_size, num_classes, seed, True)
        trainer.Run.step(run, images, labels)
    with trace.fake_gpu() as launches:  # the steady state: the second step
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


def measure_step(arch, batch, image_size, num_classes=1000, repeat=5, warmup=2, event=None,
                 elapsed=None, sync=None):
    """On a GPU: ({(kind, name): (operations, median ms per step)}, [ms of each whole step
    timed without the per-operation events]). ``event``, ``elapsed``, ``sync``:
    stand-ins for CUDA's, for a test that runs this under ``trace.fake_gpu``."""
    import time

    from minitorch_gx.cuda import timing
    sync = sync or (lambda: backend.cupy.cuda.Device().synchronize())
    run, images, labels = _training_step(arch, batch, image_size, num_classes, 0, True)
    for _ in range(warmup):
        trainer.Run.step(run, images, labels)
    sync()
    per_step = []
    for _ in range(repeat):
        with timing.timed(event) as records:
            trainer.Run.step(run, images, labels)
        per_step.append(timing.milliseconds(records, elapsed))
    rows = {key: (count, float(numpy.median([step.get(key, (0, 0.0))[1] for step in per_step])))
            for key, (count, _) in per_step[0].items()}
    whole = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        trainer.Run.step(run, images, labels)
        sync()
        whole.append((time.perf_counter() - t0) * 1e3)
    return rows, whole


def device_rates():
    """(copy bytes/s, sgemm FLOP/s) measured on the current GPU."""
    cupy = backend.cupy
    a = cupy.empty(1 << 28, cupy.float32)  # 1 GiB
    b = cupy.empty_like(a)
    m = cupy.ones((8192, 8192), cupy.float32)
    results = []
    for work, amount in ((lambda: cupy.copyto(b, a), 2 * a.nbytes),
                         (lambda: cupy.matmul(m, m), 2 * 8192 ** 3)):
        work()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(5):
            work()
        end.record()
        end.synchronize()
        results.append(amount * 5 / (cupy.cuda.get_elapsed_time(start, end) / 1e3))
    return tuple(results)


# The kernels whose reads the next kernel of the same op repeats: batch norm
# needs its statistics before it can apply them, so each tensor it reads is
# read twice. Without these launches every op of the step reads each input
# once and writes each output once: the step's one-pass floor of bytes.
REREADING = {"bn_fwd_reduce": "bn_fwd_apply reads x again",
             "bn_bwd_reduce": "bn_bwd_apply reads gy and x again"}


def one_pass_bytes(launches):
    """Bytes of the step if every op touched each of its arrays once."""
    return sum(x.bytes for x in launches if x.name not in REREADING)


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
    p.add_argument("--measure", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the step on the GPU and time each row (default: when a GPU "
                        "is usable)")
    p.add_argument("--repeat", type=int, default=5, help="timed steps (with --measure)")
    a = p.parse_args(argv)
    measure = backend.gpu_available() if a.measure is None else a.measure
    if measure and not backend.gpu_available():
        sys.exit("error: --measure needs a usable CUDA GPU (and CuPy)")
    launches = scaled(a.arch, a.batch, a.image_size, a.classes)
    measured, whole = measure_step(a.arch, a.batch, a.image_size, a.classes,
                                   repeat=a.repeat) if measure else (None, None)
    print(f"one training step of {a.arch}, batch {a.batch}, {a.image_size}x{a.image_size}, "
          f"float32 (traced; floors for {BANDWIDTH / 1e12:.1f} TB/s, {PEAK / 1e12:.0f} TFLOP/s)")
    extra = f" {'measured':>9}" if measured else ""
    print(f"{'kind':7} {'operation':44} {'launches':>8} {'GB':>9} {'GFLOP':>9} {'floor ms':>9}"
          + extra)
    for kind, name, count, nbytes, flops, seconds in table(launches):
        cell = f" {measured.get((kind, name), (0, float('nan')))[1]:9.3f}" if measured else ""
        print(f"{KINDS[kind]:7} {name[:44]:44} {count:8d} {nbytes / 1e9:9.3f} {flops / 1e9:9.1f} "
              f"{seconds * 1e3:9.3f}" + cell)
    if measured:
        copy, gemm = device_rates()
        print(f"measured: step {numpy.median(whole):.2f} ms (median of {len(whole)}; "
              f"{sum(ms for _, ms in measured.values()):.2f} ms in the rows above, timed one by one); "
              f"copy {copy / 1e12:.2f} TB/s, sgemm {gemm / 1e12:.1f} TFLOP/s on this GPU")
    total, once = sum(x.bytes for x in launches), one_pass_bytes(launches)
    print(f"bytes: {total / 1e9:.2f} GB, {total / once:.3f}x the {once / 1e9:.2f} GB of one pass "
          f"per op (the rest: {'; '.join(REREADING.values())})")
    print(summary(launches))


if __name__ == "__main__":
    main()
