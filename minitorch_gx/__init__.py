"""minitorch_gx: a small define-by-run deep-learning framework on NumPy and CuPy.

    import minitorch_gx as mt
    x = mt.Tensor(array, requires_grad=True)
    loss = mt.functional.cross_entropy(model(x), labels)
    loss.backward()

Read in this order: ``autograd`` (Tensor, Function, backward), ``backend``
(NumPy or CuPy, and ``choose``: reference, fast path or kernel), ``ops/`` (the
ops, one family per file), ``cuda/`` (the kernels' launchers, the device and
its CPU emulator), ``nn`` (layers), ``optim``, ``distributed/``; ``cpu`` (how
the NumPy path keeps its memory and splits work over the cores).
"""
import os as _os
import sys as _sys

if "numpy" not in _sys.modules:  # (read when NumPy loads OpenBLAS: see minitorch_gx/cpu.py)
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from . import cpu  # noqa: E402

if _os.environ.get("MINITORCH_GX_RETAIN_MEMORY", "1") != "0":
    cpu.retain_freed_memory()  # see minitorch_gx/cpu.py: no page faults after the first step

from . import backend, functional, nn, optim  # noqa: E402
from .autograd import Function, Tensor, is_grad_enabled, no_grad
from .gradcheck import gradcheck

__version__ = "0.1.0"
__all__ = ["Tensor", "Function", "no_grad", "is_grad_enabled", "functional", "nn", "optim",
           "backend", "gradcheck"]
