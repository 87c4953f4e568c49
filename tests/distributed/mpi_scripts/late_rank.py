"""Run under mpirun: one rank stops answering; the others' deadline must end the job.

    mpirun -n 3 python late_rank.py stop|sleep|stop-inside|setup LATE COLLECTIVE TIMEOUT PIDFILE

Every rank trains two steps with a GradientAllreducer (so that the counts of
collectives entered are not trivial), then rank LATE freezes (``stop``:
SIGSTOP to itself) or never comes (``sleep``: sleeps a minute), while the
others enter COLLECTIVE; with ``stop-inside`` LATE enters it first and a timer
stops it there 0.3 s later, while the others enter 1 s late; with ``setup``
LATE sleeps before it joins the job, while the others set up (COLLECTIVE
"init") (allreduce_sum
then sums 16 MB, which cannot complete without LATE). COLLECTIVE: bucket, barrier, broadcast_object, allreduce_sum or
broadcast_parameters. With a deadline of TIMEOUT seconds the job must end with
one line "rank R: <collective> timed out ...: rank LATE did not answer ...".
Every rank prints "rank R: pid P" and, before the collective that cannot
complete, "rank R: entering at <time.time()>"; LATE writes its pid to PIDFILE
so that the test can kill it should it survive.
"""
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
from minitorch_gx import distributed  # noqa: E402
from minitorch_gx.nn import Parameter  # noqa: E402

MODE, LATE, COLLECTIVE, TIMEOUT, PIDFILE = sys.argv[1], int(sys.argv[2]), sys.argv[3], \
    float(sys.argv[4]), sys.argv[5]


def step(params, reducer, rank):
    for p in params:
        p.grad = None
    loss = None
    for p in params:
        term = (p * float(rank + 1)).sum()
        loss = term if loss is None else loss + term
    loss.backward()
    reducer.synchronize()


def late_to_join():
    rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "-1")))
    if rank == LATE:
        Path(PIDFILE).write_text(str(os.getpid()))
        time.sleep(60)
    print(f"rank {rank}: entering at {time.time():.3f}", flush=True)
    distributed.init("cpu", timeout=TIMEOUT)
    print(f"rank {rank}: passed the setup (should not happen)", flush=True)


def main():
    if MODE == "setup":
        return late_to_join()
    ctx = distributed.init("cpu", timeout=TIMEOUT)
    distributed.install_failure_handler(ctx)
    rank = ctx.rank
    params = [Parameter(numpy.ones(s)) for s in [(5,), (7, 3), (4,)]]
    reducer = distributed.GradientAllreducer(params, bucket_mb=30 / 2 ** 20)  # 3 buckets
    assert len(reducer.buckets) == 3, reducer.bucket_sizes
    for _ in range(2):
        step(params, reducer, rank)
    distributed.barrier()
    print(f"rank {rank}: pid {os.getpid()}", flush=True)
    if rank == LATE:
        Path(PIDFILE).write_text(str(os.getpid()))
        if MODE == "stop-inside":
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGSTOP)).start()
        elif MODE == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            time.sleep(60)
    elif MODE == "stop-inside":
        time.sleep(1.0)  # the late rank is inside the collective, then frozen there
    print(f"rank {rank}: entering at {time.time():.3f}", flush=True)
    if COLLECTIVE == "bucket":
        step(params, reducer, rank)
    elif COLLECTIVE == "barrier":
        distributed.barrier()
    elif COLLECTIVE == "broadcast_object":
        ctx.broadcast_object("run folder" if rank == 0 else None)
    elif COLLECTIVE == "allreduce_sum":
        distributed.allreduce_sum(numpy.ones(4_000_000, numpy.float32) if MODE == "stop-inside"
                                  else 1.5)
    elif COLLECTIVE == "broadcast_parameters":
        distributed.broadcast_parameters(params)
    print(f"rank {rank}: passed the {COLLECTIVE} (should not happen)", flush=True)


if __name__ == "__main__":
    main()
