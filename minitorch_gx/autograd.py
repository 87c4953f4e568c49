"""Define-by-run reverse-mode autodiff: Tensor, Function, backward, no_grad.

The whole idea in a few lines: every op is a ``Function`` whose ``forward``
maps input arrays to one output array and whose ``backward`` maps the output's
gradient to one gradient per input. Calling a Function on Tensors runs
``forward`` and, when a gradient is wanted, records the Function as the output's
``creator``. ``Tensor.backward()`` lists the recorded Functions in topological
order and walks them in reverse, handing each its output gradient.

Gradients are plain arrays (NumPy or CuPy), not Tensors: this engine computes
first derivatives only, which is all training needs.
"""
import contextlib

import numpy

from . import backend

_grad_enabled = True


def is_grad_enabled():
    return _grad_enabled


@contextlib.contextmanager
def no_grad():
    """Inside this block no graph is recorded (evaluation, optimizer steps)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


class Tensor:
    """An array, its gradient, and the Function that made it (if any).

    ``data`` is a NumPy or CuPy array; ``grad`` is an array of the same shape
    once ``backward()`` has reached this tensor; ``requires_grad`` marks leaves
    (parameters, inputs) whose gradient is wanted.
    """

    __array_priority__ = 1000  # so that ndarray + Tensor calls Tensor.__radd__

    def __init__(self, data, requires_grad=False):
        if isinstance(data, Tensor):
            data = data.data
        xp = backend.get_array_module(data)
        if isinstance(data, numpy.generic):  # a NumPy scalar keeps its dtype
            data = numpy.asarray(data)
        elif not isinstance(data, xp.ndarray):
            # Python numbers and lists become float32 arrays, as in PyTorch.
            data = numpy.asarray(data)
            if data.dtype == numpy.float64:
                data = data.astype(numpy.float32)
        self.data = data
        self.grad = None
        # True while ``grad`` holds the zeros an optimizer's zero_grad() left:
        # the first gradient may then be written straight into it
        # (Function.grad_buffer), saving a launch per parameter on a GPU
        self.grad_is_zero = False
        self.requires_grad = bool(requires_grad)
        self.creator = None  # the Function whose output this is; None for leaves
        self._grad_hooks = []

    # -- array-like views ------------------------------------------------
    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    @property
    def is_leaf(self):
        return self.creator is None

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.data!r}{flag})"

    def numpy(self):
        """The data as a NumPy array (copied from the GPU when needed)."""
        return backend.to_numpy(self.data)

    def item(self):
        return self.data.item()

    def detach(self):
        return Tensor(self.data)

    # -- operators -------------------------------------------------------
    # +, -, *, /, @, neg, .sum(), .mean() and .reshape() record ops of
    # ``minitorch_gx.ops.basic``, which binds them to Tensor when it is
    # imported (this module imports no op, so there is no import circle).

    # -- gradients -------------------------------------------------------
    def register_post_accumulate_grad_hook(self, hook):
        """Call ``hook(tensor)`` once this leaf's gradient for the current
        backward pass is complete (data-parallel training starts reducing a
        gradient bucket as soon as all of its gradients are ready)."""
        self._grad_hooks.append(hook)
        return hook

    def zero_grad(self):
        self.grad = None
        self.grad_is_zero = False

    def backward(self, grad=None):
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that
        requires a gradient. ``grad`` defaults to 1 for a one-element tensor."""
        if self.creator is None and not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require a gradient")
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError("backward() without a gradient needs a one-element tensor; "
                                   f"this one has shape {self.shape}")
            grad = _one(self.data) if self.creator is not None else xp.ones_like(self.data)
        elif isinstance(grad, Tensor):
            grad = grad.data
        if grad.shape != self.shape:
            raise ValueError(f"gradient shape {grad.shape} does not match tensor shape {self.shape}")
        if self.creator is None:
            _accumulate_leaf(self, grad)
            _fire_hooks(self)
            return
        run_backward(self, grad)


_ONES = {}  # (array type, dtype, device) -> a 1-element array holding 1


def _one(data):
    """The seed gradient 1 of a one-element tensor that has a creator, shaped
    like it. On a GPU it is made once per dtype and device and reused, which
    saves a fill launch per step; nothing writes into it, since backward
    functions only read their gy and the engine never stores a gy as a leaf's
    gradient without copying it (``_accumulate_leaf``)."""
    xp = backend.get_array_module(data)
    if xp is numpy:
        return numpy.ones_like(data)
    key = (type(data), data.dtype, getattr(getattr(data, "device", None), "id", None))
    if key not in _ONES:
        _ONES[key] = xp.ones(1, data.dtype)
    return _ONES[key].reshape(data.shape)


def add_gradients(a, b):
    """The sum of two gradients of one tensor (it fed two consumers), a new
    array. ``minitorch_gx.ops.basic`` replaces this with its op, which runs the
    project's own kernel on a GPU (this module imports no op)."""
    return a + b


