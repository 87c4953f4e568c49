"""minitorch_gx: a small define-by-run deep-learning framework on NumPy and CuPy.

    import minitorch_gx as mt
    x = mt.Tensor(array, requires_grad=True)
    loss = mt.functional.cross_entropy(model(x), labels)
    loss.backward()

Read in this order: ``autograd`` (Tensor, Function, backward), ``backend``
(NumPy or CuPy), ``functions_*`` (the ops), ``nn`` (layers), ``optim``.
"""
from . import backend, functional, nn, optim
from .autograd import Function, Tensor, is_grad_enabled, no_grad
from .gradcheck import gradcheck

# On CuPy arrays the heavy ops run this project's CUDA kernels (compiled on
# first use; importing them needs no GPU, and backend.emulate_kernels() runs
# them on NumPy arrays through the CPU emulator).
from . import cuda_kernels, functions_conv, functions_loss, functions_norm, functions_pool
from .optim import sgd as _sgd

for _module in (functions_conv, functions_norm, functions_pool, functions_loss, _sgd):
    _module.gpu_impl = cuda_kernels

__version__ = "0.1.0"
__all__ = ["Tensor", "Function", "no_grad", "is_grad_enabled", "functional", "nn", "optim",
           "backend", "gradcheck"]
