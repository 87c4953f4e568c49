"""Starting ``mpirun`` for the multi-rank tests of this folder: the scripts in
mpi_scripts/ (and train.py / eval.py) run as separate jobs whose output and
exit status the tests check. Everything skips when mpi4py or mpirun is missing."""
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
TIMEOUT_S = 120


def find_mpirun():
    """The mpirun of the MPI mpi4py was installed with: the PyPI mpich wheel
    puts it next to the interpreter (in a virtual environment, its bin/)."""
    beside = Path(sys.executable).parent / "mpirun"
    if beside.exists():
        return str(beside)
    return shutil.which("mpirun") or shutil.which("mpiexec")


MPIRUN = find_mpirun() if importlib.util.find_spec("mpi4py") else None
needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="needs mpi4py and mpirun "
                                  "(pip install mpi4py mpich)")


def mpirun_command(n, script, *args):
    """The command line ``mpirun -n n python mpi_scripts/script args``."""
    extra = os.environ.get("MINITORCH_GX_MPIRUN_ARGS", "").split()
    version = subprocess.run([MPIRUN, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        extra.append("--oversubscribe")  # 3 ranks on a 2-core machine
    return [MPIRUN, *extra, "-n", str(n), sys.executable, str(SCRIPTS / script), *args]


def job_env():
    # One BLAS thread per rank: the ranks already share the cores.
    return dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def launch(n, script, *args, timeout=TIMEOUT_S):
    """Run ``mpirun -n n python mpi_scripts/script args``; returns (CompletedProcess, seconds)."""
    start = time.monotonic()
    proc = subprocess.run(mpirun_command(n, script, *args), capture_output=True, text=True,
                          timeout=timeout, env=job_env(), cwd=REPO)
    return proc, time.monotonic() - start


def report(proc):
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
