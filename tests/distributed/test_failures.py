"""minitorch_gx/distributed/failures.py: a failing rank ends the whole job.

``mpirun -n 2`` / ``-n 3`` on mpi_scripts/failing_rank.py (skipped when mpi4py
or mpirun is missing): rank 1 fails while the others wait in a collective.
"""
import pytest

from minitorch_gx import distributed
from tests.distributed.launch import launch, needs_mpirun, report


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


def test_describe_error_names_type_message_and_place():
    try:
        raise FileNotFoundError("data folder /x does not exist")
    except FileNotFoundError as e:
        line = distributed.describe_error(e, e.__traceback__)
    assert line.startswith("FileNotFoundError: data folder /x does not exist (at test_failures.py:")
    assert line.endswith("in test_describe_error_names_type_message_and_place)")
    assert distributed.describe_error(SystemExit("error: bad flag")) == "error: bad flag"
