"""A failing rank ends the whole MPI job, with one clear line and a non-zero exit.

A rank that dies alone leaves the others waiting forever in their next
collective (and a plain ``sys.exit`` makes MPI's finalize wait too). So a
failing rank prints ``rank R: <error> (at file:line)`` to stderr and calls
``MPI_Abort``, which makes mpirun end every rank with a non-zero status.
``minitorch_gx.distributed`` re-exports these functions.
"""
import logging
import os
import sys
import threading
import time
import traceback

from . import current


def _default_context():
    return current.get()  # the Context of the latest init(), looked up at failure time


def install_failure_handler(ctx=None):
    """Make uncaught exceptions (main thread and other threads) end the job.

    Prints ``rank R: <error> (at file:line)`` to stderr, then aborts all ranks.
    Set MINITORCH_GX_TRACEBACK=1 to print the full traceback too. Also wrap
    ``main`` in ``abort_on_failure`` so that a ``sys.exit(message)`` on one rank
    ends the job as well. Without ``ctx``, the Context of the latest
    ``init()`` at the time of the failure is used.
    """
    def excepthook(exc_type, exc, tb):
        _report_and_abort(exc, tb, ctx or _default_context())

    def thread_excepthook(args):
        if args.exc_type is SystemExit:
            return
        _report_and_abort(args.exc_value, args.exc_traceback, ctx or _default_context())

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


def abort_on_failure(main):
    """Decorator for a script's ``main``: an exception, or ``sys.exit`` with a
    message or a non-zero code, on any rank ends every rank."""
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except SystemExit as e:
            if e.code in (None, 0) or isinstance(e, _Reported):
                raise
            _report_and_abort(e, e.__traceback__, _default_context())
            # the message is printed: exit with a status only
            raise SystemExit(e.code if isinstance(e.code, int) else 1) from None
        except BaseException as e:  # noqa: B902 - KeyboardInterrupt must end every rank too
            _report_and_abort(e, e.__traceback__, _default_context())
            raise SystemExit(1) from None
    guarded.__name__, guarded.__doc__ = main.__name__, main.__doc__
    return guarded


def fatal(message, ctx=None, exit_code=1):
    """End the whole job now: print ``rank R: message``, abort every rank."""
    ctx = ctx or _default_context()
    _print_and_abort(str(message), ctx, exit_code)
    raise _Reported(exit_code)  # one process: nothing to abort, just exit


class _Reported(SystemExit):
    """An exit whose message is already printed."""


def describe_error(exc, tb=None):
    """One line for an exception: ``Type: message (at file.py:123 in func)``."""
    if isinstance(exc, SystemExit):
        return str(exc.code) if not isinstance(exc.code, int) else f"exited with status {exc.code}"
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    frames = traceback.extract_tb(tb) if tb is not None else []
    if frames:
        last = frames[-1]
        text += f" (at {os.path.basename(last.filename)}:{last.lineno} in {last.name})"
    return text


def _report_and_abort(exc, tb, ctx):
    if os.environ.get("MINITORCH_GX_TRACEBACK") == "1":
        traceback.print_exception(type(exc), exc, tb)
    code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1
    _print_and_abort(describe_error(exc, tb), ctx, code or 1)


def _print_and_abort(line, ctx, exit_code):
    logging.shutdown()  # flush the log files: an abort skips Python's own exit
    sys.stdout.flush()
    prefix = f"rank {ctx.rank}: " if ctx.comm is not None else ""
    sys.stderr.write(f"{prefix}{line}\n")
    sys.stderr.flush()
    if ctx.world_size > 1:
        # mpirun forwards our stderr through a pipe; the abort tears the job
        # down at once, so give it a moment to carry the line out first.
        time.sleep(0.5)
        ctx.comm.Abort(exit_code)  # mpirun ends every rank with a non-zero status
        os._exit(exit_code)        # should Abort ever return, do not go back to a collective
