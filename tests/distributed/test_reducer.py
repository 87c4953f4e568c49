"""minitorch_gx/distributed/reducer.py: the bucketed gradient allreduce, identical
weights on every rank, and equivalence with one process at the global batch.

The multi-rank cases launch ``mpirun -n 2`` / ``-n 3`` on the scripts in
mpi_scripts/ and check their output and exit status; they skip when mpi4py or
mpirun is missing. The bucket layout is checked in this process.
"""
import json
import re

import numpy
import pytest

from minitorch_gx import distributed
from minitorch_gx.nn import Parameter
from tests.distributed.launch import launch, needs_mpirun, report


@needs_mpirun
@pytest.mark.parametrize("n", [2, 3])
def test_bucketed_allreduce_is_the_mean(n):
    """Odd sizes, two dtypes, several buckets, unused parameters, in-place
    gradients, no_sync accumulation and the helpers (checks inside the script)."""
    proc, _ = launch(n, "bucketed_allreduce.py")
    assert proc.returncode == 0, report(proc)
    lines = proc.stdout.splitlines()
    assert "ALL OK" in lines, report(proc)
    assert sum(line.startswith("ok ") for line in lines) == 7, report(proc)


@needs_mpirun
@pytest.mark.parametrize("n, flags", [(2, False), (3, False), (2, True)])
def test_data_parallel_sgd_matches_one_process(n, flags):
    """With ``flags`` the reducer also carries flags in its last bucket."""
    proc, _ = launch(n, "data_parallel_sgd.py", *(["--flags"] if flags else []))
    assert proc.returncode == 0, report(proc)
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert [(r["model"], r["bn_training"]) for r in results] == \
        [("mlp", False), ("conv", False), ("conv", True)], report(proc)
    for r in results:
        assert r["world"] == n and r["buckets"] >= 2 and r["flags"] == flags, r
        # the same weights on every rank, to the bit, after several steps
        assert r["identical"], r
        assert r["max_weight_change"] > 1e-3, r  # training did move them
        if r["bn_training"]:
            # batch-norm statistics stay per rank, as in the original
            assert r["bn_stats_differ"], r
        else:
            # the broadcast made rank 0's running statistics everyone's
            assert not r["bn_stats_differ"], r
            # N ranks at batch b == one process at batch N*b (float64)
            assert r["max_diff_vs_one_process"] < 1e-12, r


@needs_mpirun
@pytest.mark.parametrize("n", [2, 3])
def test_flags_give_every_rank_the_same_decision_at_the_same_step(n):
    """Rank 1 sets nonfinite on step 3 only: every rank sees the sum there and
    stops at step 3; the gradients stay exact (checks inside the script)."""
    proc, _ = launch(n, "control_flags.py")
    assert proc.returncode == 0, report(proc)
    stops = sorted(re.findall(r"rank (\d+): stopped at step (\d+)", proc.stdout))
    assert stops == [(str(r), "3") for r in range(n)], report(proc)
    assert "ALL OK" in proc.stdout.splitlines(), report(proc)


def test_flags_on_one_rank_are_this_rank_s_values():
    ctx = distributed.Context()
    params = [Parameter(numpy.zeros(3))]
    reducer = distributed.GradientAllreducer(params, ctx=ctx, flags=("stop", "nonfinite"))
    assert reducer.flags == {"stop": 0.0, "nonfinite": 0.0}
    reducer.set_flags(stop=True)
    reducer.synchronize()
    assert reducer.flags == {"stop": 1.0, "nonfinite": 0.0}
    reducer.synchronize()  # the values go back to 0 after each synchronize()
    assert reducer.flags == {"stop": 0.0, "nonfinite": 0.0}
    assert reducer.step_count == 2
    reducer.set_flags(nonfinite=numpy.asarray(True))  # a device value, kept as it is
    reducer.synchronize()
    assert reducer.flag_sum("nonfinite").shape == () and reducer.flag_sum("nonfinite")
    assert reducer.flags == {"stop": 0.0, "nonfinite": 1.0}
    with pytest.raises(ValueError, match="unknown flag 'halt'"):
        reducer.set_flags(halt=1)
    with pytest.raises(ValueError, match="carries no flags"):
        distributed.GradientAllreducer(params, ctx=ctx).set_flags(stop=1)


def test_flags_ride_in_the_last_bucket_without_changing_the_layout():
    ctx = distributed.Context()
    params = [Parameter(numpy.zeros(s)) for s in [(10,), (30,), (5,), (40,), (3,)]]
    reducer = distributed.GradientAllreducer(params, bucket_mb=300 / 2 ** 20, ctx=ctx,
                                             flags=("stop", "nonfinite"))
    assert reducer.bucket_sizes == [43, 45]  # as without flags
    assert [b.flat.size for b in reducer.buckets] == [43, 47]


@needs_mpirun
def test_a_short_deadline_does_not_fire_in_a_normal_run():
    """bucketed_allreduce.py with every collective under a 2 s deadline."""
    proc, _ = launch(2, "bucketed_allreduce.py", "cpu", "mpi", "2")
    assert proc.returncode == 0, report(proc)
    assert "ALL OK" in proc.stdout.splitlines() and "timed out" not in proc.stderr, report(proc)


def test_buckets_follow_backward_order_and_size_cap():
    ctx = distributed.Context()
    shapes = [(10,), (30,), (5,), (40,), (3,)]  # float64: 80, 240, 40, 320, 24 bytes
    params = [Parameter(numpy.zeros(s)) for s in shapes]
    reducer = distributed.GradientAllreducer(params, bucket_mb=300 / 2 ** 20, ctx=ctx)
    # reversed: 3, 40 (344 B >= 300: close), 5, 30 (280 B), 10 (360 B: close)
    assert [[p.shape[0] for p in b.params] for b in reducer.buckets] == [[3, 40], [5, 30, 10]]
    assert reducer.bucket_sizes == [43, 45]
    assert [b.offsets for b in reducer.buckets] == [[0, 3], [0, 5, 35]]
