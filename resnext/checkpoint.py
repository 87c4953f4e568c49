"""Checkpoints: one ``.npz`` file per save, read without pickle, written atomically.

A checkpoint holds, as arrays: ``model/<state_dict name>`` (weights and BN
statistics), ``optim/momentum/<i>`` (SGD's momentum buffer of parameter i),
and ``meta``: a JSON document (epoch, step, scheduler state, the run's
settings) stored as UTF-8 bytes. Saving writes a temporary file in the same
folder, flushes it to disk, renames it over the final name and flushes the
folder, so a crash or kill never leaves a partial file under a ``.ckpt`` name
and a finished save survives a power cut. A kill during a save can leave the
temporary ``.tmp-<pid>-*.ckpt.part``; ``remove_stale_parts`` deletes those of
processes that are gone. A checkpoint is written with the permissions any
new file of the process gets (its umask), and never with a non-finite array:
``save_checkpoint`` refuses, so every checkpoint on disk can be resumed.

Names follow the original: ``{rank}-{epoch}_{step}.ckpt`` in ``<run>/ckpt_0/``.
"""
import json
import os
import re
import tempfile
import zipfile

import numpy

from minitorch_gx import backend

from .convert import load_weights

CKPT_NAME = re.compile(r"^(\d+)-(\d+)_(\d+)\.ckpt$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


def checkpoint_name(rank, epoch, step):
    return f"{rank}-{epoch}_{step}.ckpt"


class NonFiniteError(CheckpointError):
    """The arrays to be saved (or loaded) hold NaN or infinity."""


def nonfinite_arrays(arrays):
    """Names of the floating-point arrays in ``arrays`` (name -> array) that
    hold a NaN or an infinity."""
    return [k for k, a in arrays.items()
            if numpy.asarray(a).dtype.kind in "fc" and not numpy.isfinite(a).all()]


def save_checkpoint(path, model, optimizer=None, meta=None):
    """Write ``model`` (and optimizer state, ``meta``) to ``path`` atomically.
    Raises NonFiniteError, writing nothing, if any array is not finite."""
    arrays = {f"model/{k}": backend.to_numpy(v) for k, v in model.state_dict().items()}
    if optimizer is not None:
        state = optimizer.state_dict()
        for i, s in state["state"].items():
            arrays[f"optim/momentum/{i}"] = backend.to_numpy(s["momentum_buffer"])
        meta = dict(meta or {}, optimizer_param_groups=state["param_groups"])
    bad = nonfinite_arrays(arrays)
    if bad:
        raise NonFiniteError(f"not writing {path}: {len(bad)} of {len(arrays)} arrays hold NaN "
                             f"or infinity (first: {bad[0]})")
    arrays["meta"] = numpy.frombuffer(json.dumps(meta or {}).encode("utf-8"), dtype=numpy.uint8)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=".ckpt.part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; use the umask
            numpy.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)  # the rename itself reaches the disk
    return path


def _umask():
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_PART = re.compile(r"^\.tmp-(?:(\d+)-)?.*\.ckpt\.part$")


def remove_stale_parts(folder):
    """Delete the temporary files of saves that were killed midway: those of
    processes no longer alive (and the older unnumbered kind). Returns them."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        m = _PART.match(name)
        if not m or (m.group(1) and _alive(int(m.group(1)))):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
        except FileNotFoundError:
            pass
    return removed


def _alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def load_checkpoint(path):
    """Return ``(model_state, optimizer_state_or_None, meta)`` from a checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with numpy.load(path, allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {_why(e)}") from None
    if "meta" not in files:
        raise CheckpointError(f"{path} is not a minitorch_gx checkpoint (no 'meta' entry)")
    meta = json.loads(bytes(files.pop("meta")).decode("utf-8"))
    model_state = {k[len("model/"):]: v for k, v in files.items() if k.startswith("model/")}
    momentum = {int(k.rsplit("/", 1)[1]): v for k, v in files.items()
                if k.startswith("optim/momentum/")}
    optim_state = None
    if "optimizer_param_groups" in meta:
        optim_state = {"state": {i: {"momentum_buffer": m} for i, m in momentum.items()},
                       "param_groups": meta["optimizer_param_groups"]}
    return model_state, optim_state, meta


def resolve_resume_path(path):
    """--resume accepts a checkpoint, a run's ``ckpt_0/`` folder or the run
    folder itself; a folder means its newest checkpoint."""
    if os.path.isdir(path):
        folder = os.path.join(path, "ckpt_0") if os.path.isdir(os.path.join(path, "ckpt_0")) \
            else path
        found = list_checkpoints(folder)
        if not found:
            raise CheckpointError(f"--resume {path}: no checkpoint ({{rank}}-{{epoch}}_{{step}}"
                                  f".ckpt) in {folder}")
        return found[0][2]
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume {path}: no such checkpoint, run folder or ckpt_0 folder")
    return path


def list_checkpoints(folder):
    """Checkpoints in ``folder`` as (epoch, step, path), newest epoch first."""
    found = []
    for name in os.listdir(folder):
        m = CKPT_NAME.match(name)
        if m:
            found.append((int(m.group(2)), int(m.group(3)), os.path.join(folder, name)))
    return sorted(found, reverse=True)


def prune_checkpoints(folder, keep):
    """Delete all but the ``keep`` newest checkpoints of ``folder``."""
    for _, _, path in list_checkpoints(folder)[keep:]:
        os.unlink(path)


def load_model_weights(path):
    """A name -> array dict from a checkpoint (.ckpt), an .npz state_dict (as
    written by ``python -m resnext.convert``) or a PyTorch .pth file."""
    if path.endswith(".pth") or path.endswith(".pt"):
        return load_weights(path)
    try:
        with numpy.load(path, allow_pickle=False) as z:
            names = z.files
            if "meta" in names:
                return load_checkpoint(path)[0]
            return {k: z[k] for k in names}
    except FileNotFoundError:
        raise CheckpointError(f"weights file not found: {path}") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"cannot read weights file {path}: {_why(e)}") from None


def _why(e):
    """What a reader of a weights file needs to hear, instead of NumPy's advice
    to unpickle (which this project never does)."""
    if "allow_pickle" in str(e) or isinstance(e, (zipfile.BadZipFile, EOFError)):
        return ("not a checkpoint: expected a .ckpt or .npz written by train.py or "
                "python -m resnext.convert, or a PyTorch .pth")
    return str(e)
