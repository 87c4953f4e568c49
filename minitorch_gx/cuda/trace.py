"""What the GPU path launches, seen on a machine without a GPU: a trace.

Inside ``fake_gpu()`` the package believes CuPy is present: ``backend.cupy``
is ``FakeCupy``, whose arrays (``TracedArray``) are NumPy arrays that record
every operation CuPy would run on the device, and the CUDA device's ``launch``
records each kernel launch instead of running it. So the ops take exactly
their GPU branches (the same ``choose``, the same launchers, the same
``dev is CUPY_DEVICE`` checks), and the trace lists what one call costs on a
GPU, one ``Launch`` per device operation:

    with trace.fake_gpu() as launches:
        y = F.conv2d(mt.Tensor(trace.to_gpu(x)), mt.Tensor(trace.to_gpu(W)))
    for launch in launches: ...   # kind, name, bytes, flops

What each device operation counts (the floor a GPU cannot beat):
  - our kernels: every array argument once (read if its parameter is
    ``const``, else written), and the multiply-adds of the convolutions
    (2 FLOPs each; other kernels count one FLOP per element they write);
  - cuBLAS GEMMs (``matmul``, ``tensordot``, ``dot``): A and B read, C written,
    2 M N K FLOPs; a ``tensordot`` operand CuPy must transpose into a copy
    first is one more copy;
  - generic CuPy operations (element-wise, reductions, copies, fills):
    operands read, result written, one FLOP per result element; CuPy launches
    one kernel each;
  - memsets (``cupy.zeros``, ``CupyDevice.zero_fill``: cudaMemsetAsync, no
    kernel), host/device transfers, and reads of a device value back to the
    host (each of which waits for the device) are listed apart.
Values are not computed by the recorded kernels (their outputs are left as
allocated), so a traced step costs little more than its NumPy GEMMs.
Assumptions, not measurements: CuPy's batched ``matmul`` as one launch, its
``mean`` as one reduction (CuPy fuses the division into it), a reshape that
must copy as one copy.
"""
import collections
import contextlib
import re
import types

import numpy

from .. import backend
from . import device as cuda_device
from . import emulator

Launch = collections.namedtuple("Launch", "kind name bytes flops")
Launch.__doc__ = """One device operation: ``kind`` "kernel" (this project's),
"gemm" (cuBLAS), "cupy" (a generic CuPy kernel), "memset", "h2d" / "d2h" (a
transfer; "d2h" waits for the device); ``name``; bytes moved; FLOPs."""

_trace = None  # the list being recorded into, inside fake_gpu()


def _record(kind, name, nbytes, flops=0):
    if _trace is not None:
        _trace.append(Launch(kind, name, int(nbytes), int(flops)))


def _plain(a):
    return a.view(numpy.ndarray) if isinstance(a, TracedArray) else a


def _wrap(a):
    if isinstance(a, numpy.ndarray) and not isinstance(a, TracedArray):
        return a.view(TracedArray)
    if isinstance(a, numpy.generic):  # a CuPy reduction returns a 0-d array
        return numpy.asarray(a).view(TracedArray)
    if isinstance(a, tuple):
        return tuple(_wrap(x) for x in a)
    if isinstance(a, list):
        return [_wrap(x) for x in a]
    return a


def _nbytes(*arrays):
    return sum(a.nbytes for a in arrays if isinstance(a, numpy.ndarray))


