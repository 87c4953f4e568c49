"""What computing a convolution's gx and gW side by side (``cpu.side_by_side``) does to CPU steps.

    python benchmarks/bench_side_by_side.py                     # batch 32, 64x64, 10 rounds
    python benchmarks/bench_side_by_side.py --batch 16 --image_size 224 --rounds 5
    python benchmarks/bench_side_by_side.py --with-1x1          # 1x1 convolutions too

Whole training steps of resnext50_32x4d (train.py's step, as in
bench_train.py, inside ``cpu.cores_awake`` as train.py's are) alternate
with the input and weight gradients of every kernel larger than 1x1
computed side by side, on two threads, and one after the other (each
then with its blocks split over the threads: ``THREADED_MIN_MACS`` in
minitorch_gx/ops/conv.py), in ABBA order in one process, so that the
drift of a shared machine falls on both alike; each round times one step
of each after an untimed one. Printed for each: the median step and the median time in the backward of the kernels
larger than 1x1 (ResNeXt's grouped 3x3s, and its stem, which has no input
gradient and so nothing to put side by side), and in how many rounds side
by side was the faster. The two give the same bits
(tests/ops/test_conv.py). ``--with-1x1`` asks whether the 1x1 convolutions
should go side by side too: it alternates every kernel side by side (each
GEMM then on one BLAS thread) with the rule (only kernels larger than 1x1),
and times the 1x1 convolutions' backward only.
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
from minitorch_gx import backend, cpu  # noqa: E402
from minitorch_gx.ops import conv as ops_conv  # noqa: E402

WAYS = ("side by side", "in turn")


def timed_backwards(spent, pointwise):
    """Conv2d.backward, adding the time of each 1x1 kernel (``pointwise``)
    or of each larger one to spent["backward"]."""
    backward = ops_conv.Conv2d.backward

    def timed(self, gy):
        t0 = time.perf_counter()
        grads = backward(self, gy)
        if (self.W.shape[2:] == (1, 1)) == pointwise:
            spent["backward"] += time.perf_counter() - t0
        return grads

    return timed


def every_kernel(gy, W):
    """The NumPy fast path's rule without its exception for 1x1 kernels."""
    return backend.choose(gy, reference=False, fast=True, kernel=False)


def in_turn(gy, W):
    return False


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--with-1x1", action="store_true",
                   help="the 1x1 convolutions side by side too, against the rule")
    args = p.parse_args()
    step, threads = cpu_step_for(args, "side by side")
    print(f"threads: {threads}; batch {args.batch}, {args.image_size}x{args.image_size}")
    spent = {"backward": 0.0}
    ops_conv.Conv2d.backward = timed_backwards(spent, args.with_1x1)
    # (side by side, in turn): the rule against none; with 1x1s, every kernel against the rule
    rules = (every_kernel, ops_conv._side_by_side) if args.with_1x1 else (ops_conv._side_by_side,
                                                                          in_turn)
    arms = {way: functools.partial(setting, ops_conv, "_side_by_side", rule)
            for way, rule in zip(WAYS, rules)}
    with cpu.cores_awake():
        step()
        times = alternate_steps(step, arms, args.rounds, spent)
    kinds = "1x1 kernels" if args.with_1x1 else "kernels > 1x1"
    for way in WAYS:
        steps, backwards = times[way]["step"], times[way]["backward"]
        print(f"{way:12s}: median step {statistics.median(steps) * 1000:6.0f} ms, "
              f"backward of the {kinds} {statistics.median(backwards) * 1000:6.1f} ms"
              f"  (steps ms: {[round(t * 1000) for t in steps]})")
    for what, key in (("step", "step"), ("their backward", "backward")):
        faster = sum(a < b for a, b in zip(times[WAYS[0]][key], times[WAYS[1]][key]))
        print(f"{what}: side by side faster in {faster} of {args.rounds} rounds")


if __name__ == "__main__":
    main()
