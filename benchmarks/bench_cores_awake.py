"""What keeping the cores awake (``minitorch_gx.cpu.cores_awake``) does to CPU steps.

    python benchmarks/bench_cores_awake.py                       # batch 32, 64x64, 8 rounds
    python benchmarks/bench_cores_awake.py --batch 16 --image_size 224 --rounds 4
    python benchmarks/bench_cores_awake.py --passes-only         # the hand-off alone

Whole training steps of resnext50_32x4d (train.py's step, as in
bench_train.py) alternate with and without the keepers in one process, in
ABBA order (awake, asleep, asleep, awake, ...), so that the drift of a
shared machine falls on both alike; each round times one step of each
after an untimed one. Printed: the median step of each, and in how many
rounds the awake step was the faster. ``--passes-only`` times what the
keepers act on: one element-wise pass of 2M float32, on one thread and
split over two (``cpu.run_blocks``), with the keepers on and off.
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import minitorch_gx  # noqa: E402, F401  (before NumPy, as train.py: see minitorch_gx/cpu.py)
import numpy  # noqa: E402
from bench_train import alternate_steps, ours_step, random_batch  # noqa: E402  (this folder)
from minitorch_gx import cpu  # noqa: E402


def median_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def passes(reps=41):
    n = 1 << 21
    a, b = numpy.ones(n, numpy.float32), numpy.ones(n, numpy.float32)

    def one():
        numpy.multiply(a, b, out=a)

    def two():
        def block(i, j):
            numpy.multiply(a[i:j], b[i:j], out=a[i:j])
        cpu.run_blocks(block, n, min_rows=1, gemms=False)

    for awake in (False, True):
        with cpu.cores_awake() if awake else contextlib.nullcontext():
            print(f"2M-element multiply, keepers {'on ' if awake else 'off'}: "
                  f"one thread {median_ms(one, reps):.3f} ms, two {median_ms(two, reps):.3f} ms")


def steps(args):
    step = ours_step(argparse.Namespace(device="cpu", arch="resnext50_32x4d", tf32=False),
                     *random_batch(args.batch, args.image_size))
    step()
    times = alternate_steps(step, {True: cpu.cores_awake, False: contextlib.nullcontext},
                            args.rounds)
    times = {awake: t["step"] for awake, t in times.items()}
    faster = sum(a < b for a, b in zip(times[True], times[False]))
    for awake in (True, False):
        print(f"keepers {'on ' if awake else 'off'}: median step "
              f"{statistics.median(times[awake]) * 1000:.0f} ms  "
              f"(ms: {[round(t * 1000) for t in times[awake]]})")
    print(f"awake faster in {faster} of {args.rounds} rounds; ratio of medians "
          f"{statistics.median(times[True]) / statistics.median(times[False]):.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--passes-only", action="store_true")
    args = p.parse_args()
    try:
        usable = cpu.threads() >= 2 and cpu.keep_awake_enabled()
    except ValueError as e:  # a bad MINITORCH_GX_THREADS or MINITORCH_GX_KEEP_AWAKE
        sys.exit(f"error: {e}")
    if not usable:
        sys.exit("error: the keepers need 2 or more threads and MINITORCH_GX_KEEP_AWAKE unset or 1")
    with cpu.cores_awake() as probe:
        if not probe.started:
            sys.exit("error: no keepers can run here (no glibc pthread_spin_lock)")
    print(f"threads: {cpu.threads()}")
    passes()
    if not args.passes_only:
        steps(args)


if __name__ == "__main__":
    main()
