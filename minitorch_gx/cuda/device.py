"""Where a kernel launch goes: the GPU through CuPy, or the CPU emulator.

``device_for(a)`` picks by array type. Both devices offer the same few calls
(``empty``, ``zeros``, ``input``, ``launch``), so the launchers (``conv``,
``norm``, ``pool``, ``loss``, ``sgd``, ``elementwise`` beside this file) are
written once:
  - CuPy arrays: each .cu file is compiled by NVRTC through ``cupy.RawModule``
    the first time one of its kernels is needed, once per set of compile-time
    defines, and memoized (CuPy also caches the binary on disk).
  - NumPy arrays: ``emulator`` compiles the same source with g++ and runs it
    on the CPU, slowly; this is how the kernels are tested without a GPU.
The compile-time launch shapes (``LAUNCH``) and the option list live here too.
"""
import numpy

from ..backend import cupy
from . import emulator

# Compile-time launch shapes (each becomes a -D define). Tests change them to
# run every kernel at several block sizes.
LAUNCH = {"CONV_THREADS": 256, "WGRAD_THREADS": 256, "BN_THREADS": 256, "SGD_THREADS": 256,
          "POOL_THREADS": 256, "XENT_THREADS": 256, "EW_THREADS": 256}

# Every kernel file and the LAUNCH entries it is compiled with (besides REAL).
KERNEL_FILES = {"grouped_conv.cu": ("CONV_THREADS",),
                "grouped_conv_bwd_weight.cu": ("WGRAD_THREADS",),
                "batch_norm.cu": ("BN_THREADS",), "sgd.cu": ("SGD_THREADS",),
                "max_pool.cu": ("POOL_THREADS",), "softmax_cross_entropy.cu": ("XENT_THREADS",),
                "add_relu.cu": ("EW_THREADS",), "normalize.cu": ("EW_THREADS",),
                "subsample.cu": ("EW_THREADS",), "avg_pool.cu": ("POOL_THREADS",),
                "linear.cu": ("EW_THREADS",)}

NVRTC_OPTIONS = ("--std=c++17",)
_REAL = {numpy.dtype(numpy.float32): "float", numpy.dtype(numpy.float64): "double"}
INT_LIMIT = 2 ** 31 - 1


class CupyDevice:
    """Kernels compiled with NVRTC (cupy.RawModule) and run on the current GPU."""

    name = "cuda"

    def __init__(self):
        self._modules = {}

    @property
    def xp(self):
        return cupy

    def empty(self, shape, dtype):
        return cupy.empty(shape, dtype)

    def zeros(self, shape, dtype):
        return cupy.zeros(shape, dtype)

    def input(self, a, dtype):
        """``a`` as a C-contiguous device array of ``dtype`` (copied only if needed)."""
        return cupy.asarray(a, dtype=dtype, order="C")

    def zero_fill(self, a):
        """a[...] = 0 for a C-contiguous array: one cudaMemsetAsync, not a kernel
        (CuPy's ``fill`` launches an element-wise kernel)."""
        if not a.flags.c_contiguous:
            raise ValueError("zero_fill needs a C-contiguous array")
        if a.nbytes:
            a.data.memset_async(0, a.nbytes)

    def module(self, file, defines):
        key = (file, defines)
        if key not in self._modules:
            source = (emulator.kernel_dir() / file).read_text()
            options = NVRTC_OPTIONS + tuple(f"-D{k}={v}" for k, v in defines)
            self._modules[key] = cupy.RawModule(code=source, options=options)
        return self._modules[key]

    def launch(self, file, kernel, grid, block, args, shared_mem=0, defines=()):
        self.module(file, defines).get_function(kernel)(grid, block, tuple(args),
                                                        shared_mem=shared_mem)

    def mark_written(self, *arrays):
        """The emulator's initcheck hooks (emulator.EmuDevice); nothing to do on a GPU."""

    def check_written(self, *arrays):
        """The emulator's initcheck hooks (emulator.EmuDevice); nothing to do on a GPU."""


CUPY_DEVICE = CupyDevice() if cupy is not None else None


def device_for(a):
    """The CuPy device for CuPy arrays, the CPU emulator for NumPy arrays."""
    if cupy is not None and isinstance(a, cupy.ndarray):
        return CUPY_DEVICE
    if isinstance(a, numpy.ndarray):
        return emulator.device()
    raise TypeError(f"expected a CuPy or NumPy array, got {type(a).__name__}")


def defines(dtype, *names):
    """-D defines for a launch: the element type and the thread counts it uses."""
    dtype = numpy.dtype(dtype)
    if dtype not in _REAL:
        raise TypeError(f"the CUDA kernels take float32 or float64 arrays, not {dtype}")
    return tuple(sorted([("REAL", _REAL[dtype])] + [(n, LAUNCH[n]) for n in names]))


def builds(dtype=numpy.float32):
    """(file, defines) for every kernel file as the launchers compile it now."""
    return [(f, defines(dtype, *names)) for f, names in KERNEL_FILES.items()]


