"""What train.py and eval.py share: choosing the device, the run folder and its
log files, the process group, and turning errors into one clear line.
"""
import logging
import os
import sys
import time

from minitorch_gx import backend, distributed

from .checkpoint import CheckpointError
from .convert import ConvertError
from .dataset import DataError

LOG_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 1."""


def choose_device(device_target):
    """"GPU" or "CPU" -> "gpu"/"cpu"; None picks the GPU when one is usable."""
    if device_target is None:
        if backend.gpu_available():
            return "gpu"
        print("notice: no usable CUDA device found, running on the CPU "
              "(pass --device_target=CPU to silence this)", file=sys.stderr)
        return "cpu"
    if device_target == "GPU":
        if not backend.gpu_available():
            reason = "CuPy is not installed" if backend.cupy is None else "no CUDA device is visible"
            raise UserError(f"--device_target=GPU was asked for but {reason}; "
                            "use --device_target=CPU or install the gpu extra")
        return "gpu"
    return "cpu"


def run_folder_name(when=None):
    """The original's run folder name: ``%Y-%m-%d_time_%H_%M_%S``."""
    return time.strftime("%Y-%m-%d_time_%H_%M_%S", time.localtime(when))


def make_run_folder(output_path, when=None):
    """Create ``<output_path>/<run_folder_name()>`` exclusively and return its
    name: two runs started in the same second on one output path get
    ``..._S`` and ``..._S_1``, never one shared folder."""
    try:
        os.makedirs(output_path, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output_path {output_path}: cannot create it: {e.strerror or e}") \
            from None
    base = run_folder_name(when)
    for i in range(1000):
        name = base if i == 0 else f"{base}_{i}"
        try:
            os.mkdir(os.path.join(output_path, name))  # fails if it exists: exclusive
            return name
        except FileExistsError:
            continue
    raise UserError(f"--output_path {output_path}: 1000 run folders named {base}* exist")


def setup_logger(folder, rank, console=True):
    """Log to ``<folder>/<timestamp>_rank_<N>.log`` (and to the console on
    rank 0) with the original's format. A record logged with
    ``extra={"console": False}`` goes to the file only (the step lines, when a
    progress bar shows the same on the terminal)."""
    logger = logging.getLogger(f"resnext.rank{rank}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d_time_%H_%M_%S")
        handler = logging.FileHandler(os.path.join(folder, f"{stamp}_rank_{rank}.log"))
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
    if console and rank == 0:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(lambda record: getattr(record, "console", True))
        logger.addHandler(handler)
    return logger


class SingleProcess:
    """The process group of a run without mpirun: rank 0 of 1."""
    rank, world_size, local_rank = 0, 1, 0

    def allreduce_sum(self, value):
        return value

    def barrier(self):
        pass

    def broadcast_object(self, obj):
        return obj


def process_group(run_distribute, device, timeout=600.0):
    """A SingleProcess, or the MPI group when run under mpirun with
    --run_distribute=1. In a group, an uncaught error on any rank ends the
    whole job (MPI_Abort) instead of leaving the others waiting, and so does a
    collective that takes longer than ``timeout`` seconds (--dist_timeout)."""
    if not run_distribute:
        return SingleProcess()
    ctx = distributed.init(device, timeout=timeout)
    distributed.install_failure_handler(ctx)
    return ctx


def main_guard(fn):
    """Run ``fn()``; a UserError (or a data/checkpoint error, or a weights file
    the converter refuses) becomes one line on stderr and exit status 1 instead
    of a traceback. Under mpirun the line is prefixed with the rank and the
    whole job is ended. Ctrl-C where the trainer does not handle it itself
    (while setting up, in eval.py) is one line and exit status 130."""
    try:
        return fn()
    except KeyboardInterrupt:
        rank = _launcher_rank()
        prefix = "" if rank is None else f"rank {rank}: "
        print(f"{prefix}interrupted (Ctrl-C); the checkpoints already written are intact",
              file=sys.stderr)
        sys.exit(130)
    except (UserError, CheckpointError, ConvertError, DataError) as e:
        if distributed.get_context().world_size > 1:
            distributed.fatal(f"error: {e}")
        rank = _launcher_rank()
        if rank is None:
            print(f"error: {e}", file=sys.stderr)
        elif rank == 0:  # every rank checked its flags alike, before joining the job: say it once
            print(f"rank 0: error: {e}", file=sys.stderr)
        sys.exit(1)


def _launcher_rank():
    """This process's rank as mpirun set it, when it started several; else None."""
    return distributed.current.launcher_rank()
