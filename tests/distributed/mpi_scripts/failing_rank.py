"""Run under mpirun: one rank fails while the others wait in a collective.

    mpirun -n 3 python failing_rank.py raise|exit|fatal|thread

Rank 1 fails in the way named (an uncaught exception, ``sys.exit`` with a
message inside ``abort_on_failure``, ``distributed.fatal``, an exception in a
worker thread); every other rank enters an allreduce that can never complete.
The job must end at once with a non-zero exit and the line
"rank 1: ..." on stderr, instead of hanging.
"""
import sys
import threading
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
from minitorch_gx import distributed  # noqa: E402


def open_data_folder(path):
    raise FileNotFoundError(f"data folder {path} does not exist")


@distributed.abort_on_failure
def main(mode):
    ctx = distributed.init("cpu")
    distributed.install_failure_handler(ctx)
    distributed.barrier()  # everyone is up
    if ctx.rank == 1:
        if mode == "raise":
            open_data_folder("/no/such/imagenet/train")
        elif mode == "exit":
            sys.exit("error: /no/such/imagenet/train has no class folders")
        elif mode == "fatal":
            distributed.fatal("error: checkpoint /no/such.ckpt is unreadable")
        elif mode == "thread":
            worker = threading.Thread(target=open_data_folder, args=("/no/such/imagenet/val",))
            worker.start()
            worker.join()
            threading.Event().wait(60)  # the main thread would wait for batches forever
    distributed.allreduce_sum(numpy.ones(4))  # never completes: rank 1 does not join
    print(f"rank {ctx.rank}: passed the allreduce (should not happen)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
