"""Run the project's CUDA C kernels on the CPU, so they can be tested without a GPU.

A ``kernels/*.cu`` file is compiled as C++ by g++ against ``kernels/emu/cuda_emu.h``,
which provides threadIdx/blockIdx, ``__syncthreads``, warp shuffles, atomics
and per-block shared memory, and runs the threads of a block as cooperative
fibers so that barriers mean what they mean on the GPU. The built library is
cached (keyed by a hash of everything that went into it) and called through
ctypes. ``EmuDevice`` gives the launchers (``minitorch_gx.cuda.conv`` ...) the
same interface as the CuPy device in ``device.py``: the emulator is one more
device, so the very same launch code is what the tests exercise.

    mod = emulator.build("sgd.cu")
    mod.launch("sgd_momentum_update", grid=(4,), block=(256,), args=[p, g, ..., numpy.int32(n)])
"""
import concurrent.futures
import ctypes
import functools
import hashlib
import os
import re
import subprocess
import threading
import weakref
from pathlib import Path

import numpy

__all__ = ["EmuError", "build", "prebuild", "build_source", "device", "kernel_dir", "translate",
           "Module", "EmuDevice"]


class EmuError(RuntimeError):
    """A kernel failed in the emulator (bad launch, deadlock, out-of-bounds write...)."""


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
# Source translation: __shared__ declarations become per-block storage, and
# every kernel gets a C entry point for ctypes.
# --------------------------------------------------------------------------
_BOUNDS = r"(?:__launch_bounds__\s*\([^)]*\)\s*)?"
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+' + _BOUNDS + r"void\s+" + _BOUNDS +
                     r"(\w+)\s*\(")
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?"
                            r"([A-Za-z_][\w\s]*?)\s+(\w+)\s*\[\s*\]\s*;")
_SHARED = re.compile(r"__shared__\s+(?:__align__\(\d+\)\s+)?([A-Za-z_][\w\s]*?)\s+(\w+)\s*"
                     r"((?:\[[^\]\n]+\])*)\s*;")
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_VISIBLE = '__attribute__((visibility("default")))'  # everything else is hidden


def _blank_comments(source):
    """Comments replaced by spaces (newlines kept), so regexes skip them and line numbers hold."""
    return _COMMENT.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), source)


def translate(source, filename="<kernel>"):
    """Return (C++ text, kernel names) for a .cu source."""
    code = _blank_comments(source)
    counter = iter(range(1 << 20))
    code = _EXTERN_SHARED.sub(
        lambda m: f"{m.group(1)}* {m.group(2)} = emu::dynamic_shared<{m.group(1)}>();", code)
    code = _SHARED.sub(
        lambda m: (f"auto& {m.group(2)} = "
                   f"emu::shared_var<{m.group(1)}{m.group(3)}>({next(counter)});"),
        code)
    if "__shared__" in code:
        line = code[:code.index("__shared__")].count("\n") + 1
        raise EmuError(f"{filename}:{line}: a __shared__ declaration the emulator cannot rewrite "
                       f"(write one variable per declaration: `__shared__ float a[N][M];`)")
    names = _KERNEL.findall(code)
    if not names:
        raise EmuError(f"{filename}: no `extern \"C\" __global__ void` kernel found")
    wrappers = ["", "// ---- emulator entry points (generated) ----"]
    for name in names:
        wrappers.append(
            f'extern "C" {_VISIBLE} int emu_launch_{name}(const unsigned* dims, '
            f'unsigned long long smem, unsigned long long stack, void** args, int workers, '
            f'char* err, int errlen) '
            f'{{ return emu::launch(&{name}, dims, smem, stack, args, workers, err, errlen); }}')
        wrappers.append(f'extern "C" {_VISIBLE} const char* emu_signature_{name}() '
                        f'{{ return emu::signature(&{name}); }}')
    text = f'#line 1 "{filename}"\n' + code + "\n".join(wrappers) + "\n"
    return text, names


# --------------------------------------------------------------------------
# Building and caching: the runtime (cuda_emu_runtime.cpp) is compiled once
# into an object file; each .cu becomes a .so linked with it. Both are cached
# under a hash of everything that went into them.
# --------------------------------------------------------------------------
CXX = os.environ.get("CXX", "g++")
CXXFLAGS = ["-std=c++17", "-O2", "-fPIC", "-pthread", "-fvisibility=hidden",
            "-Wno-unknown-pragmas"]


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
def _runtime_object():
    emu = kernel_dir() / "emu"
    source = emu / "cuda_emu_runtime.cpp"
    key = _hash(source.read_text(), (emu / "cuda_emu.h").read_text(), " ".join(CXXFLAGS),
                _compiler_version())
    obj = cache_dir() / f"cuda_emu_runtime-{key}.o"
    if not obj.exists():
        _compile([CXX, *CXXFLAGS, "-c", str(source), "-I", str(emu)], obj, source.name)
    return obj


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
    _runtime_object()
    specs = list(dict.fromkeys((f, tuple(d)) for f, d in specs))
    with concurrent.futures.ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        list(pool.map(lambda spec: build(*spec), specs))


