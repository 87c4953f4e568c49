"""Run the project's CUDA C kernels on the CPU, checked, so they can be tested without a GPU.

A ``kernels/*.cu`` file is translated (``emulator_source.translate``: pointers
become checked pointers, ``__shared__`` arrays checked views), compiled as C++
by g++ against ``kernels/emu/cuda_emu.h``, which provides threadIdx/blockIdx,
``__syncthreads``, warp shuffles, atomics and per-block shared memory, and
runs the threads of a block as cooperative fibers so that barriers mean what
they mean on the GPU. The built library is cached (keyed by a hash of
everything that went into it) and called through ctypes. ``EmuDevice`` gives
the launchers (``minitorch_gx.cuda.conv`` ...) the same interface as the CuPy
device in ``device.py``: the emulator is one more device, so the very same
launch code is what the tests exercise.

Every launch runs under a sanitizer, as compute-sanitizer would on a GPU; the
first violation stops it with an ``EmuError`` naming the kernel, block,
thread, array, element, extent and source line:
  memcheck   every access through a pointer argument inside the NumPy array
             passed (a view: inside the view), every shared index inside its
             declared dimension, dynamic shared memory inside ``shared_mem``;
  racecheck  shared memory: two threads touching one element, one writing,
             with no barrier both took part in between (``__syncthreads``, or
             a warp operation whose mask holds both); global memory: a thread
             reading or rewriting an element another thread of the launch
             wrote, unless a barrier of their block orders them; atomics exempt;
  initcheck  a read of shared memory, or of an ``EmuDevice.empty`` array, that
             nothing wrote (the shadow of an ``empty`` array lives from launch
             to launch; host code that fills one says so with
             ``mark_written``); ``EmuDevice.check_written`` fails if a
             launcher's output has elements no kernel wrote;
  synccheck  threads of a block waiting at different ``__syncthreads`` calls,
             warp operations whose lanes disagree on the mask, deadlocks.
``checks(...)`` (or ``MINITORCH_GX_EMU_CHECKS``: ``all``, the default, ``0``,
or a list such as ``memcheck,racecheck``) selects them; ``schedule(order)``
(or ``MINITORCH_GX_EMU_SCHEDULE``: ``forward``, ``reverse``, ``random[:SEED]``)
sets the order in which threads run between barriers, and blocks run, so that
tests can see what the trackers cannot: a race-free kernel without float
atomics gives bit-identical outputs under every order. A checked or
re-ordered launch runs its blocks on one OS thread.

    mod = emulator.build("sgd.cu")
    mod.launch("sgd_momentum_update", grid=(4,), block=(256,), args=[p, g, ..., numpy.int32(n)])

This file: the checks and the schedule (settings, context managers);
building and caching; launching (arguments, their Regions); arrays (guard
zones, initcheck shadows) and ``EmuDevice``. The source translation is in
``emulator_source.py``, the C++ side in ``kernels/emu/``.
"""
import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import os
import subprocess
import threading
import weakref
from pathlib import Path

import numpy

from .emulator_source import TranslationError, translate

__all__ = ["EmuError", "build", "prebuild", "build_source", "device", "kernel_dir", "translate",
           "Module", "EmuDevice", "CHECKS", "SCHEDULES", "checks", "schedule",
           "enabled_checks", "current_schedule"]


class EmuError(RuntimeError):
    """A kernel failed in the emulator (bad launch, a sanitizer report, deadlock...)."""


def kernel_dir():
    """The folder holding the .cu sources: the package's copy when installed,
    else ``kernels/`` beside the package in a source checkout."""
    package = Path(__file__).resolve().parent.parent  # minitorch_gx/
    candidates = (package / "kernels", package.parent / "kernels")
    for candidate in candidates:
        if (candidate / "emu" / "cuda_emu.h").is_file():
            return candidate
    raise FileNotFoundError("cannot find the CUDA kernel sources (looked in "
                            + " and ".join(str(c) for c in candidates) + ")")


