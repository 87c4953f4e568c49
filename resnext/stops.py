"""Stopping a run at a clean point: Ctrl-C (SIGINT) and SIGTERM, what cluster
schedulers and ``kill`` send, become a request that the training loop reads
between steps.

A handler that raised inside a step (Python's default for SIGINT) would leave
the step half done: its forward pass run, the schedule advanced, the
optimizer not stepped; the checkpoint written then resumes into a different
run. So the handler only records the signal. The loop finishes the step it is
in (under MPI, every rank stops at the same step: the request travels in the
gradient allreduce), saves, and exits with 128 + the signal number (130 for
SIGINT, 143 for SIGTERM). A second signal while that happens is reported and
otherwise ignored, so it cannot break the save.
"""
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """``with StopSignals() as stops:`` ... ``stops.requested`` is the first
    signal number received (None while none), ``stops.exit_code`` 128 + it."""

    def __init__(self, announce=True):
        self.requested = None
        self.announce = announce
        self._previous = {}

    def __enter__(self):
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = signum
            if self.announce:
                print(f"\n{name}: stopping after the current step (a checkpoint is saved first)",
                      file=sys.stderr, flush=True)
        elif self.announce:
            print(f"{name}: already stopping; the checkpoint is being saved", file=sys.stderr,
                  flush=True)

    @property
    def exit_code(self):
        return 128 + self.requested if self.requested is not None else 0
