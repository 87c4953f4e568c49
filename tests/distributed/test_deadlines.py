"""minitorch_gx/distributed/deadlines.py: a rank that stops answering ends the
job within the deadline, with one line naming the collective and that rank.

``mpirun -n 2`` / ``-n 3`` on mpi_scripts/late_rank.py (skipped without mpi4py
or mpirun), a 3 s deadline; and what the aborted jobs leave in /dev/shm.
"""
import os
import pathlib
import re
import signal
import time

import pytest

from minitorch_gx import distributed
from minitorch_gx.distributed import deadlines
from tests.distributed import shm
from tests.distributed.launch import launch, needs_mpirun, report

TIMEOUT_S = 3


def kill_if_alive(pidfile, script="late_rank.py"):
    """SIGKILL the rank that froze itself, should the job's end have missed it."""
    try:
        pid = int(pathlib.Path(pidfile).read_text())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if script.encode() not in f.read():
                return  # the pid was reused by another process
        os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass


def run_late_rank(tmp_path, n, mode, late, collective):
    pidfile = tmp_path / "late.pid"
    try:
        proc, _ = launch(n, "late_rank.py", mode, str(late), collective, str(TIMEOUT_S),
                         str(pidfile), timeout=60)
        ended = time.time()
    finally:
        kill_if_alive(pidfile)
    return proc, ended


@needs_mpirun
@pytest.mark.parametrize("n, mode, late, collective, what", [
    # frozen by SIGSTOP: its peers wait inside the gradient allreduce
    (3, "stop", 1, "bucket", "allreduce of gradient bucket 0 of 3 (step 3)"),
    # alive but elsewhere (sleeping): each collective of the package
    (2, "sleep", 0, "barrier", "barrier"),
    (2, "sleep", 1, "allreduce_sum", "allreduce_sum"),
    (2, "sleep", 0, "broadcast_object", "broadcast of an object from rank 0"),
    (3, "sleep", 0, "broadcast_parameters", "broadcast of the parameters from rank 0"),
], ids=["stopped-bucket", "asleep-barrier", "asleep-allreduce_sum", "asleep-broadcast_object",
        "asleep-broadcast_parameters"])
def test_a_late_rank_ends_the_job_with_one_line_naming_it(tmp_path, n, mode, late, collective,
                                                          what):
    proc, ended = run_late_rank(tmp_path, n, mode, late, collective)
    assert proc.returncode != 0, report(proc)
    lines = [line for line in proc.stderr.splitlines() if "timed out" in line]
    assert len(lines) == 1, report(proc)
    reporter = min(r for r in range(n) if r != late)  # the lowest rank that is not late
    # two steps of 3 buckets and a barrier before: collective 8, the late rank entered 7
    assert lines[0] == (f"rank {reporter}: {what} timed out after {TIMEOUT_S} s (collective 8 of "
                        f"this job): rank {late} did not answer: it has entered only 7 "
                        "collectives"), report(proc)
    assert "should not happen" not in proc.stdout, report(proc)
    entered = [float(t) for t in re.findall(r"entering at (\d+\.\d+)", proc.stdout)]
    assert len(entered) == n - 1, report(proc)
    waited = ended - min(entered)
    assert TIMEOUT_S <= waited < TIMEOUT_S + 4, f"ended {waited:.1f} s after entering\n" + \
        report(proc)


@needs_mpirun
def test_a_rank_that_never_joins_ends_the_setup_with_one_line(tmp_path):
    """Rank 1 sleeps before it joins the job: rank 0's setup collectives
    (blocking MPI calls) have the same deadline, from a watchdog thread."""
    proc, ended = run_late_rank(tmp_path, 2, "setup", 1, "init")
    assert proc.returncode != 0, report(proc)
    lines = [line for line in proc.stderr.splitlines() if "timed out" in line]
    assert lines == [f"rank 0: joining the MPI job timed out after {TIMEOUT_S} s: a process of "
                     "the job did not start, or stopped answering, before training began"], \
        report(proc)
    assert "should not happen" not in proc.stdout, report(proc)
    entered = [float(t) for t in re.findall(r"entering at (\d+\.\d+)", proc.stdout)]
    assert len(entered) == 1 and TIMEOUT_S <= ended - entered[0] < TIMEOUT_S + 4, report(proc)


@needs_mpirun
def test_a_rank_frozen_inside_a_collective_is_named(tmp_path):
    """Rank 1 enters a large allreduce and is stopped there (SIGSTOP from a
    timer); rank 0 enters a second later. Both have entered collective 8:
    the count cannot tell, the stale poll stamp does."""
    proc, ended = run_late_rank(tmp_path, 2, "stop-inside", 1, "allreduce_sum")
    assert proc.returncode != 0, report(proc)
    lines = [line for line in proc.stderr.splitlines() if "timed out" in line]
    assert len(lines) == 1, report(proc)
    assert re.fullmatch(r"rank 0: allreduce_sum timed out after 3 s \(collective 8 of this "
                        r"job\): rank 1 stopped answering inside it \(no sign of life for "
                        r"\d+\.\d s\)", lines[0]), report(proc)


@needs_mpirun
@pytest.mark.parametrize("job", ["frozen rank", "failing rank"])
def test_an_aborted_job_leaves_nothing_in_dev_shm(tmp_path, job):
    """A job ended by a deadline or by a failing rank (test_failures.py), then
    the cleanup that conftest.py runs after every test: nothing it left
    remains (a running job's segments, in use, are never taken)."""
    before = shm.mpi_files()
    if job == "frozen rank":
        proc, _ = run_late_rank(tmp_path, 2, "stop", 1, "barrier")
    else:
        proc, _ = launch(3, "failing_rank.py", "raise")
    assert proc.returncode != 0, report(proc)
    removed = shm.remove_leftovers(before)
    assert not any((shm.SHM / name).exists() for name in removed)
    assert shm.leftovers(before) == set()


def test_the_deadline_is_checked_and_settable():
    ctx = distributed.Context(timeout=5)
    assert ctx.timeout == 5.0
    ctx.timeout = None  # no deadline
    assert ctx.timeout is None
    ctx.timeout = 0.25
    assert ctx.timeout == 0.25
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="timeout must be > 0 seconds"):
            ctx.timeout = bad
    assert distributed.Context().timeout == 600.0


def test_the_line_names_the_late_ranks_or_says_it_does_not_know():
    assert deadlines.describe_late([2], [9, 9, 7]) == \
        "rank 2 did not answer: it has entered only 7 collectives"
    assert deadlines.describe_late([1, 3], [9, 8, 9, 6]) == \
        "ranks 1 and 3 did not answer: they have entered only 8 and 6 collectives"
    assert deadlines.describe_late([], [9, None, 9]).startswith(
        "a rank did not answer (every rank that could be read has entered this collective; "
        "unreadable: rank 1)")
    assert deadlines.describe_late([], [9, 9]).startswith(
        "a rank did not answer (every rank has entered this collective")
    assert deadlines.describe_late([], [9, 9, 9], {2: 3.14}) == \
        "rank 2 stopped answering inside it (no sign of life for 3.1 s)"
    assert deadlines.describe_late([1], [9, 8, 9], {2: 2.0}) == (
        "rank 1 did not answer: it has entered only 8 collectives; "
        "rank 2 stopped answering inside it (no sign of life for 2.0 s)")