def cache_dir():
    root = os.environ.get("MINITORCH_GX_CACHE") or Path.home() / ".cache" / "minitorch_gx"
    path = Path(root) / "cuda_emu"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------
# The checks and the schedule: environment defaults, context managers.
# --------------------------------------------------------------------------
CHECKS = ("memcheck", "racecheck", "initcheck", "synccheck")
_CHECK_BITS = {"memcheck": 1, "racecheck": 2, "initcheck": 4, "synccheck": 8}
SCHEDULES = ("forward", "reverse", "random")
_override = {"checks": None, "schedule": None}


def _parse_checks(spec, where):
    if spec is True or (isinstance(spec, str) and spec.strip().lower() in ("all", "1", "on")):
        return frozenset(CHECKS)
    if spec is False or spec is None or (isinstance(spec, str) and
                                         spec.strip().lower() in ("", "0", "off", "none")):
        return frozenset()
    names = [n.strip().lower() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"{where}: unknown check {unknown[0]!r}; the checks are "
                         f"{', '.join(CHECKS)} (or all / 0)")
    return frozenset(names)


def _parse_schedule(spec, where):
    order, _, seed = str(spec).strip().lower().partition(":")
    if order not in SCHEDULES or (seed and not seed.isdigit()):
        raise ValueError(f"{where}: schedule must be forward, reverse or random[:SEED], "
                         f"got {spec!r}")
    return order, int(seed or 0)


def enabled_checks():
    """The checks launches run now (a frozenset of names from CHECKS)."""
    if _override["checks"] is not None:
        return _override["checks"]
    return _parse_checks(os.environ.get("MINITORCH_GX_EMU_CHECKS", "all"),
                         "MINITORCH_GX_EMU_CHECKS")


def current_schedule():
    """(order, seed) of launches now: order is one of SCHEDULES."""
    if _override["schedule"] is not None:
        return _override["schedule"]
    return _parse_schedule(os.environ.get("MINITORCH_GX_EMU_SCHEDULE", "forward"),
                           "MINITORCH_GX_EMU_SCHEDULE")


@contextlib.contextmanager
def checks(*names):
    """Inside the block launches run these checks: ``checks()`` or
    ``checks(False)`` none, ``checks("all")``, ``checks("memcheck", "initcheck")``."""
    spec = names[0] if len(names) == 1 and isinstance(names[0], bool) else \
        (",".join(names) if names else False)
    saved, _override["checks"] = _override["checks"], _parse_checks(spec, "checks()")
    try:
        yield
    finally:
        _override["checks"] = saved


@contextlib.contextmanager
def schedule(order, seed=0):
    """Inside the block threads between barriers (and blocks) run in this
    order: "forward" (index order), "reverse", or "random" (seeded)."""
    saved, _override["schedule"] = _override["schedule"], _parse_schedule(order, "schedule()")
    _override["schedule"] = (_override["schedule"][0], int(seed))
    try:
        yield
    finally:
        _override["schedule"] = saved


# --------------------------------------------------------------------------
# Building and caching: the runtime (cuda_emu_runtime.cpp and the sanitizer,
# cuda_emu_sanitizer.cpp) is compiled once into object files; each .cu becomes
# a .so linked with them. All are cached under a hash of what went into them.
# --------------------------------------------------------------------------
CXX = os.environ.get("CXX", "g++")
CXXFLAGS = ["-std=c++17", "-O2", "-fPIC", "-pthread", "-fvisibility=hidden",
            "-Wno-unknown-pragmas"]
_RUNTIME_SOURCES = ("cuda_emu_runtime.cpp", "cuda_emu_sanitizer.cpp")
_HEADERS = ("cuda_emu.h", "cuda_emu_checked.h", "cuda_emu_internal.h")


@functools.lru_cache(maxsize=None)
def _compiler_version():
    try:
        out = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise EmuError(f"the CUDA emulator needs a C++ compiler ({CXX!r} failed: {e}); "
                       f"install g++ or set CXX") from e
    return out.stdout.splitlines()[0]


