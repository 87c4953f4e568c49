"""What train.py and eval.py share: choosing the device, the run folder and its
log files, the process group, and turning errors into one clear line.
"""
import logging
import os
import sys
import time

from minitorch_gx import backend, distributed

from .checkpoint import CheckpointError
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


def setup_logger(folder, rank, console=True):
    """Log to ``<folder>/<timestamp>_rank_<N>.log`` (and to the console on
    rank 0) with the original's format."""
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


def process_group(run_distribute, device):
    """A SingleProcess, or the MPI group when run under mpirun with
    --run_distribute=1. In a group, an uncaught error on any rank ends the
    whole job (MPI_Abort) instead of leaving the others waiting."""
    if not run_distribute:
        return SingleProcess()
    ctx = distributed.init(device)
    distributed.install_failure_handler(ctx)
    return ctx


def main_guard(fn):
    """Run ``fn()``; a UserError (or a data/checkpoint error) becomes one line on
    stderr and exit status 1 instead of a traceback. Under mpirun the line is
    prefixed with the rank and the whole job is ended."""
    try:
        return fn()
    except (UserError, CheckpointError, DataError) as e:
        if distributed.get_context().world_size > 1:
            distributed.fatal(f"error: {e}")
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
