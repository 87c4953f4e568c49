"""Every test of this folder removes what the MPI jobs it aborted left in
/dev/shm (see shm.py): MPICH's shared-memory segments, never the segments of
a job that is still running."""
import pytest

from tests.distributed import shm


@pytest.fixture(autouse=True)
def clean_dev_shm():
    before = shm.mpi_files()
    yield
    shm.remove_leftovers(before)