def compiler_available():
    try:
        _compiler_version()
        return True
    except EmuError:
        return False


def _hash(*parts):
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def _compile(cmd, target, what):
    """Run a compiler command writing to a temporary name, then move it into place
    (atomic: concurrent builders never see half a file)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    result = subprocess.run(cmd + ["-o", str(tmp)], capture_output=True, text=True)
    if result.returncode != 0:
        raise EmuError(f"compiling {what} for the emulator failed:\n{result.stderr}")
    os.replace(tmp, target)


@functools.lru_cache(maxsize=None)
def _runtime_objects():
    emu = kernel_dir() / "emu"
    texts = [(emu / f).read_text() for f in _RUNTIME_SOURCES + _HEADERS]
    key = _hash(*texts, " ".join(CXXFLAGS), _compiler_version())
    objects = []
    for source in _RUNTIME_SOURCES:
        obj = cache_dir() / f"{Path(source).stem}-{key}.o"
        if not obj.exists():
            _compile([CXX, *CXXFLAGS, "-c", str(emu / source), "-I", str(emu)], obj, source)
        objects.append(obj)
    return tuple(objects)


@functools.lru_cache(maxsize=None)
def build(file, defines=()):
    """Compile ``kernels/<file>`` (or a path) for the emulator; memoized per process.

    ``defines`` is a tuple of ("NAME", value) pairs passed as -DNAME=value,
    the same ones the CuPy launcher passes to NVRTC.
    """
    path = Path(file) if os.path.isabs(str(file)) else kernel_dir() / file
    return build_source(path.read_text(), path.name, defines)


def prebuild(specs, jobs=None):
    """Build several (file, defines) at once, one g++ process per core; later
    ``build`` calls find them in the cache."""
    _runtime_objects()
    specs = list(dict.fromkeys((f, tuple(d)) for f, d in specs))
    with concurrent.futures.ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        list(pool.map(lambda spec: build(*spec), specs))


def build_source(source, filename="<kernel>.cu", defines=()):
    """Compile CUDA C source text for the emulator (for tests of the emulator itself)."""
    emu = kernel_dir() / "emu"
    header = emu / "cuda_emu.h"
    runtime = _runtime_objects()
    try:
        text, kernels = translate(source, filename)
    except TranslationError as e:
        raise EmuError(str(e)) from None
    flags = CXXFLAGS + [f"-D{k}={v}" for k, v in defines]
    key = _hash(text, *((emu / h).read_text() for h in _HEADERS), *(o.name for o in runtime),
                " ".join(flags), _compiler_version())
    so = cache_dir() / f"{Path(filename).stem}-{key}.so"
    if not so.exists():
        cpp = so.with_suffix(".cpp")
        cpp.write_text(text)
        _compile([CXX, *flags, "-shared", "-include", str(header), str(cpp),
                  *map(str, runtime)], so, filename)
    return Module(so, list(kernels), filename)


# --------------------------------------------------------------------------
# Launching.
# --------------------------------------------------------------------------
_NUMPY_CODE = {numpy.dtype(numpy.float32): "f", numpy.dtype(numpy.float64): "d",
               numpy.dtype(numpy.int32): "i", numpy.dtype(numpy.uint32): "I",
               numpy.dtype(numpy.int64): "q", numpy.dtype(numpy.uint64): "Q",
               numpy.dtype(numpy.int8): "b", numpy.dtype(numpy.uint8): "B",
               numpy.dtype(numpy.bool_): "o"}
_CTYPE = {"f": ctypes.c_float, "d": ctypes.c_double, "i": ctypes.c_int32, "I": ctypes.c_uint32,
          "q": ctypes.c_int64, "Q": ctypes.c_uint64, "b": ctypes.c_int8, "B": ctypes.c_uint8,
          "o": ctypes.c_bool}


class _ArgInfo(ctypes.Structure):  # emu::ArgInfo in cuda_emu.h
    _fields_ = [("bytes", ctypes.c_uint64), ("itemsize", ctypes.c_uint64),
                ("init", ctypes.c_void_p), ("name", ctypes.c_char_p), ("type", ctypes.c_char_p),
                ("same_as", ctypes.c_int), ("pad", ctypes.c_int)]


class _Options(ctypes.Structure):  # emu::Options in cuda_emu.h
    _fields_ = [("workers", ctypes.c_int), ("checks", ctypes.c_uint), ("schedule", ctypes.c_int),
                ("pad", ctypes.c_int), ("seed", ctypes.c_uint64), ("kernel", ctypes.c_char_p),
                ("file", ctypes.c_char_p)]


def _default_workers():
    return int(os.environ.get("MINITORCH_GX_EMU_WORKERS", min(2, os.cpu_count() or 1)))


class Module:
    """A built .cu file: ``launch(name, grid, block, args, shared_mem=0)``."""

    def __init__(self, so_path, names, filename="<kernel>.cu"):
        self.path = so_path
        self.filename = filename
        self.lib = ctypes.CDLL(str(so_path))
        self.kernels = {}
        for name in names:
            sig = getattr(self.lib, f"emu_signature_{name}")
            params = getattr(self.lib, f"emu_parameters_{name}")
            sig.restype = params.restype = ctypes.c_char_p
            fn = getattr(self.lib, f"emu_launch_{name}")
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.c_ulonglong, ctypes.c_ulonglong,
                           ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(_ArgInfo),
                           ctypes.POINTER(_Options), ctypes.c_char_p, ctypes.c_int]
            codes = [c for c in sig().decode().rstrip(",").split(",") if c]
            self.kernels[name] = (fn, codes, params().decode().split(","))

    def signature(self, name):
        """The kernel's parameter types, e.g. ['pf', 'pf', 'i', 'f'] (p = pointer to)."""
        return list(self._kernel(name)[1])

    def parameters(self, name):
        """The kernel's parameter names, as in its source."""
        return list(self._kernel(name)[2])

    def _kernel(self, name):
        if name not in self.kernels:
            raise EmuError(f"no kernel {name!r} in {self.path.name}; it has {sorted(self.kernels)}")
        return self.kernels[name]

    def launch(self, name, grid, block, args, shared_mem=0, workers=None, stack_bytes=None,
               checks=None, schedule=None, seed=None):
        """Run kernel ``name``. checks: names from CHECKS (default: ``enabled_checks()``);
        schedule, seed: as ``emulator.schedule`` (default: ``current_schedule()``)."""
        fn, codes, params = self._kernel(name)
        if len(args) != len(codes):
            raise EmuError(f"{name} takes {len(codes)} arguments, {len(args)} were given")
        enabled = enabled_checks() if checks is None else _parse_checks(checks, "checks=")
        order, default_seed = current_schedule() if schedule is None else \
            _parse_schedule(schedule, "schedule=")
        keep, pointers = [], (ctypes.c_void_p * max(1, len(args)))()
        info = (_ArgInfo * max(1, len(args)))()
        for i, (a, code) in enumerate(zip(args, codes)):
            value = _marshal(name, i, a, code)
            keep.append(value)
            pointers[i] = ctypes.addressof(value)
            if code.startswith("p"):
                _describe_array(info, i, a, args, params[i], name, "initcheck" in enabled)
        options = _Options(workers=_default_workers() if workers is None else workers,
                           checks=sum(_CHECK_BITS[c] for c in enabled),
                           schedule=SCHEDULES.index(order),
                           seed=default_seed if seed is None else int(seed),
                           kernel=name.encode(), file=self.filename.encode())
        dims = (ctypes.c_uint * 6)(*_dim3(grid), *_dim3(block))
        err = ctypes.create_string_buffer(2048)
        stack = stack_bytes or int(os.environ.get("MINITORCH_GX_EMU_STACK", 64 * 1024))
        failed = fn(dims, int(shared_mem), stack, pointers, info, ctypes.byref(options), err,
                    len(err))
        if "initcheck" not in enabled:  # writes went unrecorded: count the arrays as written
            for a in args:
                if isinstance(a, numpy.ndarray):
                    _forget_shadow(a)
        if failed:
            raise EmuError(f"{name}<<<{tuple(_dim3(grid))}, {tuple(_dim3(block))}>>>: "
                           f"{err.value.decode()}")
        for i, a in enumerate(args):
            if isinstance(a, numpy.ndarray):
                _check_guards(name, i, a)


