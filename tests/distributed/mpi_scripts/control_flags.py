"""Run under mpirun: flags carried inside the gradient allreduce.

    mpirun -n 2 python control_flags.py [cpu|gpu]

The parameters and rank-dependent gradients of bucketed_allreduce.py, with a
reducer that carries the flags ("stop", "nonfinite", "count"). Each step
every rank sets count=1 (the sum is the world size), sets its flags either
before backward or between backward and synchronize() (as a trainer does),
and checks the mean gradients to the last bit. Rank 1 sets nonfinite on step
3 only; every rank must see the sum 1 there and stop: each prints "rank R:
stopped at step S". Then a reducer whose last bucket is float32 carries the
flags too, and the flags-only reducer of a model without parameters. Rank 0
prints "ALL OK" at the end.
"""
import sys

import numpy

from bucketed_allreduce import SHAPES, backward, check_close, coefficients, expected_mean, \
    make_params  # the script's own folder is on sys.path
from minitorch_gx import distributed  # noqa: E402  (bucketed_allreduce put the repository on sys.path)

FLAGS = ("stop", "nonfinite", "count")


def say(line):
    """One write per line: print() writes the text and the newline apart, and
    mpirun may interleave another rank's line between them."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main():
    ctx = distributed.init(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    distributed.install_failure_handler(ctx)
    rank, world = ctx.rank, ctx.world_size
    assert world > 1, "run me under mpirun -n 2 or more"
    params = make_params()
    reducer = distributed.GradientAllreducer(params, bucket_mb=100 / 2 ** 20, flags=FLAGS)
    assert sum(reducer.bucket_sizes) == 64 and len(reducer.buckets) >= 4, reducer.bucket_sizes
    assert reducer.flags == {"stop": 0.0, "nonfinite": 0.0, "count": 0.0}

    stopped = None
    for step in range(1, 8):
        for p in params:
            p.grad = None
        # nonfinite as a 0-d array, as the trainer computes it on the device
        flags = {"nonfinite": numpy.asarray(rank == 1 and step == 3), "count": 1}
        if step % 2:
            reducer.set_flags(**flags)   # before backward
        backward(params, coefficients(rank, step))
        # the last bucket (with the flags) waits for synchronize(); the others overlap
        started = [b.started for b in reducer.buckets]
        assert started == [True] * (len(started) - 1) + [False], started
        if not step % 2:
            reducer.set_flags(**flags)   # after backward, before synchronize
        reducer.synchronize()
        check_close(params, expected_mean(world, step), f"step {step}")
        assert reducer.flags == {"stop": 0.0, "nonfinite": float(step == 3), "count": world}, \
            (step, reducer.flags)
        summed = reducer.flag_sum("nonfinite")  # not read back: a 0-d array for a kernel
        assert isinstance(summed, numpy.ndarray) and summed.shape == () and \
            float(summed) == float(step == 3), summed
        if reducer.flags["nonfinite"] > 0:
            stopped = step
            break
    say(f"rank {rank}: stopped at step {stopped}")

    # flags left unset count 0 (the values go back to 0 after every synchronize)
    backward(params, coefficients(rank, 20))
    reducer.synchronize()
    assert reducer.flags == dict.fromkeys(FLAGS, 0.0), reducer.flags

    # the last bucket float32 (registration reversed): flags summed in float32
    params = make_params()  # fresh ones: the first reducer's hooks stay on the old ones
    reducer32 = distributed.GradientAllreducer(list(reversed(params)), bucket_mb=100 / 2 ** 20,
                                               flags=FLAGS)
    assert reducer32.buckets[-1].flat.dtype == numpy.float32
    for p in params:
        p.grad = None
    backward(params, coefficients(rank, 21))
    reducer32.set_flags(stop=rank + 1, count=2)
    reducer32.synchronize()
    check_close(params, expected_mean(world, 21), "float32 last bucket")
    assert reducer32.flags == {"stop": world * (world + 1) / 2, "nonfinite": 0.0,
                               "count": 2.0 * world}, reducer32.flags

    # no parameters at all: the flags travel alone
    alone = distributed.GradientAllreducer([], flags=("stop",))
    alone.set_flags(stop=True)
    alone.synchronize()
    assert alone.flags == {"stop": float(world)}, alone.flags
    assert len(SHAPES) == len(params)
    distributed.barrier()
    if rank == 0:
        say("ALL OK")


if __name__ == "__main__":
    main()
