"""Run under mpirun: Ctrl-C stops every rank after the same step.

    mpirun -n 2 python ctrl_c.py

What train.py does with SIGINT/SIGTERM: the handler only sets a flag; the
flag travels in the reducer's control vector with each step's gradients, and
every rank stops once the sum is > 0, after the same step, with exit status
130. mpirun forwards Ctrl-C (SIGINT) to every rank, each at its own moment,
possibly while the others are inside an allreduce. Each rank prints "rank R:
armed" as soon as its handler is in place, then "rank R: stopped at step K";
without a signal it gives up after about 5 s and exits 0.
"""
import os
import signal
import sys

requested = []  # the signals received, in order


def _on_signal(signum, frame):
    requested.append(signum)  # nothing else: the step loop decides, with the others


signal.signal(signal.SIGINT, _on_signal)
signal.signal(signal.SIGTERM, _on_signal)
print(f"rank {os.environ.get('PMI_RANK', '?')}: armed", flush=True)  # set by mpirun

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
from minitorch_gx import distributed  # noqa: E402
from minitorch_gx.nn import Parameter  # noqa: E402

MAX_STEPS = 500  # about 5 s at 10 ms a step


def main():
    ctx = distributed.init("cpu", timeout=20)
    distributed.install_failure_handler(ctx)
    rank, world = ctx.rank, ctx.world_size
    params = [Parameter(numpy.zeros(s)) for s in [(6,), (5, 4), (3,)]]
    reducer = distributed.GradientAllreducer(params, bucket_mb=50 / 2 ** 20, flags=("stop",))
    for step in range(1, MAX_STEPS + 1):
        for p in params:
            p.grad = None
        loss = None
        for p in params:
            term = (p * float(rank + step)).sum()
            loss = term if loss is None else loss + term
        loss.backward()
        reducer.set_flags(stop=bool(requested))
        reducer.synchronize()
        expect = sum(r + step for r in range(world)) / world
        assert all(numpy.all(p.grad == expect) for p in params), f"step {step}: wrong mean"
        if reducer.flags["stop"] > 0:
            print(f"rank {rank}: stopped at step {step}", flush=True)
            sys.exit(130)  # as a shell reports a Ctrl-C
        time.sleep(0.01)
    print(f"rank {rank}: no signal came", flush=True)


if __name__ == "__main__":
    main()
