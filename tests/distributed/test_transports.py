"""minitorch_gx/distributed/transports.py: how a bucket is summed over the ranks.

On the CPU the host transport (MPI_Iallreduce) is what test_reducer.py runs;
here the GPU transports under ``mpirun -n 2`` (skipped without a GPU), and
the choice of transport, which needs neither.
"""
import pytest

from minitorch_gx import backend
from minitorch_gx.distributed import transports
from tests.distributed.launch import launch, needs_mpirun, report


@needs_mpirun
@pytest.mark.skipif(not backend.gpu_available(), reason="needs a CUDA GPU and CuPy")
@pytest.mark.parametrize("transport", ["auto", "mpi-host-staged", "nccl"])
def test_bucketed_allreduce_on_gpu(transport):
    """Two ranks on the GPU(s): sharing one GPU, "auto" picks MPI through pinned
    host memory; with two GPUs and NCCL it picks NCCL."""
    if transport == "nccl":
        if transports.nccl_module() is None or backend.cupy.cuda.runtime.getDeviceCount() < 2:
            pytest.skip("NCCL needs CuPy with NCCL and two GPUs")
    proc, _ = launch(2, "bucketed_allreduce.py", "gpu", *([] if transport == "auto" else [transport]))
    assert proc.returncode == 0, report(proc)
    assert "ALL OK" in proc.stdout.splitlines(), report(proc)


def test_an_unknown_transport_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown GPU transport 'infiniband'"):
        transports.make_transport(None, 0, 2, gpus_shared=False, choice="infiniband")


def test_nccl_asked_for_without_nccl_or_with_shared_gpus_is_refused():
    if transports.nccl_module() is None:
        with pytest.raises(RuntimeError, match="no NCCL"):
            transports.make_transport(None, 0, 2, gpus_shared=False, choice="nccl")
    else:
        with pytest.raises(RuntimeError, match="one GPU per rank"):
            transports.make_transport(None, 0, 2, gpus_shared=True, choice="nccl")


@pytest.mark.parametrize("forced", ["0", "1"])
def test_cuda_aware_mpi_can_be_forced(forced, monkeypatch):
    monkeypatch.setenv("MINITORCH_GX_CUDA_AWARE_MPI", forced)
    assert transports.mpi_is_cuda_aware() is (forced == "1")
