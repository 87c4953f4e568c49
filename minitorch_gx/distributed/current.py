"""The Context of the latest ``init()``: kept here, apart from
``process_group``, so that the failure hook (which reads it when a rank
fails) and the deadlines (which end the job through that hook) import no
module that imports them. Also what the launcher (mpirun) said about this
process in its environment, which is known before MPI is set up."""
import os

_context = None
_LAUNCHER_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launcher_size():
    """(processes mpirun started, the variable that says so); (1, None) outside mpirun."""
    for v in _LAUNCHER_SIZE_VARS:
        size = int(os.environ.get(v, "1") or 1)
        if size > 1:
            return size, v
    return 1, None


def launcher_rank():
    """This process's rank as mpirun set it, when it started several; else None."""
    if launcher_size()[0] < 2:
        return None
    for v in _LAUNCHER_RANK_VARS:
        if os.environ.get(v, "").isdigit():
            return int(os.environ[v])
    return None


def get():
    """The Context made by the latest ``init()`` (set by process_group)."""
    return _context


def set(ctx):  # noqa: A001 - the module is only ever used as current.set
    global _context
    _context = ctx