class LazyGradient:
    """A gradient a backward may return in a cheaper form than its dense array
    (a strided 1x1 convolution's: zero outside every sh-th row and sw-th
    column). The engine keeps it so until it meets another gradient of the
    same tensor, which ``added_to`` joins in one pass, or until a Function or
    a leaf needs the array itself (``dense``)."""

    def dense(self):
        raise NotImplementedError

    def added_to(self, a):
        """a + the gradient, a new array (a is left alone)."""
        raise NotImplementedError


def _dense(g):
    return g.dense() if isinstance(g, LazyGradient) else g


def _sum(a, b):
    """The sum of two gradients of one tensor, out of place."""
    if isinstance(b, LazyGradient):
        return b.added_to(_dense(a))
    if isinstance(a, LazyGradient):
        return a.added_to(b)
    return add_gradients(a, b)


def _accumulate_leaf(t, g):
    # A leaf owns its gradient array: the optimizer and the allreduce update
    # it in place, so it must never alias an array another tensor also holds.
    if t.grad is None:
        t.grad = g.copy()
    elif g is t.grad:
        pass  # the op wrote it in place (Function.grad_buffer)
    elif t.grad_is_zero:
        t.grad[...] = g
    else:
        t.grad += g
    t.grad_is_zero = False


def _fire_hooks(t):
    for hook in t._grad_hooks:
        hook(t)


def _topological_order(root):
    """Functions reachable from ``root``, each after all Functions it feeds."""
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        f, expanded = stack.pop()
        if expanded:
            order.append(f)
            continue
        if id(f) in seen:
            continue
        seen.add(id(f))
        stack.append((f, True))
        for t in f.inputs:
            if t.creator is not None and id(t.creator) not in seen:
                stack.append((t.creator, False))
    return order  # inputs' creators come first


def run_backward(output, grad):
    order = _topological_order(output.creator)
    # How many pending contributions each leaf still waits for, so that its
    # hooks fire the moment its gradient is complete.
    pending = {}
    for f in order:
        for t in f.inputs:
            if t.creator is None and t.requires_grad:
                pending[id(t)] = pending.get(id(t), 0) + 1
    grads = {id(output.creator): grad}  # upstream gradient of each Function's output
    for f in reversed(order):
        if f.released:
            raise RuntimeError("backward() through a graph a second time: the arrays it "
                               "needs were freed by the first backward()")
        gy = _dense(grads.pop(id(f), None))
        if gy is None:  # every consumer of f's output returned None: nothing flows back
            for t in f.inputs:
                if t.creator is None and t.requires_grad:
                    pending[id(t)] -= 1
                    if pending[id(t)] == 0:
                        _fire_hooks(t)
            f.release()
            continue
        gxs = f.backward(gy)
        if not isinstance(gxs, tuple):
            gxs = (gxs,)
        if len(gxs) != len(f.inputs):
            raise RuntimeError(f"{type(f).__name__}.backward returned {len(gxs)} gradients "
                               f"for {len(f.inputs)} inputs")
        for t, gx in zip(f.inputs, gxs):
            if t.creator is None:
                if not t.requires_grad:
                    continue
                if gx is not None:
                    _accumulate_leaf(t, _dense(gx))
                pending[id(t)] -= 1
                if pending[id(t)] == 0:
                    _fire_hooks(t)
            elif gx is not None:
                key = id(t.creator)
                # out of place: gx may be the very array another input received
                grads[key] = gx if key not in grads else _sum(grads[key], gx)
        f.release()


class Function:
    """One differentiable op.

    Subclasses implement ``forward(*arrays) -> array`` and
    ``backward(gy) -> tuple`` of one gradient (or None) per input, and keep on
    ``self`` only what backward needs. ``backward`` reads gy and never writes
    into it (gy may be an array another Function also receives, or the
    engine's shared seed). Configuration (stride, eps, ...) goes to
    ``__init__``.
    """

    def __call__(self, *inputs):
        tensors = [x if isinstance(x, Tensor) else Tensor(x) for x in inputs]
        y = self.forward(*[t.data for t in tensors])
        out = Tensor(y)
        if _grad_enabled and any(t.requires_grad or t.creator is not None for t in tensors):
            self.inputs = tensors
            out.creator = self
        return out

    def forward(self, *xs):
        raise NotImplementedError

    def backward(self, gy):
        raise NotImplementedError

    def grad_buffer(self, i):
        """Where backward may put input ``i``'s gradient itself, or None: the
        leaf's own gradient array while it still holds the zeros an
        optimizer's ``zero_grad()`` left (so this is its first contribution).
        An op may then add into it or overwrite it, and must return that very
        array; the engine then has nothing to copy or add (on a GPU: one
        launch fewer per parameter)."""
        t = self.inputs[i]
        if t.creator is None and t.requires_grad and t.grad is not None and t.grad_is_zero:
            return t.grad
        return None

    released = False

    def release(self):
        """Drop the saved arrays once backward has run (frees activations)."""
        self.__dict__.clear()
        self.inputs = ()
        self.released = True
