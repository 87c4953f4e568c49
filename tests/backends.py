"""The implementations an op can run, for tests parametrised over them.

    @pytest.mark.parametrize("impl", IMPLEMENTATIONS)
    def test_something(impl):
        with run_on(impl) as dev:
            y = F.conv2d(mt.Tensor(dev(x)), mt.Tensor(dev(W)))
        assert_close(host(y.data), expected, ...)

- "reference": every op on its plain ``*_reference`` path (the specification);
- "fast":      the NumPy fast path (the default on a CPU);
- "emulated":  the CUDA kernels through their launchers, on NumPy arrays,
               run by the CPU emulator (needs g++; skipped honestly without);
- "cupy":      the CUDA kernels on a real GPU (skipped without CuPy and a GPU).
"""
import contextlib
import shutil

import numpy
import pytest

from minitorch_gx import Tensor, backend
from minitorch_gx.cuda import device as cuda_device

HAVE_GPU = backend.gpu_available()
HAVE_EMULATOR = shutil.which(__import__("os").environ.get("CXX", "g++")) is not None

needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="no usable CUDA GPU (CuPy)")
needs_emulator = pytest.mark.skipif(not HAVE_EMULATOR,
                                    reason="the CUDA emulator needs a C++ compiler (g++)")

IMPLEMENTATIONS = ["reference", "fast",
                   pytest.param("emulated", marks=needs_emulator),
                   pytest.param("cupy", marks=needs_gpu)]
KERNEL_IMPLEMENTATIONS = [pytest.param("emulated", marks=needs_emulator),
                          pytest.param("cupy", marks=needs_gpu)]


def host(a):
    """Any array (or Tensor) as a NumPy array."""
    if isinstance(a, Tensor):
        a = a.data
    return backend.to_numpy(a)


@contextlib.contextmanager
def run_on(impl):
    """Inside the block ops run ``impl``; yields ``dev``, which moves a NumPy
    array to where that implementation works (a copy, so inputs stay intact)."""
    if impl == "reference":
        with backend.implementation("reference"):
            yield numpy.array
    elif impl == "fast":
        yield numpy.array
    elif impl == "emulated":
        with backend.emulate_kernels():
            yield numpy.array
    elif impl == "cupy":
        yield backend.cupy.array
    else:
        raise ValueError(f"unknown implementation {impl!r}")


@contextlib.contextmanager
def launch_shapes(**threads):
    """Compile-time block sizes (``LAUNCH`` entries such as CONV_THREADS=64)
    changed inside the block, so kernels run at other tile shapes."""
    saved = dict(cuda_device.LAUNCH)
    cuda_device.LAUNCH.update(threads)
    try:
        yield
    finally:
        cuda_device.LAUNCH.clear()
        cuda_device.LAUNCH.update(saved)


def assert_close(actual, expected, rtol, atol, what=""):
    """Elementwise |actual - expected| <= atol + rtol |expected|; on failure
    name the shape, the worst error and the first offending element."""
    actual = host(actual).astype(numpy.float64)
    expected = host(expected).astype(numpy.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = numpy.abs(actual - expected)
    bound = atol + rtol * numpy.abs(expected)
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        i = numpy.unravel_index(numpy.argmax(bad), err.shape)
        raise AssertionError(
            f"{what}: shape {expected.shape}, {int(bad.sum())} elements off, worst abs error "
            f"{numpy.nanmax(err):.3g}, worst rel error "
            f"{numpy.nanmax(err / numpy.maximum(numpy.abs(expected), 1e-30)):.3g}; "
            f"first at {tuple(int(v) for v in i)}: got {actual[i]!r}, expected {expected[i]!r}")


def scaled(expected, factor=3e-5):
    """An absolute tolerance in proportion to the magnitude of ``expected``."""
    return factor * max(1.0, float(numpy.abs(host(expected)).max()))


def same_bits_under_every_schedule(run, what=""):
    """``run()`` returns arrays computed by emulated kernels; they must be equal
    bit for bit whether the threads between two barriers (and the blocks) run
    in index order, reversed or shuffled: a result that depends on the order
    is a race, even one the emulator's race tracker cannot see."""
    from minitorch_gx.cuda import emulator

    results = {}
    for order in emulator.SCHEDULES:
        with emulator.schedule(order, seed=11):
            results[order] = [host(a).copy() for a in run()]
    for order, arrays in results.items():
        for i, (a, b) in enumerate(zip(arrays, results["forward"])):
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), (
                f"{what} output {i}: the {order} schedule changes "
                f"{int((a != b).sum())} of {a.size} elements")


def count_calls(monkeypatch, module, name):
    """Replace module.name by a wrapper that records each call; return the record."""
    calls, original = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls
