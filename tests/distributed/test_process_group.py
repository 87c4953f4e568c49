"""minitorch_gx/distributed/process_group.py: who this process is, the
broadcast of the initial weights and the blocking reductions.

With several ranks these are checked inside mpi_scripts/bucketed_allreduce.py
("ok helpers", run by test_reducer.py) and data_parallel_sgd.py (the
broadcast); here, one rank (no mpirun): every call is a no-op.
"""
import numpy

from minitorch_gx import distributed
from minitorch_gx.nn import Parameter


def test_one_rank_is_a_no_op():
    ctx = distributed.Context()
    rng = numpy.random.default_rng(0)
    params = [Parameter(rng.standard_normal(s)) for s in [(5, 3), (7,), (2, 2)]]
    grads = [rng.standard_normal(p.shape) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.copy()
    reducer = distributed.GradientAllreducer(params, bucket_mb=25, ctx=ctx)
    reducer.synchronize()
    for p, g in zip(params, grads):
        numpy.testing.assert_array_equal(p.grad, g)
    arrays = [numpy.arange(4.0)]
    distributed.broadcast_parameters(arrays, ctx=ctx)
    numpy.testing.assert_array_equal(arrays[0], numpy.arange(4.0))
    assert distributed.allreduce_sum(3, ctx=ctx) == 3
    assert distributed.allreduce_mean(numpy.float64(2.5), ctx=ctx) == 2.5
    distributed.barrier(ctx)