def _gemm_flops(a, b):
    """2 M N K of a @ b (batched: times the broadcast batch)."""
    if a.ndim == 1 or b.ndim == 1:
        return 2 * a.size * (b.size // max(a.shape[-1], 1)) if a.ndim == 1 else 2 * a.size
    batch = numpy.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return 2 * int(numpy.prod(batch, dtype=numpy.int64)) * a.shape[-2] * a.shape[-1] * b.shape[-1]


class TracedArray(numpy.ndarray):
    """A NumPy array standing for a CuPy array: operations on it run on the
    host and are recorded as the device operations CuPy would launch."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        args = [_plain(a) for a in inputs]
        if out is not None:
            kwargs["out"] = tuple(_plain(o) for o in out)
        result = getattr(ufunc, method)(*args, **kwargs)
        written = kwargs["out"] if out is not None else result
        written = written if isinstance(written, tuple) else (written,)
        size = sum(numpy.size(w) for w in written)
        if ufunc is numpy.matmul and method == "__call__":
            _record("gemm", "cuBLAS GEMM (matmul)", _nbytes(*args, *written),
                    _gemm_flops(args[0], args[1]))
        else:
            name = ufunc.__name__ + ("" if method == "__call__" else f".{method}")
            _record("cupy", name, _nbytes(*args, *written), size)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        plain_args = [_plain(a) if not isinstance(a, (list, tuple)) else type(a)(map(_plain, a))
                      for a in args]
        plain_kwargs = {k: _plain(v) for k, v in kwargs.items()}
        result = func(*plain_args, **plain_kwargs)
        arrays = [a for a in plain_args if isinstance(a, numpy.ndarray)]
        for a in plain_args:
            if isinstance(a, (list, tuple)):
                arrays += [x for x in a if isinstance(x, numpy.ndarray)]
        if func is numpy.tensordot:
            _record_tensordot(plain_args, plain_kwargs, result)
        elif func is numpy.dot:
            _record("gemm", "cuBLAS GEMM (dot)", _nbytes(*arrays, result),
                    _gemm_flops(arrays[0], arrays[1]))
        elif func in _VIEWS:
            pass  # a view, or a reshape: no launch unless it had to copy
        else:
            _record("cupy", func.__name__, _nbytes(*arrays, result), numpy.size(result))
        return _wrap(result)

    # -- methods that launch (or sync) without going through a ufunc ----------
    def fill(self, value):
        _record("cupy", "fill", self.nbytes)
        super().fill(value)

    def astype(self, dtype, *args, copy=True, **kwargs):
        if numpy.dtype(dtype) == self.dtype and not copy:
            return self
        _record("cupy", "astype", self.nbytes + self.size * numpy.dtype(dtype).itemsize,
                self.size)
        return _wrap(_plain(self).astype(dtype, *args, copy=copy, **kwargs))

    def copy(self, order="C"):
        _record("cupy", "copy", 2 * self.nbytes)
        return _wrap(_plain(self).copy(order))

    def reshape(self, *shape, **kwargs):
        result = _plain(self).reshape(*shape, **kwargs)
        if self.size and not numpy.shares_memory(result, _plain(self)):
            _record("cupy", "copy (reshape)", 2 * self.nbytes)
        return _wrap(result)

    def mean(self, axis=None, dtype=None, out=None, keepdims=False):
        result = _plain(self).mean(axis=axis, dtype=dtype, out=_plain(out), keepdims=keepdims)
        _record("cupy", "mean", self.nbytes + _nbytes(numpy.asarray(result)), self.size)
        return out if out is not None else _wrap(result)

    def ravel(self, order="C"):
        return self.reshape(-1)

    def __getitem__(self, key):
        keys = key if isinstance(key, tuple) else (key,)
        result = _plain(self)[key]
        if any(isinstance(k, (numpy.ndarray, list)) for k in keys):  # a gather
            _record("cupy", "take (fancy index)", _nbytes(result, *[k for k in keys if isinstance(
                k, numpy.ndarray)]) + numpy.size(result) * self.itemsize, numpy.size(result))
        return _wrap(result)

    def __setitem__(self, key, value):
        target = _plain(self)[key] if not isinstance(key, tuple) or key != (Ellipsis,) else self
        size = numpy.size(target) * self.itemsize
        if isinstance(value, numpy.ndarray):
            _record("cupy", "copy (setitem)", size + _nbytes(_plain(value)), numpy.size(target))
        else:
            _record("cupy", "fill (setitem)", size)
        _plain(self)[key] = _plain(value)

    def _read_back(self):
        _record("d2h", "device -> host read (waits for the device)", self.nbytes)
        return _plain(self)

    def item(self, *args):
        return self._read_back().item(*args)

    def __float__(self):
        return float(self._read_back())

    def __int__(self):
        return int(self._read_back())

    def __bool__(self):
        return bool(self._read_back())

    def tolist(self):
        return self._read_back().tolist()


_VIEWS = {numpy.reshape, numpy.transpose, numpy.ravel, numpy.squeeze, numpy.expand_dims,
          numpy.broadcast_to, numpy.shape, numpy.ndim, numpy.size, numpy.result_type}


def _record_tensordot(args, kwargs, result):
    a, b = args[0], args[1]
    axes = kwargs.get("axes", args[2] if len(args) > 2 else 2)
    if isinstance(axes, int):
        axes_a, axes_b = list(range(a.ndim - axes, a.ndim)), list(range(axes))
    else:
        axes_a, axes_b = ([axes[0]] if isinstance(axes[0], int) else list(axes[0]),
                          [axes[1]] if isinstance(axes[1], int) else list(axes[1]))
    axes_a = [x % a.ndim for x in axes_a]
    axes_b = [x % b.ndim for x in axes_b]
    # CuPy lays each operand out as a matrix (kept axes, summed axes); one
    # that is neither C- nor F-contiguous that way is copied first
    for m, order in ((a, [i for i in range(a.ndim) if i not in axes_a] + axes_a),
                     (b, axes_b + [i for i in range(b.ndim) if i not in axes_b])):
        t = m.transpose(order)
        if not (t.flags.c_contiguous or t.flags.f_contiguous):
            _record("cupy", "copy (tensordot operand)", 2 * m.nbytes)
    k = int(numpy.prod([a.shape[i] for i in axes_a], dtype=numpy.int64))
    _record("gemm", "cuBLAS GEMM (tensordot)", _nbytes(a, b, result), 2 * result.size * k)


class FakeCupy(types.ModuleType):
    """``cupy`` as the package uses it, over NumPy, recording (see the module
    docstring). Array-making functions give TracedArrays."""

    ndarray = TracedArray

    def __init__(self):
        super().__init__("cupy (traced)")
        self.cuda = types.SimpleNamespace()

    def asarray(self, a, dtype=None, order=None):
        if isinstance(a, TracedArray):
            out = numpy.asarray(_plain(a), dtype=dtype, order=order)
            if not numpy.shares_memory(out, _plain(a)):
                _record("cupy", "astype" if dtype is not None and numpy.dtype(dtype) != a.dtype
                        else "copy", a.nbytes + out.nbytes, out.size)
            return _wrap(out)
        out = numpy.array(a, dtype=dtype, order=order or "K", copy=True)
        _record("h2d", "host -> device copy", out.nbytes)
        return _wrap(out)

    array = asarray

    def ascontiguousarray(self, a, dtype=None):
        return self.asarray(a, dtype=dtype, order="C")

    def asnumpy(self, a):
        return a._read_back().copy() if isinstance(a, TracedArray) else numpy.asarray(a)

    def empty(self, shape, dtype=numpy.float64, order="C"):
        return _wrap(numpy.zeros(shape, dtype, order))  # defined values: no NaN warnings

    def empty_like(self, a, dtype=None):
        return _wrap(numpy.zeros_like(_plain(a), dtype=dtype))

    def zeros(self, shape, dtype=numpy.float64, order="C"):
        out = numpy.zeros(shape, dtype, order)
        _record("memset", "memset (zeros)", out.nbytes)  # CuPy's zeros: cudaMemsetAsync
        return _wrap(out)

    def zeros_like(self, a, dtype=None):
        return self.zeros(numpy.shape(a), dtype or a.dtype)

    def tensordot(self, a, b, axes=2):
        result = numpy.tensordot(_plain(a), _plain(b), axes)
        _record_tensordot([_plain(a), _plain(b)], {"axes": axes}, result)
        return _wrap(result)

    def dot(self, a, b):
        result = numpy.dot(_plain(a), _plain(b))
        _record("gemm", "cuBLAS GEMM (dot)", _nbytes(_plain(a), _plain(b), result),
                _gemm_flops(_plain(a), _plain(b)))
        return _wrap(result)

    def __getattr__(self, name):
        value = getattr(numpy, name)
        if isinstance(value, numpy.ufunc) or not callable(value) or isinstance(value, type):
            return value  # ufuncs dispatch to TracedArray themselves; dtypes, constants
        if value in _VIEWS:
            return lambda *args, **kwargs: _wrap(value(*map(_plain, args), **kwargs))

        def traced(*args, **kwargs):
            plain = [_plain(a) for a in args]
            result = value(*plain, **{k: _plain(v) for k, v in kwargs.items()})
            if isinstance(result, numpy.ndarray):
                _record("cupy", name, _nbytes(*plain, result), result.size)
            return _wrap(result)
        return traced


_CONST_PARAM = re.compile(r"\bconst\b")
_KERNEL_PARAMS = re.compile(r'extern\s+"C"\s+__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?'
                            r"void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)")


def kernel_pointer_params(file):
    """{kernel: [True for each const pointer parameter, False for a written one,
    None for a scalar]} of ``kernels/<file>``."""
    source = emulator.kernel_dir().joinpath(file).read_text()
    source = re.sub(r"//[^\n]*|/\*.*?\*/", " ", source, flags=re.S)
    kinds = {}
    for name, params in _KERNEL_PARAMS.findall(source):
        kinds[name] = [(bool(_CONST_PARAM.search(p)) if "*" in p else None)
                       for p in params.split(",")]
    return kinds


_CONV_KERNELS = {"grouped_conv2d_fwd", "grouped_conv2d_bwd_data", "grouped_conv2d_bwd_weight"}


class TracingDevice(cuda_device.CupyDevice):
    """The CUDA device with ``launch`` recording the launch instead of running it."""

    name = "trace"

    def __init__(self):
        super().__init__()
        self._params = {}

    def launch(self, file, kernel, grid, block, args, shared_mem=0, defines=()):
        if file not in self._params:
            self._params[file] = kernel_pointer_params(file)
        kinds = self._params[file].get(kernel)
        if kinds is None or len(kinds) != len(args):
            raise ValueError(f"trace: {file}:{kernel} takes {len(kinds or [])} arguments, the "
                             f"launcher passed {len(args)}")
        arrays = [a for a, k in zip(args, kinds) if k is not None]
        written = [a for a, k in zip(args, kinds) if k is False]
        if kernel in _CONV_KERNELS:  # args: src, W, dst, n, c, h, w, k, p, q, groups, r, s, ...
            n, c, h, w, k, p, q, g, r, s = (int(v) for v in args[3:13])
            flops = 2 * n * k * p * q * (c // g) * r * s
        else:
            flops = sum(a.size for a in written)
        _record("kernel", kernel, _nbytes(*arrays), flops)

    def zero_fill(self, a):
        _record("memset", "memset", a.nbytes)
        _plain(a)[...] = 0


def to_gpu(a):
    """A host array as a traced device array (not recorded)."""
    return numpy.array(a).view(TracedArray)


@contextlib.contextmanager
def fake_gpu(record=True):
    """Inside, the package runs its GPU path on TracedArrays; yields the list
    of Launches recorded (with ``record``). Every block sees the same fake
    device, as a process sees its GPU: what a launcher makes once per device
    (the batch-norm counters) is made by the first block that needs it."""
    global _trace
    fake, dev = _FAKE, _DEVICE
    saved = (backend.cupy, cuda_device.cupy, cuda_device.CUPY_DEVICE, backend.gpu_available,
             _trace)
    backend.cupy, cuda_device.cupy, cuda_device.CUPY_DEVICE = fake, fake, dev
    backend.gpu_available = lambda: True
    _trace = [] if record else None
    try:
        with numpy.errstate(all="ignore"):  # values of unrun kernels are meaningless
            yield _trace
    finally:
        (backend.cupy, cuda_device.cupy, cuda_device.CUPY_DEVICE, backend.gpu_available,
         _trace) = saved


_FAKE, _DEVICE = FakeCupy(), TracingDevice()
