"""What splitting a convolution's blocks over the threads (``THREADED_MIN_MACS``) does to CPU steps.

    python benchmarks/bench_conv_threads.py                     # batch 32, 64x64, 12 rounds
    python benchmarks/bench_conv_threads.py --batch 16 --image_size 224 --rounds 4
    python benchmarks/bench_conv_threads.py --arch resnext_mini --image_size 48 --rounds 30

A convolution's NumPy fast path works in blocks (chunks of images for MEC,
blocks of groups and images when folded: minitorch_gx/ops/conv.py). Whole
training steps (train.py's step, as in bench_train.py, inside
``cpu.cores_awake`` as train.py's are) alternate in ABBA order in one
process between every convolution's blocks split over the threads and
none (``THREADED_MIN_MACS`` 0 and unreachable; the rule in between splits
those of 16M multiply-adds or more); each round times one step of each after
an untimed one. In a backward the input and weight gradients run side by
side, one per core, and their blocks in place either way: what differs is
the forward's. Printed for each: the median step and the median times of
the grouped 3x3s' forward and of the stem's, and in how many rounds the
split one was the faster. The two give the same bits (tests/test_cpu.py).
"""
import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import minitorch_gx  # noqa: E402, F401  (before NumPy, as train.py: see minitorch_gx/cpu.py)
from bench_train import alternate_steps, cpu_step_for, setting  # noqa: E402  (this folder)
from minitorch_gx import cpu  # noqa: E402
from minitorch_gx.ops import conv as ops_conv  # noqa: E402

WAYS = {"split": 0, "one thread": 1 << 62}  # THREADED_MIN_MACS for each


def time_forwards(spent):
    """Wrap conv2d_forward so that kernels larger than 1x1 add their time to
    spent["grouped"] (groups > 1) or spent["stem"]."""
    forward = ops_conv.conv2d_forward

    def timed(x, W, stride, padding, groups):
        if W.shape[2:] == (1, 1):
            return forward(x, W, stride, padding, groups)
        t0 = time.perf_counter()
        try:
            return forward(x, W, stride, padding, groups)
        finally:
            spent["grouped" if groups > 1 else "stem"] += time.perf_counter() - t0

    ops_conv.conv2d_forward = timed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--arch", choices=["resnext50_32x4d", "resnext_mini"],
                   default="resnext50_32x4d")
    args = p.parse_args()
    step, threads = cpu_step_for(args, "splitting")
    spent = {"grouped": 0.0, "stem": 0.0}
    time_forwards(spent)
    arms = {way: functools.partial(setting, ops_conv, "THREADED_MIN_MACS", value)
            for way, value in WAYS.items()}
    with cpu.cores_awake():
        print(f"threads: {threads}; {args.arch}, batch {args.batch}, "
              f"{args.image_size}x{args.image_size}; {args.rounds} ABBA rounds")
        step()
        times = alternate_steps(step, arms, args.rounds, spent)
    for way in WAYS:
        t = {k: statistics.median(v) * 1000 for k, v in times[way].items()}
        print(f"{way:10s}: median step {t['step']:6.0f} ms, forward of the grouped "
              f"convolutions {t['grouped']:6.1f} ms, of the stem {t['stem']:5.1f} ms")
    for k, what in (("step", "step"), ("grouped", "grouped forward"), ("stem", "stem forward")):
        faster = sum(a < b for a, b in zip(times["split"][k], times["one thread"][k]))
        print(f"{what}: split faster in {faster} of {args.rounds} rounds")


if __name__ == "__main__":
    main()