def _dim3(d):
    d = (d,) if isinstance(d, int) else tuple(d)
    return tuple(int(v) for v in d) + (1,) * (3 - len(d))


def _marshal(kernel, i, a, code):
    where = f"{kernel} argument {i}"
    if code.startswith("p"):
        if not isinstance(a, numpy.ndarray):
            raise EmuError(f"{where} is a pointer; pass a NumPy array, not {type(a).__name__}")
        if not a.flags.c_contiguous:
            raise EmuError(f"{where}: arrays must be C-contiguous")
        have = _NUMPY_CODE.get(a.dtype, "?")
        if code[1:] != have:
            raise EmuError(f"{where}: the kernel takes a pointer to '{code[1:]}', "
                           f"the array has dtype {a.dtype}")
        return ctypes.c_void_p(a.ctypes.data)
    if not isinstance(a, numpy.generic):
        raise EmuError(f"{where}: pass scalars as NumPy scalars (numpy.int32(...), "
                       f"numpy.float32(...)) so the C type is explicit, not {type(a).__name__}")
    have = _NUMPY_CODE.get(a.dtype, "?")
    if have != code:
        raise EmuError(f"{where}: the kernel takes '{code}', got a {a.dtype} scalar")
    return _CTYPE[code](a.item())


def _describe_array(info, i, a, args, param, kernel, initcheck):
    """Fill info[i] for pointer argument a: its extent, name and initcheck shadow."""
    info[i].bytes, info[i].itemsize = a.nbytes, a.itemsize
    info[i].name, info[i].type = param.encode(), str(a.dtype).encode()  # ctypes keeps them
    info[i].same_as = next((j for j, b in enumerate(args[:i]) if isinstance(b, numpy.ndarray)
                            and b.ctypes.data == a.ctypes.data and b.nbytes == a.nbytes), -1)
    shadow, offset = _shadow_of(a)
    if shadow is not None:
        shadow.launches[(kernel, param)] = None
        if initcheck:
            info[i].init = shadow.written.ctypes.data + offset


