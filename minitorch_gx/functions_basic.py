"""Elementwise, shape and dense ops: add, mul, relu, reshape/flatten, sum,
mean, matmul, linear.

Each op is a Function (forward on arrays, backward returning one gradient per
input) plus a lowercase public function that documents it.
"""
from . import backend
from .autograd import Function


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
        y = x @ W.T  # (N, out)
        if b is not None:
            y += b
        return y

    def backward(self, gy):
        gx = gy @ self.W         # (N, in)
        gW = gy.T @ self.x       # (out, in)
        if len(self.inputs) == 3:
            return gx, gW, gy.sum(axis=0)
        return gx, gW


def linear(x, W, b=None):
    """Fully connected layer: ``y = x @ W.T + b``; x (N, in), W (out, in), b (out,)."""
    return Linear()(x, W) if b is None else Linear()(x, W, b)
