"""Data-parallel training over MPI: one process per device, gradients averaged.

    mpirun -n 8 python train.py --run_distribute=1 ...      # 8 GPUs of one host
    mpirun -f hosts -n 16 python train.py --run_distribute=1 ...  # across hosts

Every rank holds the whole model, reads its own shard of the data, starts from
rank 0's weights (``broadcast_parameters``) and, before every optimizer step,
replaces its gradients by their mean over all ranks (``GradientAllreducer``).
All ranks then take the same step and the weights stay identical; batch-norm
statistics stay per rank, as in the original.

How the gradients travel (the design of ChainerMN's pure-NCCL communicator and
of PyTorch DDP's reducer):
* Flat buckets. Hundreds of small allreduce calls cost hundreds of latencies,
  so parameters are grouped into buckets of about ``bucket_mb`` MiB; each
  bucket owns one flat buffer, and one allreduce (a sum) moves all its
  gradients. The sum is divided by the world size once, while unpacking.
* Overlap. Backward produces gradients from the last layer to the first, so
  buckets are filled in reverse registration order. A post-accumulate-grad hook
  on every parameter counts down its bucket; when the bucket is complete it is
  packed and a non-blocking allreduce starts (MPI ``Iallreduce`` on host
  buffers, or NCCL on a side stream) while backward goes on with the earlier
  layers. ``synchronize()`` waits for the rest and unpacks.
* Same order everywhere. MPI and NCCL need every rank to issue its collectives
  in the same order, so buckets are launched strictly by index: a bucket that
  completes early waits (packed) for the buckets before it.
* Decisions together. A few named flags (stop, non-finite) can ride in the
  last bucket, summed over the ranks, so that every rank stops or skips at the
  same step without an extra collective (``flags=``, ``set_flags``, ``flags``).

Every collective has a deadline (``init(timeout=600.0)``, ``ctx.timeout``): a
rank that does not answer in time ends the job with one line naming the
collective and the late rank, instead of a silent hang (deadlines.py).

World size 1, or a process started without mpirun (or without mpi4py), is an
explicit no-op: ``init()`` returns a one-rank Context and every function here
returns its input or does nothing. mpi4py is imported lazily, so this package
imports without it.

    process_group.py  who this process is (Context, init), broadcast, the
                      blocking metric reductions, barrier
    reducer.py        GradientAllreducer: flat buckets that reduce while
                      backward runs
    transports.py     how a bucket is summed: MPI on host buffers, NCCL,
                      CUDA-aware MPI, MPI through pinned host buffers
    deadlines.py      every collective's deadline; who did not answer
    failures.py       one failing rank ends the whole job
"""
from .failures import abort_on_failure, describe_error, fatal, install_failure_handler
from .process_group import (Context, allreduce_inplace, allreduce_mean, allreduce_sum, barrier,
                            broadcast_parameters, get_context, init)
from .reducer import GradientAllreducer

__all__ = ["Context", "init", "get_context", "GradientAllreducer", "broadcast_parameters",
           "allreduce_sum", "allreduce_mean", "allreduce_inplace", "barrier",
           "install_failure_handler", "abort_on_failure", "fatal", "describe_error"]