# --------------------------------------------------------------------------
# Arrays with guard zones, so that out-of-bounds writes are caught even with
# the checks off, and with initcheck shadows.
# --------------------------------------------------------------------------
GUARD = 4096  # bytes of 0xFF before and after every array the emulator allocates
_guarded = weakref.WeakValueDictionary()  # id(buffer) -> buffer


def _root(a):
    while isinstance(a.base, numpy.ndarray):
        a = a.base
    return a


def _check_guards(kernel, i, a):
    root = _root(a)
    if _guarded.get(id(root)) is not root:
        return
    if not (root[:GUARD] == 0xFF).all() or not (root[-GUARD:] == 0xFF).all():
        root[:GUARD] = 0xFF
        root[-GUARD:] = 0xFF
        raise EmuError(f"{kernel} wrote outside the bounds of argument {i} (shape {a.shape})")


class _Shadow:
    """Which bytes of an ``EmuDevice.empty`` buffer have been written, by the
    kernels (through ArgInfo.init) or by host code that said so (mark_written)."""

    def __init__(self, start, nbytes):
        self.start = start                        # address of the buffer's first byte
        self.written = numpy.zeros(nbytes, numpy.uint8)
        self.launches = {}                        # (kernel, parameter) that took it, in order


_shadows = {}  # id(guarded buffer) -> _Shadow, while the buffer lives