def build_source(source, filename="<kernel>.cu", defines=()):
    """Compile CUDA C source text for the emulator (for tests of the emulator itself)."""
    header = kernel_dir() / "emu" / "cuda_emu.h"
    runtime = _runtime_object()
    text, names = translate(source, filename)
    flags = CXXFLAGS + [f"-D{k}={v}" for k, v in defines]
    key = _hash(text, header.read_text(), runtime.name, " ".join(flags), _compiler_version())
    so = cache_dir() / f"{Path(filename).stem}-{key}.so"
    if not so.exists():
        cpp = so.with_suffix(".cpp")
        cpp.write_text(text)
        _compile([CXX, *flags, "-shared", "-include", str(header), str(cpp), str(runtime)], so,
                 filename)
    return Module(so, names)


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


def _default_workers():
    return int(os.environ.get("MINITORCH_GX_EMU_WORKERS", min(2, os.cpu_count() or 1)))


class Module:
    """A built .cu file: ``launch(name, grid, block, args, shared_mem=0)``."""

    def __init__(self, so_path, names):
        self.path = so_path
        self.lib = ctypes.CDLL(str(so_path))
        self.kernels = {}
        for name in names:
            sig = getattr(self.lib, f"emu_signature_{name}")
            sig.restype = ctypes.c_char_p
            fn = getattr(self.lib, f"emu_launch_{name}")
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.c_ulonglong, ctypes.c_ulonglong,
                           ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_int]
            codes = sig().decode().rstrip(",").split(",")
            self.kernels[name] = (fn, [c for c in codes if c])

    def signature(self, name):
        """The kernel's parameter types, e.g. ['pf', 'pf', 'i', 'f'] (p = pointer to)."""
        return list(self._kernel(name)[1])

    def _kernel(self, name):
        if name not in self.kernels:
            raise EmuError(f"no kernel {name!r} in {self.path.name}; it has {sorted(self.kernels)}")
        return self.kernels[name]

    def launch(self, name, grid, block, args, shared_mem=0, workers=None, stack_bytes=None):
        fn, codes = self._kernel(name)
        if len(args) != len(codes):
            raise EmuError(f"{name} takes {len(codes)} arguments, {len(args)} were given")
        keep, pointers = [], (ctypes.c_void_p * max(1, len(args)))()
        for i, (a, code) in enumerate(zip(args, codes)):
            value = _marshal(name, i, a, code)
            keep.append(value)
            pointers[i] = ctypes.addressof(value)
        dims = (ctypes.c_uint * 6)(*_dim3(grid), *_dim3(block))
        err = ctypes.create_string_buffer(1024)
        workers = _default_workers() if workers is None else workers
        stack = stack_bytes or int(os.environ.get("MINITORCH_GX_EMU_STACK", 64 * 1024))
        if fn(dims, int(shared_mem), stack, pointers, workers, err, len(err)):
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


# --------------------------------------------------------------------------
# Arrays with guard zones, so that out-of-bounds writes are caught.
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


class EmuDevice:
    """The launchers' view of the emulator: NumPy arrays, kernels run on the CPU."""

    xp = numpy
    name = "emulator"

    def empty(self, shape, dtype):
        """A new array whose unwritten elements read as NaN (0xFF bytes), with guard zones."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        dtype = numpy.dtype(dtype)
        nbytes = int(numpy.prod(shape, dtype=numpy.int64)) * dtype.itemsize
        buf = numpy.full(nbytes + 2 * GUARD, 0xFF, dtype=numpy.uint8)
        _guarded[id(buf)] = buf
        return buf[GUARD:GUARD + nbytes].view(dtype).reshape(shape)

    def zeros(self, shape, dtype):
        a = self.empty(shape, dtype)
        a[...] = 0
        return a

    def input(self, a, dtype):
        """A guarded, contiguous copy of ``a`` as ``dtype``."""
        a = numpy.asarray(a)
        out = self.empty(a.shape, dtype)
        out[...] = a
        return out

    def launch(self, file, kernel, grid, block, args, shared_mem=0, defines=()):
        build(file, tuple(defines)).launch(kernel, grid, block, args, shared_mem)


_DEVICE = EmuDevice()


def device():
    return _DEVICE
