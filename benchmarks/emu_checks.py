"""What the emulator's checks cost: launch time of a few real kernels with the
checks off, each check alone, and all of them (the default), on the CPU.

    python benchmarks/emu_checks.py              # median of 5 runs per cell
    python benchmarks/emu_checks.py --repeat 9 --only conv bn

Each cell is the median wall time (ms) of one launcher call (the launch, its
argument checks and ``check_written``) at a small ResNeXt-like shape, float32,
the default block sizes, index-order schedule; the last column is all / off.
A launch with a memory check runs its blocks on one OS thread (see
minitorch_gx/cuda/emulator.py), so part of their cost is the second core they
give up: "off" runs on MINITORCH_GX_EMU_WORKERS threads (default 2), "off, 1
thread" shows the same launch on one.
"""
import argparse
import os
import statistics
import sys
import time

import numpy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minitorch_gx.cuda import conv as cuda_conv, elementwise as cuda_elementwise  # noqa: E402
from minitorch_gx.cuda import emulator, loss as cuda_loss  # noqa: E402
from minitorch_gx.cuda import norm as cuda_norm, pool as cuda_pool  # noqa: E402


def _cases():
    """(name, shape text, launcher call): inputs made once, outside the timing."""
    rng = numpy.random.default_rng(0)

    def data(*shape):
        return rng.standard_normal(shape).astype(numpy.float32)

    x, W = data(4, 64, 14, 14), data(64, 16, 3, 3)  # 4 groups of 16 channels
    y = cuda_conv.conv2d_forward(x, W, 1, 1, 4)
    xs, gamma, beta = data(8, 64, 14, 14), numpy.ones(64, numpy.float32), \
        numpy.zeros(64, numpy.float32)
    _, mean, invstd = cuda_norm.batch_norm_train_forward(xs, gamma, beta, 1e-5, True)
    stem = data(4, 16, 28, 28)
    logits, labels = data(64, 1000), rng.integers(0, 1000, 64)
    return [
        ("conv", "grouped_conv2d_fwd (4,64,14,14) g4 3x3",
         lambda: cuda_conv.conv2d_forward(x, W, 1, 1, 4)),
        ("conv", "grouped_conv2d_bwd_data, same",
         lambda: cuda_conv.conv2d_backward_data(y, W, x.shape, 1, 1, 4)),
        ("conv", "grouped_conv2d_bwd_weight, same",
         lambda: cuda_conv.conv2d_backward_weight(y, x, W.shape, 1, 1, 4)),
        ("bn", "batch norm train forward (8,64,14,14)",
         lambda: cuda_norm.batch_norm_train_forward(xs, gamma, beta, 1e-5, True)),
        ("bn", "batch norm backward, same",
         lambda: cuda_norm.batch_norm_backward(xs, xs, gamma, beta, mean, invstd, True)),
        ("pool", "max_pool2d_fwd (4,16,28,28) 3x3/2",
         lambda: cuda_pool.max_pool2d_forward(stem, 3, 2, 1)),
        ("xent", "softmax_xent_fwd (64,1000)",
         lambda: cuda_loss.softmax_cross_entropy_forward(logits, labels, 0.1)),
        ("ew", "add_relu_fwd (8,64,14,14)", lambda: cuda_elementwise.add_relu_forward(xs, xs)),
    ]


def _median_ms(call, repeat, checks, workers=None):
    saved = os.environ.get("MINITORCH_GX_EMU_WORKERS")
    if workers:
        os.environ["MINITORCH_GX_EMU_WORKERS"] = str(workers)
    try:
        with emulator.checks(*checks) if checks else emulator.checks(False):
            call()  # builds (cached on disk) and warms up
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                call()
                times.append(time.perf_counter() - t)
    finally:
        if workers:
            os.environ.pop("MINITORCH_GX_EMU_WORKERS")
            if saved is not None:
                os.environ["MINITORCH_GX_EMU_WORKERS"] = saved
    return 1e3 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per cell (median)")
    parser.add_argument("--only", nargs="*", choices=["conv", "bn", "pool", "xent", "ew"],
                        help="kernel families to time (default: all)")
    args = parser.parse_args(argv)
    settings = [("off", (), None), ("off, 1 thread", (), 1)] + \
        [(c, (c,), None) for c in emulator.CHECKS] + [("all", emulator.CHECKS, None)]
    print("| launch | " + " | ".join(name for name, _, _ in settings) + " | all / off |")
    print("| --- |" + " ---: |" * (len(settings) + 1))
    for family, what, call in _cases():
        if args.only and family not in args.only:
            continue
        row = [_median_ms(call, args.repeat, checks, workers) for _, checks, workers in settings]
        print(f"| {what} | " + " | ".join(f"{ms:.1f}" for ms in row) +
              f" | {row[-1] / row[0]:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
