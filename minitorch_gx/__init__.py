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

if backend.cupy is not None:
    # On CuPy arrays the heavy ops run this project's CUDA kernels (compiled on
    # first use); importing them needs no GPU.
    from . import cuda_kernels, functions_conv, functions_norm
    from .optim import sgd as _sgd
    functions_conv.gpu_impl = functions_norm.gpu_impl = _sgd.gpu_impl = cuda_kernels

__version__ = "0.1.0"
__all__ = ["Tensor", "Function", "no_grad", "is_grad_enabled", "functional", "nn", "optim",
           "backend", "gradcheck"]
