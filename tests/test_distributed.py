"""Data-parallel training: bucketed allreduce, identical weights, equivalence
with one process at the global batch, and a failing rank ending the job.

The multi-rank cases launch ``mpirun -n 2`` / ``-n 3`` on the scripts in
tests/mpi_scripts/ and check their output and exit status; they skip when
mpi4py or mpirun is missing. The one-rank cases run in this process.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest

from minitorch_gx import backend, distributed
from minitorch_gx.nn import Parameter

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
TIMEOUT_S = 120


def find_mpirun():
    """The mpirun of the MPI mpi4py was installed with: the PyPI mpich wheel
    puts it next to the interpreter (in a virtual environment, its bin/)."""
    beside = Path(sys.executable).parent / "mpirun"
    if beside.exists():
        return str(beside)
    return shutil.which("mpirun") or shutil.which("mpiexec")


MPIRUN = find_mpirun() if importlib.util.find_spec("mpi4py") else None
needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="needs mpi4py and mpirun "
                                  "(pip install mpi4py mpich)")


def launch(n, script, *args):
    """Run ``mpirun -n n python script args``; returns (CompletedProcess, seconds)."""
    extra = os.environ.get("MINITORCH_GX_MPIRUN_ARGS", "").split()
    version = subprocess.run([MPIRUN, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        extra.append("--oversubscribe")  # 3 ranks on a 2-core machine
    cmd = [MPIRUN, *extra, "-n", str(n), sys.executable, str(SCRIPTS / script), *args]
    # One BLAS thread per rank: the ranks already share the cores.
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=REPO)
    return proc, time.monotonic() - start


def report(proc):
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"


# --------------------------------------------------------------------------
# Several ranks
# --------------------------------------------------------------------------
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
@pytest.mark.skipif(not backend.gpu_available(), reason="needs a CUDA GPU and CuPy")
@pytest.mark.parametrize("transport", ["auto", "mpi-host-staged", "nccl"])
def test_bucketed_allreduce_on_gpu(transport):
    """Two ranks on the GPU(s): sharing one GPU, "auto" picks MPI through pinned
    host memory; with two GPUs and NCCL it picks NCCL."""
    if transport == "nccl":
        from minitorch_gx import distributed_nccl
        if distributed_nccl.nccl_module() is None or backend.cupy.cuda.runtime.getDeviceCount() < 2:
            pytest.skip("NCCL needs CuPy with NCCL and two GPUs")
    proc, _ = launch(2, "bucketed_allreduce.py", "gpu", *([] if transport == "auto" else [transport]))
    assert proc.returncode == 0, report(proc)
    assert "ALL OK" in proc.stdout.splitlines(), report(proc)


@needs_mpirun
@pytest.mark.parametrize("n", [2, 3])
def test_data_parallel_sgd_matches_one_process(n):
    proc, _ = launch(n, "data_parallel_sgd.py")
    assert proc.returncode == 0, report(proc)
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert [(r["model"], r["bn_training"]) for r in results] == \
        [("mlp", False), ("conv", False), ("conv", True)], report(proc)
    for r in results:
        assert r["world"] == n and r["buckets"] >= 2, r
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
@pytest.mark.parametrize("n, mode, message", [
    (2, "raise", "rank 1: FileNotFoundError: data folder /no/such/imagenet/train does not exist"),
    (3, "raise", "rank 1: FileNotFoundError: data folder /no/such/imagenet/train does not exist"),
    (3, "exit", "rank 1: error: /no/such/imagenet/train has no class folders"),
    (3, "fatal", "rank 1: error: checkpoint /no/such.ckpt is unreadable"),
    (2, "thread", "rank 1: FileNotFoundError: data folder /no/such/imagenet/val does not exist"),
])
def test_failing_rank_ends_the_job(n, mode, message):
    proc, seconds = launch(n, "failing_rank.py", mode)
    assert proc.returncode != 0, report(proc)
    assert message in proc.stderr, report(proc)
    assert "passed the allreduce" not in proc.stdout, report(proc)
    assert seconds < 30, f"the job took {seconds:.1f} s to end\n{report(proc)}"


# --------------------------------------------------------------------------
# One rank (no mpirun): everything is a no-op, buckets are still laid out
# --------------------------------------------------------------------------
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


def test_buckets_follow_backward_order_and_size_cap():
    ctx = distributed.Context()
    shapes = [(10,), (30,), (5,), (40,), (3,)]  # float64: 80, 240, 40, 320, 24 bytes
    params = [Parameter(numpy.zeros(s)) for s in shapes]
    reducer = distributed.GradientAllreducer(params, bucket_mb=300 / 2 ** 20, ctx=ctx)
    # reversed: 3, 40 (344 B >= 300: close), 5, 30 (280 B), 10 (360 B: close)
    assert [[p.shape[0] for p in b.params] for b in reducer.buckets] == [[3, 40], [5, 30, 10]]
    assert reducer.bucket_sizes == [43, 45]
    assert [b.offsets for b in reducer.buckets] == [[0, 3], [0, 5, 35]]


def test_describe_error_names_type_message_and_place():
    try:
        raise FileNotFoundError("data folder /x does not exist")
    except FileNotFoundError as e:
        line = distributed.describe_error(e, e.__traceback__)
    assert line.startswith("FileNotFoundError: data folder /x does not exist (at test_distributed.py:")
    assert line.endswith("in test_describe_error_names_type_message_and_place)")
    assert distributed.describe_error(SystemExit("error: bad flag")) == "error: bad flag"
