"""Checkpoints: one ``.npz`` file per save, read without pickle, written atomically.

A checkpoint holds, as arrays: ``model/<state_dict name>`` (weights and BN
statistics), ``optim/momentum/<i>`` (SGD's momentum buffer of parameter i),
and ``meta``: a JSON document (epoch, step, scheduler state, the run's
settings) stored as UTF-8 bytes. Saving writes a temporary file in the same
folder, flushes it to disk and renames it over the final name, so a crash or
kill never leaves a partial file under a ``.ckpt`` name.

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


def save_checkpoint(path, model, optimizer=None, meta=None):
    """Write ``model`` (and optimizer state, ``meta``) to ``path`` atomically."""
    arrays = {f"model/{k}": backend.to_numpy(v) for k, v in model.state_dict().items()}
    if optimizer is not None:
        state = optimizer.state_dict()
        for i, s in state["state"].items():
            arrays[f"optim/momentum/{i}"] = backend.to_numpy(s["momentum_buffer"])
        meta = dict(meta or {}, optimizer_param_groups=state["param_groups"])
    arrays["meta"] = numpy.frombuffer(json.dumps(meta or {}).encode("utf-8"), dtype=numpy.uint8)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt.part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            numpy.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path):
    """Return ``(model_state, optimizer_state_or_None, meta)`` from a checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with numpy.load(path, allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
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
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"cannot read weights file {path}: {e}") from None


