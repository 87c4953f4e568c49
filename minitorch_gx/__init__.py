"""minitorch_gx: a small define-by-run deep-learning framework on NumPy and CuPy.

    import minitorch_gx as mt
    x = mt.Tensor(array, requires_grad=True)
    loss = mt.functional.cross_entropy(model(x), labels)
    loss.backward()

Read in this order: ``autograd`` (Tensor, Function, backward), ``backend``
(NumPy or CuPy, and ``choose``: reference, fast path or kernel), ``ops/`` (the
ops, one family per file), ``cuda/`` (the kernels' launchers, the device and
its CPU emulator), ``nn`` (layers), ``optim``, ``distributed/``.
"""
from . import backend, functional, nn, optim
from .autograd import Function, Tensor, is_grad_enabled, no_grad
from .gradcheck import gradcheck

__version__ = "0.1.0"
__all__ = ["Tensor", "Function", "no_grad", "is_grad_enabled", "functional", "nn", "optim",
           "backend", "gradcheck"]
