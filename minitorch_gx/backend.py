"""NumPy or CuPy: the one place that decides.

Every op asks ``xp = get_array_module(x)`` and then writes ``xp.sum``,
``xp.matmul`` ... so the same code runs on host and device arrays. This is the
only module that imports ``cupy``; everything else imports and tests on a
machine without a GPU.

Every op has up to three implementations of each array-level step, and
``choose`` is the one rule that picks between them:
  - ``reference``: plain ``xp`` code, the specification; forced everywhere by
    ``implementation("reference")``, which is how the tests compare paths;
  - ``kernel``: this project's CUDA launcher, on CuPy arrays, or on NumPy
    arrays inside ``emulate_kernels()`` (the CPU emulator runs the kernel);
  - ``fast``: the NumPy (or generic CuPy) formulation, otherwise.
"""
import contextlib

import numpy

try:  # CuPy is optional: import errors of any kind mean "no GPU backend".
    import cupy
    import cupyx
except Exception:  # pragma: no cover - depends on the machine
    cupy = None
    cupyx = None


def get_array_module(*arrays):
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``."""
    if cupy is not None:
        for a in arrays:
            if isinstance(a, cupy.ndarray):
                return cupy
    return numpy


def gpu_available():
    """True when CuPy imports and sees at least one usable CUDA device."""
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def to_numpy(a):
    """Copy a device array to the host; host arrays pass through."""
    if cupy is not None and isinstance(a, cupy.ndarray):
        return cupy.asnumpy(a)
    return numpy.asarray(a)


def to_device(a, device):
    """Move an array to ``device``: "cpu" or "gpu"/"cuda" (the current GPU)."""
    device = normalize_device(device)
    if device == "cpu":
        return to_numpy(a)
    if not gpu_available():
        raise RuntimeError("a GPU was asked for but no usable CUDA device (or CuPy) was found")
    return cupy.asarray(a)


def normalize_device(device):
    """Map the spellings users write ("GPU", "cuda", "cuda:0", "CPU") to "gpu" or "cpu"."""
    d = str(device).lower()
    if d == "cpu":
        return "cpu"
    if d in ("gpu", "cuda") or d.startswith("cuda:"):
        return "gpu"
    raise ValueError(f"unknown device {device!r}: use 'cpu' or 'gpu'")


def device_of(a):
    return "gpu" if get_array_module(a) is not numpy else "cpu"


# --------------------------------------------------------------------------
# Which implementation of an op runs: "fast" (the default) or "reference".
# --------------------------------------------------------------------------
_implementation = "fast"


def use_reference():
    """True while ``implementation("reference")`` is in force."""
    return _implementation == "reference"


@contextlib.contextmanager
def implementation(name):
    """Force every op to its ``"reference"`` or ``"fast"`` path inside the block."""
    global _implementation
    if name not in ("fast", "reference"):
        raise ValueError(f"implementation must be 'fast' or 'reference', not {name!r}")
    previous, _implementation = _implementation, name
    try:
        yield
    finally:
        _implementation = previous


# --------------------------------------------------------------------------
# Whether an op calls its CUDA kernel: on CuPy arrays, or on NumPy arrays
# inside ``emulate_kernels()``, where the kernels run on the CPU emulator.
# --------------------------------------------------------------------------
_emulate = False


def use_kernels(xp):
    """True when an op given ``xp`` arrays should call its CUDA launcher."""
    return not use_reference() and (xp is not numpy or _emulate)


@contextlib.contextmanager
def emulate_kernels():
    """Run the CUDA kernels on NumPy arrays through the CPU emulator
    (``minitorch_gx.cuda.emulator``), so that the ops' whole GPU path -- launchers,
    argument order, saved state -- is exercised without a GPU. Slow."""
    global _emulate
    previous, _emulate = _emulate, True
    try:
        yield
    finally:
        _emulate = previous


def choose(x, *, reference, fast, kernel=None):
    """The implementation an op should call for array ``x`` (see the module
    docstring): ``reference`` under ``implementation("reference")``, else
    ``kernel`` when kernels are in use for ``x``'s array module, else ``fast``."""
    if use_reference():
        return reference
    if kernel is not None and use_kernels(get_array_module(x)):
        return kernel
    return fast


def set_tf32(enabled):
    """Let cuBLAS compute the GEMMs of float32 CuPy arrays in TF32 (tensor
    cores; inputs rounded to a 10-bit mantissa, sums in fp32) when
    ``enabled``; in full fp32 otherwise. Set both ways explicitly, so that a
    ``CUPY_TF32=1`` in the environment never changes a run's arithmetic
    unasked. Our own kernels are fp32 either way."""
    if cupy is None:
        raise RuntimeError("TF32 is a cuBLAS setting: it needs CuPy and a GPU")
    from cupy._core import _routines_linalg as linalg
    linalg.set_compute_type(numpy.float32, linalg.COMPUTE_TYPE_TF32 if enabled
                            else linalg.COMPUTE_TYPE_DEFAULT)


def nccl():
    """CuPy's NCCL binding (``cupy.cuda.nccl``), or None when it is missing.
    ``import cupy`` does not load it, so it is imported here on demand."""
    if cupy is None:
        return None
    try:
        import importlib
        return importlib.import_module("cupy.cuda.nccl")
    except Exception:
        return None
