"""Elementwise, shape and dense ops: add, mul, relu, add_relu (the residual
join), reshape/flatten, sum, mean, matmul, linear; and Tensor's operators.

Each op is a Function (forward on arrays, backward returning one gradient per
input) plus a lowercase public function that documents it. ``add_relu`` has a
reference, a NumPy fast path and a CUDA kernel, chosen by ``backend.choose``;
``linear``'s bias runs ``kernels/linear.cu`` where kernels are in use.
At the end of this file Tensor's operators (+, *, @, .sum() ...) are bound to
these ops, once: ``autograd`` defines Tensor without importing any op.
"""
import numpy

from .. import autograd, backend, cpu
from ..autograd import Function, Tensor
from ..cuda import elementwise as cuda_elementwise
from ..cuda import linear as cuda_linear


def sum_to(g, shape):
    """Sum ``g`` down to ``shape``: the backward of NumPy broadcasting."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape)
                                      if n == 1 and g.shape[i + lead] != 1)
    g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


class Add(Function):
    def forward(self, a, b):
        self.a_shape, self.b_shape = a.shape, b.shape
        return a + b

    def backward(self, gy):
        return sum_to(gy, self.a_shape), sum_to(gy, self.b_shape)


def add(a, b):
    """``a + b`` with NumPy broadcasting."""
    return Add()(a, b)


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, gy):
        return sum_to(gy * self.b, self.a.shape), sum_to(gy * self.a, self.b.shape)


def mul(a, b):
    """``a * b`` with NumPy broadcasting (``b`` may be a Python number)."""
    if isinstance(b, (int, float)):
        return Scale(b)(a)
    return Mul()(a, b)


class Scale(Function):
    def __init__(self, c):
        self.c = c

    def forward(self, x):
        return x * x.dtype.type(self.c)

    def backward(self, gy):
        return (gy * gy.dtype.type(self.c),)


class ReLU(Function):
    def forward(self, x):
        xp = backend.get_array_module(x)
        y = xp.maximum(x, 0)
        self.mask = y > 0  # one byte per element is all backward needs
        return y

    def backward(self, gy):
        return (gy * self.mask,)


def relu(x):
    """``max(x, 0)`` elementwise."""
    return ReLU()(x)


# --------------------------------------------------------------------------
# The residual join of a bottleneck, y = max(a + b, 0), as one op: one pass
# over memory instead of an add, a ReLU and the temporary between them.
# --------------------------------------------------------------------------
class AddReLU(Function):
    def forward(self, a, b):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"add_relu: a {a.shape} {a.dtype} and b {b.shape} {b.dtype} must "
                             f"have one shape and dtype")
        y = backend.choose(a, reference=add_relu_forward_reference, fast=_add_relu_forward_fast,
                           kernel=cuda_elementwise.add_relu_forward)(a, b)
        self.y = y  # backward needs only where y > 0
        return y

    def backward(self, gy):
        gx = backend.choose(gy, reference=relu_backward_reference, fast=_relu_backward_fast,
                            kernel=cuda_elementwise.relu_backward)(gy, self.y)
        return gx, gx  # d/da = d/db: both summands see the same gradient


def add_relu(a, b):
    """``max(a + b, 0)`` of two arrays of one shape (the residual add + ReLU)."""
    return AddReLU()(a, b)


def add_relu_forward_reference(a, b):
    xp = backend.get_array_module(a)
    return xp.maximum(a + b, 0).astype(a.dtype, copy=False)


def relu_backward_reference(gy, y):
    """gy where y > 0, else 0."""
    return gy * (y > 0)


def _add_relu_forward_fast(a, b):
    """max(a + b, 0) in a's memory layout, piece by piece over the threads
    (``cpu.elementwise``): the sum is still in cache when the maximum reads it."""
    def passes(a, b, y):
        numpy.add(a, b, out=y)
        cpu.relu_into(y)
    y = cpu.elementwise_new(passes, a, b)
    return y if y is not None else add_relu_forward_reference(a, b)


def _relu_backward_fast(gy, y):
    """gy where y > 0, else 0, over the threads (``cpu.elementwise``)."""
    gx = cpu.elementwise_new(lambda gy, y, gx: cpu.relu_gradient_into(gx, gy, y), gy, y)
    return gx if gx is not None else relu_backward_reference(gy, y)


class Reshape(Function):
    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.x_shape = x.shape
        return x.reshape(self.shape)

    def backward(self, gy):
        return (gy.reshape(self.x_shape),)


def reshape(x, shape):
    return Reshape(tuple(shape))(x)


def flatten(x, start_dim=1):
    """Merge every axis from ``start_dim`` on: (N, C, H, W) -> (N, C*H*W)."""
    shape = x.shape[:start_dim] + (-1,)
    return Reshape(shape)(x)


class Sum(Function):
    def __init__(self, axis, keepdims):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.x_shape = x.shape
        return x.sum(axis=self.axis, keepdims=self.keepdims)

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        if not self.keepdims and self.axis is not None:
            axes = (self.axis,) if isinstance(self.axis, int) else self.axis
            axes = sorted(a % len(self.x_shape) for a in axes)
            for a in axes:
                gy = xp.expand_dims(gy, a)
        return (xp.broadcast_to(gy, self.x_shape).copy(),)


def sum(x, axis=None, keepdims=False):  # noqa: A001 - mirrors torch.sum
    return Sum(axis, keepdims)(x)


def mean(x, axis=None, keepdims=False):
    n = x.size if axis is None else _count(x.shape, axis)
    return mul(sum(x, axis, keepdims), 1.0 / n)


def _count(shape, axis):
    axes = (axis,) if isinstance(axis, int) else axis
    n = 1
    for a in axes:
        n *= shape[a]
    return n


class MatMul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a @ b

    def backward(self, gy):
        return gy @ self.b.T, self.a.T @ gy


def matmul(a, b):
    """2-D matrix product ``a @ b``."""
    return MatMul()(a, b)


class Linear(Function):
    """y = x W^T + b, with x (N, in), W (out, in), b (out,)."""

    def forward(self, x, W, b=None):
        self.x, self.W = x, W
        y = backend.get_array_module(x).matmul(x, W.T)  # (N, out)
        if b is not None:
            if backend.use_kernels(backend.get_array_module(y)):
                cuda_linear.add_bias(y, b)  # in place, one launch (kernels/linear.cu)
            else:
                y += b
        return y

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        gx = xp.matmul(gy, self.W)  # (N, in)
        # into the parameters' own gradient arrays when they await their first
        gW = xp.matmul(gy.T, self.x, out=self.grad_buffer(1))  # (out, in)
        if len(self.inputs) == 3:
            if backend.use_kernels(xp):
                return gx, gW, cuda_linear.sum_columns(gy, out=self.grad_buffer(2))
            return gx, gW, gy.sum(axis=0, out=self.grad_buffer(2))
        return gx, gW


def linear(x, W, b=None):
    """Fully connected layer: ``y = x @ W.T + b``; x (N, in), W (out, in), b (out,)."""
    return Linear()(x, W) if b is None else Linear()(x, W, b)


# --------------------------------------------------------------------------
# Tensor's operators, bound once now that both Tensor and the ops exist.
# --------------------------------------------------------------------------
def _sub(a, b):
    return add(a, mul(b, -1.0))


def _rsub(a, b):
    return add(mul(a, -1.0), b)


def _truediv(a, b):
    if not isinstance(b, (int, float)):
        raise TypeError("Tensor / x is defined for a Python number x only")
    return mul(a, 1.0 / b)


def _reshape_method(t, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return reshape(t, tuple(shape))


def add_gradients(a, b):
    """The engine's sum of two gradients of one tensor (autograd.add_gradients):
    a + b, with the kernels one launch of our own (add_relu.cu add_arrays)."""
    return backend.choose(a, reference=_add_arrays, fast=_add_arrays_fast,
                          kernel=cuda_elementwise.add)(a, b)


def _add_arrays(a, b):
    return a + b


def _add_arrays_fast(a, b):
    """a + b in a's layout, over the threads when a and b share it."""
    y = cpu.elementwise_new(lambda a, b, y: numpy.add(a, b, out=y), a, b)
    return y if y is not None else a + b


autograd.add_gradients = add_gradients
Tensor.__add__ = Tensor.__radd__ = add
Tensor.__mul__ = Tensor.__rmul__ = mul
Tensor.__neg__ = lambda t: mul(t, -1.0)
Tensor.__sub__, Tensor.__rsub__, Tensor.__truediv__ = _sub, _rsub, _truediv
Tensor.__matmul__ = matmul
Tensor.sum = lambda t, axis=None, keepdims=False: sum(t, axis, keepdims)
Tensor.mean = lambda t, axis=None, keepdims=False: mean(t, axis, keepdims)
Tensor.reshape = _reshape_method