def check_threads(name, file, multiple=32, most=1024, powers_of_two=False):
    """LAUNCH[name] is a block size ``file`` works with. Checked before the
    launch because the kernels __trap on any other, and on a GPU a trap ends
    the CUDA context: every later call of the process fails."""
    threads = LAUNCH[name]
    if powers_of_two:
        ok = threads >= multiple and threads <= most and threads & (threads - 1) == 0
        want = f"a power of two from {multiple} to {most}"
    else:
        ok = 0 < threads <= most and threads % multiple == 0
        want = f"a multiple of {multiple} up to {most}"
    if not ok:
        raise ValueError(f"{file} needs {name} = {want}, got {threads} (LAUNCH in "
                         f"minitorch_gx/cuda/device.py)")
    return threads


def check_size(**arrays_or_sizes):
    for name, a in arrays_or_sizes.items():
        size = a if isinstance(a, int) else a.size
        if size > INT_LIMIT:
            raise ValueError(f"{name} has {size} elements; the kernels index with 32-bit ints "
                             f"(at most {INT_LIMIT}): use a smaller batch")


def inplace(dev, a, dtype, name):
    """The array a kernel should update for ``a``; then call ``write_back``."""
    if dev is CUPY_DEVICE:
        if a.dtype != dtype or not a.flags.c_contiguous:
            raise ValueError(f"{name} is updated in place: it must be C-contiguous {dtype}")
        return a
    return dev.input(a, dtype)  # the emulator works on a guarded copy


def write_back(original, worked_on):
    if worked_on is not original:
        original[...] = worked_on


# --------------------------------------------------------------------------
# Activations in memory: NCHW, or CNHW on the GPU path. A logical
# (N, C, H, W) array whose memory is a C-contiguous (C, N, H, W) array (its
# transposed view) puts all N*H*W values of a channel in one row, so that a
# 1x1 convolution is a single GEMM over N*H*W columns and a channel's
# statistics one contiguous run. Shapes stay NCHW everywhere: the layout is
# only where the values sit, so every op is correct on either, and kernels
# that know both are handed the memory as it is.
# --------------------------------------------------------------------------
def is_cnhw(a):
    """A logical (N, C, H, W) view of C-contiguous (C, N, H, W) memory (and
    not also NCHW-contiguous, as when N or C is 1)."""
    return (a.ndim == 4 and not a.flags.c_contiguous
            and a.transpose(1, 0, 2, 3).flags.c_contiguous)


def stored(a, cnhw):
    """``a`` in the order of its memory when ``cnhw`` (its (C, N, H, W)
    transpose, C-contiguous), else ``a``: for kernels that only need planes or
    elements, not which index is which. Applied twice it gives ``a`` back."""
    return a.transpose(1, 0, 2, 3) if cnhw else a


def in_layout(a, cnhw):
    """a (N, C, H, W) in CNHW memory when ``cnhw``, else in NCHW memory: a
    itself when it is already, else a copy (``copy()`` is C order for NumPy
    and CuPy alike)."""
    if cnhw:
        return a if is_cnhw(a) else a.transpose(1, 0, 2, 3).copy().transpose(1, 0, 2, 3)
    return a if a.flags.c_contiguous else a.copy()


def new_in_layout(xp, shape, dtype, cnhw, zeros=False):
    """A new logical (N, C, H, W) array of ``xp`` in CNHW memory when
    ``cnhw``, else NCHW; uninitialised, or zeros."""
    n, c, h, w = shape
    memory = (xp.zeros if zeros else xp.empty)((c, n, h, w) if cnhw else (n, c, h, w), dtype)
    return stored(memory, cnhw)


def planes(dev, a, dtype):
    """(memory, image stride, channel stride) of a logical (N, C, H, W) array
    for a kernel that reads planes: CNHW and NCHW memory as it is (a device
    array: no copy), any other layout copied to NCHW."""
    n, c, h, w = a.shape
    if is_cnhw(a):
        return dev.input(a.transpose(1, 0, 2, 3), dtype), h * w, n * h * w
    return dev.input(a, dtype), c * h * w, h * w


def empty_planes(dev, shape, dtype, cnhw):
    """A new logical (N, C, H, W) array in CNHW memory when ``cnhw``, else NCHW:
    (the array, its memory, image stride, channel stride)."""
    n, c, h, w = shape
    if cnhw:
        memory = dev.empty((c, n, h, w), dtype)
        return memory.transpose(1, 0, 2, 3), memory, h * w, n * h * w
    memory = dev.empty(tuple(shape), dtype)
    return memory, memory, c * h * w, h * w


def blocks(n, threads, most=65535):
    """ceil(n / threads), clamped to [1, most]: a 1-D grid."""
    return max(1, min(most, -(-n // threads)))


def pair(v, name):
    pair_ = (v, v) if isinstance(v, (int, numpy.integer)) else tuple(v)
    if len(pair_) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return int(pair_[0]), int(pair_[1])
