"""What an aborted MPI job leaves in /dev/shm, and its removal.

MPICH's ranks of one host share a segment ``/dev/shm/mpich_shm_<hex>_0``
(2 MB for 2 ranks here, 3 MB for 3) that the job removes in MPI_Finalize. A
job that ends by MPI_Abort, as the failing-rank and deadline tests make it,
never gets there and the segment stays until reboot: megabytes per test run,
filling /dev/shm (RAM) over a day of tests.

``leftovers(before)`` are the files that look like MPI's (by name), belong
to this user, were not there ``before`` and that no live process maps or
holds open: a job that is still running (another test session's) keeps its
segment mapped, so it is never taken for a leftover (such a job costs the
cleanup a wait of ``settle_s``).
"""
import os
import time
from pathlib import Path

SHM = Path("/dev/shm")
PREFIXES = ("mpich_shm_", "mpich_shar_", "ucx_shm_", "psm_", "psm3")  # MPICH, UCX, PSM3


def mpi_files():
    """Names in /dev/shm that look like MPI's and belong to this user."""
    try:
        entries = list(os.scandir(SHM))
    except FileNotFoundError:  # no /dev/shm (not Linux): nothing is left there
        return set()
    names = set()
    for e in entries:
        try:
            if e.name.startswith(PREFIXES) and e.is_file(follow_symlinks=False) \
                    and e.stat(follow_symlinks=False).st_uid == os.getuid():
                names.add(e.name)
        except FileNotFoundError:  # removed meanwhile
            pass
    return names


def in_use():
    """Names of /dev/shm files that some live process maps or holds open."""
    busy, prefix = set(), str(SHM) + "/"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    path = line.split(maxsplit=5)[5:]
                    if path and path[0].startswith(prefix):
                        busy.add(path[0][len(prefix):].split()[0])  # drop " (deleted)"
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(prefix):
                    busy.add(target[len(prefix):].split()[0])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # the process ended, or is another user's
    return busy


def leftovers(before, settle_s=0.0):
    """MPI files that appeared since ``before`` (a ``mpi_files()``) and that
    nothing uses any more. mpirun may return while the ranks it killed are
    still exiting: wait up to ``settle_s`` for the new files to be let go."""
    give_up = time.monotonic() + settle_s
    while True:
        new = mpi_files() - before
        unused = new - in_use() if new else set()
        if unused == new or time.monotonic() >= give_up:
            return unused
        time.sleep(0.05)


def remove_leftovers(before, settle_s=3.0):
    """Delete ``leftovers(before, settle_s)``; returns the names removed."""
    removed = set()
    for name in leftovers(before, settle_s):
        try:
            (SHM / name).unlink()
            removed.add(name)
        except FileNotFoundError:
            pass
    return removed
