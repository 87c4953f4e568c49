"""Every collective has a deadline: a rank that stops answering ends the job
with one line that names it, instead of leaving the others waiting forever.

Why: an MPI collective waits for every rank. A rank that froze (stopped,
swapping, stuck in a data worker or a driver) makes all the others wait in
their next collective, silently, until someone kills the job by hand. So every
collective this package issues is non-blocking (``Iallreduce``, ``Ibcast``,
``Ibarrier``) and is polled (``Test``, then short sleeps) until it completes
or ``ctx.timeout`` seconds have passed since it started. Past that, the rank
prints one line and aborts the job (``MPI_Abort``: mpirun ends every rank,
exit status 124):

    rank 0: allreduce of gradient bucket 3 of 5 (step 1234) timed out after 600 s
    (collective 6171 of this job): rank 2 did not answer: it has entered only 6169 collectives

(one line in reality). Who is late: every rank counts the collectives it
has entered. MPI makes every rank issue its collectives in the same order, so
collective number n is the same operation on every rank, and a rank whose
count is below n has not reached it. A rank can also freeze *inside* the
collective (stopped, swapped out, stuck in the driver): then its count is
right, but it stops polling. So each waiting rank also stamps the time at
every poll, and a rank inside the collective whose stamp is older than
``STALE_S`` is named as having stopped answering inside it. Each rank keeps
its count and its stamp in an MPI window (two int64 per rank, allocated by
``init``; updating them is a store to memory).
When a deadline passes the rank reads every count with one-sided ``Rget``s;
between ranks of one host that is a read of shared memory, which works even
when the other rank is stopped. A count that cannot be read within a second
(a stopped rank on another host whose network needs its help for one-sided
reads) is left unknown, and when no rank is found behind, the line says "a
rank did not answer" rather than guess.

One line: all waiting ranks time out at about the same moment. The lowest
rank that is not behind reports at once; each other one waits 2 s more per
place behind it, for that abort to end it first, and then reports itself (in
case the first one is stuck elsewhere).

``timeout=None`` means no deadline: plain MPI waits. The collectives ``init``
itself needs (joining the job, splitting the communicator, the window, the
NCCL id) are blocking MPI calls that cannot be polled; ``setup_deadline``
gives them one all the same, from a watchdog process that ends this one
with one line if setup has not finished in time (mpirun then ends the others):

    rank 0: joining the MPI job timed out after 600 s: a process of the job did not
    start, or stopped answering, before training began

NCCL buckets are never waited for by the host, so they have no deadline
here (a hung NCCL shows at the next synchronisation, which waits forever).
"""
import atexit
import contextlib
import os
import subprocess
import sys
import time

import numpy

from . import current
from .failures import fatal

GRACE_S = 2.0          # extra wait per place after the first reporter
READ_TIMEOUT_S = 1.0   # how long the one-sided reads of the counts may take
STALE_S = 1.0          # a rank polling a collective stamps the time more often than this
TIMEOUT_EXIT_CODE = 124  # the job's exit status, as for GNU timeout
_SPIN_S = 0.05         # Test without sleeping for this long first, as MPI's Wait would
_MAX_PAUSE_S = 1e-3    # then sleep between Tests, up to this long


@contextlib.contextmanager
def setup_deadline(timeout, what="joining the MPI job"):
    """Blocking setup collectives with a deadline: if the block has not ended
    ``timeout`` seconds after it began, one line is printed and this process
    is ended (SIGTERM, then SIGKILL; mpirun then ends the others). No thread
    of this process can do that: MPI_Init, run by the import of mpi4py, blocks
    holding the GIL. So a small watchdog process does it, waiting on a pipe
    that this block closes when it ends (and the kernel closes should this
    process die). The rank comes from mpirun's environment, as MPI is not set
    up yet. Only under a launcher with several processes; ``timeout=None``:
    no deadline."""
    if timeout is None or current.launcher_size()[0] < 2:
        yield
        return
    rank = current.launcher_rank()
    rank = "?" if rank is None else rank
    line = (f"rank {rank}: {what} timed out after {timeout:g} s: a process of the job did not "
            f"start, or stopped answering, before training began")
    read_end, write_end = os.pipe()
    try:
        # its own session, so that a Ctrl-C to the job never reaches it
        subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHDOG, str(read_end),
                          str(os.getpid()), str(timeout), line], pass_fds=(read_end,),
                         stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        os.close(read_end)
    try:
        yield
    finally:
        os.close(write_end)


# The watchdog: wait until the pipe closes (setup done, or the process gone),
# or the deadline passes.
_WATCHDOG = """
import os, select, signal, sys, time
fd, pid, timeout, line = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
if not select.select([fd], [], [], timeout)[0]:
    sys.stderr.write(line + "\\n")
    sys.stderr.flush()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        time.sleep(2)
"""


def check_timeout(timeout):
    """``timeout`` as a float of seconds > 0, or None for no deadline."""
    if timeout is None:
        return None
    timeout = float(timeout)
    if not timeout > 0:  # also refuses NaN
        raise ValueError(f"the collectives' timeout must be > 0 seconds (or None), not {timeout}")
    return timeout