def _shadow_of(a):
    """(the _Shadow of the empty() buffer a views, a's byte offset in it), or (None, 0)."""
    root = _root(a)
    shadow = _shadows.get(id(root))
    if shadow is None or _guarded.get(id(root)) is not root:
        return None, 0
    return shadow, a.ctypes.data - shadow.start


def _shadow_bytes(shadow, offset, a):
    """The shadow bytes of view a, shaped a.shape + (itemsize,) (any strides)."""
    return numpy.lib.stride_tricks.as_strided(shadow.written[offset:],
                                              a.shape + (a.itemsize,), a.strides + (1,))


def _forget_shadow(a):
    """From now on every byte of a's buffer counts as written."""
    _shadows.pop(id(_root(a)), None)


class EmuDevice:
    """The launchers' view of the emulator: NumPy arrays, kernels run on the CPU.

    Host code that fills an ``empty()`` array itself (instead of a kernel)
    says so with ``mark_written``, or initcheck reports the kernel that reads
    it; ``zeros()`` and ``input()`` arrays are written from the start, and so
    is every array the emulator did not allocate."""

    xp = numpy
    name = "emulator"

    def empty(self, shape, dtype):
        """A new array whose unwritten elements read as NaN (0xFF bytes), with
        guard zones and an initcheck shadow: nothing written yet."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        dtype = numpy.dtype(dtype)
        nbytes = int(numpy.prod(shape, dtype=numpy.int64)) * dtype.itemsize
        buf = numpy.full(nbytes + 2 * GUARD, 0xFF, dtype=numpy.uint8)
        _guarded[id(buf)] = buf
        _shadows[id(buf)] = _Shadow(buf.ctypes.data + GUARD, nbytes)
        weakref.finalize(buf, _shadows.pop, id(buf), None)
        return buf[GUARD:GUARD + nbytes].view(dtype).reshape(shape)

    def zeros(self, shape, dtype):
        a = self.empty(shape, dtype)
        a[...] = 0
        _forget_shadow(a)
        return a

    def zero_fill(self, a):
        """a[...] = 0 (a GPU's memset), and written from now on."""
        a[...] = 0
        self.mark_written(a)

    def input(self, a, dtype):
        """A guarded, contiguous copy of ``a`` as ``dtype``."""
        a = numpy.asarray(a)
        out = self.empty(a.shape, dtype)
        out[...] = a
        _forget_shadow(out)
        return out

    def mark_written(self, *arrays):
        """Host code wrote these (views of) ``empty()`` arrays."""
        for a in arrays:
            shadow, offset = _shadow_of(a)
            if shadow is not None:
                _shadow_bytes(shadow, offset, a)[...] = 1

    def check_written(self, *arrays):
        """initcheck for a launcher's outputs: every element of each ``empty()``
        array was written by the launches that should fill it."""
        if "initcheck" not in enabled_checks():
            return
        for a in arrays:
            shadow, offset = _shadow_of(a)
            if shadow is None or a.size == 0:
                continue
            done = _shadow_bytes(shadow, offset, a).all(-1)
            if done.all():
                continue
            missing = numpy.flatnonzero(~done)
            first = ", ".join(str(int(i)) for i in numpy.unravel_index(missing[0], a.shape))
            counts = f"{missing.size} of the {a.size} elements"
            if not shadow.launches:
                raise EmuError(f"initcheck: no kernel wrote {counts} of this {a.shape} {a.dtype} "
                               f"array from EmuDevice.empty (no launch took it); the first is "
                               f"[{first}] (flat index {missing[0]})")
            took = ", ".join(f"{k} (parameter {p})" for k, p in shadow.launches)
            param = list(shadow.launches)[-1][1]
            raise EmuError(f"initcheck: {took} left {counts} of {param} {a.shape} {a.dtype} "
                           f"unwritten; the first is {param}[{first}] (flat index {missing[0]})")

    def launch(self, file, kernel, grid, block, args, shared_mem=0, defines=()):
        build(file, tuple(defines)).launch(kernel, grid, block, args, shared_mem)


_DEVICE = EmuDevice()


def device():
    return _DEVICE
