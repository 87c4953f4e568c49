"""Check analytic gradients against central finite differences (float64).

For a function f and a random upstream gradient ``gy`` (random, not ones, so
that a transposed or mis-summed gradient cannot hide), the scalar
``L(x) = sum(gy * f(x))`` has ``dL/dx = backward(gy)``. Each checked element
(or each random direction ``d``) is compared with
``(L(x + eps d) - L(x - eps d)) / (2 eps)``.
"""
import numpy

from . import backend
from .autograd import Tensor, no_grad


def gradcheck(fn, inputs, wrt=None, eps=1e-6, atol=1e-6, rtol=1e-5, directions=None, seed=0):
    """Raise AssertionError unless every gradient of ``fn(*inputs)`` matches.

    inputs:     Tensors passed to ``fn``; float64 data is expected.
    wrt:        Tensors whose gradient is checked (default: inputs that
                require one). Model parameters can be listed here.
    directions: None checks every element; an integer k checks k random
                directions per tensor (for large tensors).
    """
    rng = numpy.random.default_rng(seed)
    wrt = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad] if wrt is None else wrt
    for t in wrt:
        if t.dtype != numpy.float64:
            raise TypeError(f"gradcheck needs float64 data, got {t.dtype} for a {t.shape} tensor")
    y = fn(*inputs)
    xp = backend.get_array_module(y.data)
    gy = xp.asarray(rng.standard_normal(y.shape))
    for t in wrt:
        t.grad = None
    y.backward(gy)
    analytic = [t.grad if t.grad is not None else xp.zeros_like(t.data) for t in wrt]

    def loss():
        with no_grad():
            return float((fn(*inputs).data * gy).sum())

    for index, (t, g) in enumerate(zip(wrt, analytic)):
        if directions is None:
            numeric = xp.zeros_like(t.data)
            flat = t.data.reshape(-1)  # a view: perturbing it perturbs t
            for i in range(flat.size):
                old = flat[i].item()
                flat[i] = old + eps
                plus = loss()
                flat[i] = old - eps
                minus = loss()
                flat[i] = old
                numeric.reshape(-1)[i] = (plus - minus) / (2 * eps)
            _compare(index, t, backend.to_numpy(g), backend.to_numpy(numeric), atol, rtol)
        else:
            for _ in range(directions):
                d = xp.asarray(rng.standard_normal(t.shape))
                old = t.data.copy()
                t.data[...] = old + eps * d
                plus = loss()
                t.data[...] = old - eps * d
                minus = loss()
                t.data[...] = old
                numeric = (plus - minus) / (2 * eps)
                exact = float((g * d).sum())
                _compare(index, t, numpy.array([exact]), numpy.array([numeric]), atol, rtol)
    return True


def _compare(index, t, analytic, numeric, atol, rtol):
    err = numpy.abs(analytic - numeric)
    tol = atol + rtol * numpy.abs(numeric)
    if numpy.all(err <= tol):
        return
    worst = int(numpy.argmax(err - tol))
    rel = err / numpy.maximum(numpy.abs(numeric), 1e-12)
    raise AssertionError(
        f"gradient mismatch for checked tensor #{index} of shape {t.shape}: "
        f"worst abs error {err.max():.3e}, worst rel error {rel.max():.3e} "
        f"(at flat index {worst}: analytic {analytic.reshape(-1)[worst]:.6e}, "
        f"numeric {numeric.reshape(-1)[worst]:.6e}); first analytic "
        f"{analytic.reshape(-1)[:4]}, first numeric {numeric.reshape(-1)[:4]}")