class Watch:
    """This rank's side of the deadlines: the timeout, the count of
    collectives entered (published in an MPI window for the others to read),
    and the wait loop. One per Context."""

    def __init__(self, timeout=600.0, comm=None, rank=0, world_size=1):
        self.timeout = check_timeout(timeout)
        self.comm, self.rank, self.world_size = comm, rank, world_size
        self.entered = 0   # collectives this rank has entered
        self.ctx = None    # the Context to report with (set by the Context)
        self._win = self._record = None
        if comm is not None and world_size > 1:
            self._open_window()

    def _open_window(self):
        from mpi4py import MPI
        self.MPI = MPI
        try:
            win = MPI.Win.Allocate(16, 8, comm=self.comm)  # collective: every rank, in init
            win.Lock_all(MPI.MODE_NOCHECK)  # one passive epoch, for reads at any time
        except MPI.Exception:  # an MPI without one-sided support: counts stay unknown
            return
        self._win = win
        # (2,): collectives entered, and the time of the last poll (ms since the epoch)
        self._record = numpy.frombuffer(win.tomemory(), dtype=numpy.int64)
        self._record[:] = 0
        atexit.register(self.close)

    def close(self):
        """Free the window (collective; at exit, before MPI_Finalize)."""
        win, self._win, self._record = self._win, None, None
        if win is not None and not self.MPI.Is_finalized():
            win.Unlock_all()
            win.Free()

    # -- issuing and waiting -----------------------------------------------------
    def enter(self):
        """Count one more collective entered; returns its number (from 1)."""
        self.entered += 1
        if self._record is not None:
            self._record[0] = self.entered
            self._stamp()
        return self.entered

    def _stamp(self):
        if self._record is not None:
            self._record[1] = int(time.time() * 1000)  # wall clock: comparable across hosts

    def collective(self, what, issue):
        """Enter a collective: ``issue()`` starts it and returns its request;
        wait for it with the deadline. ``what`` names it in the error line."""
        number, started = self.enter(), time.monotonic()
        self.wait(issue(), what, number, started)

    def wait(self, request, what, number, started):
        """Until ``request`` (an MPI request) completes, or end the job once
        ``timeout`` seconds have passed since ``started`` (time.monotonic()).
        ``what``: a string, or a function making it (called only on expiry)."""
        if self.timeout is None:
            request.Wait()
            return
        spin_until, pause = time.monotonic() + _SPIN_S, 0.0
        while not request.Test():  # each Test also moves MPICH's progress engine
            self._stamp()  # alive and polling
            now = time.monotonic()
            if now - started >= self.timeout:
                self.expire(what, number)
            if now >= spin_until:
                # A long wait: a peer is late. Sleep between Tests, to leave the
                # cores to the ranks that are still computing.
                time.sleep(pause)
                pause = min(max(2 * pause, 2e-5), _MAX_PAUSE_S)

    # -- past the deadline -------------------------------------------------------
    def expire(self, what, number):
        """Report collective ``number`` as timed out and end the job."""
        counts, stamps = self.read_counts()
        late = [r for r, c in enumerate(counts) if c is not None and c < number]
        now_ms = time.time() * 1000
        # inside this very collective (a rank past it may be computing), not polling
        frozen = {r: (now_ms - stamps[r]) / 1000 for r, c in enumerate(counts)
                  if r != self.rank and c == number and stamps[r] is not None
                  and now_ms - stamps[r] > STALE_S * 1000}
        line = (f"{what() if callable(what) else what} timed out after {self.timeout:g} s "
                f"(collective {number} of this job): {describe_late(late, counts, frozen)}")
        reporters = [r for r in range(self.world_size) if r not in late and r not in frozen]
        place = reporters.index(self.rank) if self.rank in reporters else 0
        if place:
            time.sleep(GRACE_S * place)  # the first reporter's abort normally ends us here
        fatal(line, self.ctx, exit_code=TIMEOUT_EXIT_CODE)

    def read_counts(self):
        """Every rank's count of collectives entered and the time of its last
        poll in ms (None where unreadable), as two lists."""
        counts, stamps = [None] * self.world_size, [None] * self.world_size
        counts[self.rank] = self.entered
        if self._win is None:
            return counts, stamps
        others = [r for r in range(self.world_size) if r != self.rank]
        values = numpy.full((self.world_size, 2), -1, numpy.int64)
        requests = {r: self._win.Rget(values[r], r) for r in others}
        give_up = time.monotonic() + READ_TIMEOUT_S
        while requests and time.monotonic() < give_up:
            for r in [r for r, req in requests.items() if req.Test()]:
                counts[r], stamps[r] = int(values[r, 0]), int(values[r, 1])
                del requests[r]
            time.sleep(1e-3)
        return counts, stamps  # the reads still pending are abandoned: the job ends now


def describe_late(late, counts, frozen=None):
    """The end of the error line: who did not answer, as far as is known.
    ``late``: ranks that have not entered the collective; ``frozen``: rank ->
    seconds since it last polled, for ranks inside it that stopped answering."""
    parts = []
    if late:
        names = " and ".join(f"{r}" for r in late)
        entered = " and ".join(f"{counts[r]}" for r in late)
        if len(late) == 1:
            parts.append(f"rank {names} did not answer: it has entered only {entered} collectives")
        else:
            parts.append(f"ranks {names} did not answer: they have entered only {entered} "
                         "collectives")
    if frozen:
        names = " and ".join(f"{r}" for r in sorted(frozen))
        ages = " and ".join(f"{frozen[r]:.1f}" for r in sorted(frozen))
        parts.append(f"rank{'s' if len(frozen) > 1 else ''} {names} stopped answering inside "
                     f"it (no sign of life for {ages} s)")
    if parts:
        return "; ".join(parts)
    unread = [r for r, c in enumerate(counts) if c is None]
    if unread:
        return ("a rank did not answer (every rank that could be read has entered this "
                f"collective; unreadable: rank{'s' if len(unread) > 1 else ''} "
                f"{', '.join(map(str, unread))})")
    return ("a rank did not answer (every rank has entered this collective and is still "
            "polling it: one may be stuck inside it, or the ranks issued different collectives)")
