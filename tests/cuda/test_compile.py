"""Every kernels/*.cu compiles for the GPUs we target (sm_80 and sm_90), no GPU needed,
and its header names launchers, ops and tests that exist.

Two independent compilers:
  - NVRTC, the runtime compiler CuPy's RawModule uses, with exactly the
    launchers' options and defines (float32 and float64), to a cubin, so ptxas
    checks registers and shared memory too. Through CuPy's binding when CuPy
    imports, else straight from libnvrtc (the nvidia-cuda-nvrtc wheel, or a
    CUDA toolkit), loaded with ctypes.
  - nvcc (-Werror all-warnings, to PTX), where installed.
Both skip, saying why, when their compiler is missing.
"""
import concurrent.futures
import ctypes
import ctypes.util
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from minitorch_gx.cuda import device as cuda_device
from minitorch_gx.cuda import emulator
from minitorch_gx.backend import cupy

ARCHS = ["sm_80", "sm_90"]
KERNEL_DIR = emulator.kernel_dir()
FILES = sorted(cuda_device.KERNEL_FILES)


def test_every_kernel_file_is_known_to_the_launchers():
    on_disk = sorted(p.name for p in KERNEL_DIR.glob("*.cu"))
    assert on_disk == FILES, "kernels/*.cu and minitorch_gx/cuda/device.py KERNEL_FILES must list the same files"


# --------------------------------------------------------------------------
# NVRTC
# --------------------------------------------------------------------------
def _nvrtc_library_candidates():
    if os.environ.get("NVRTC_LIBRARY"):
        yield os.environ["NVRTC_LIBRARY"]
    for site in map(Path, sys.path):
        # nvidia-cuda-nvrtc wheels: nvidia/cu13/lib (CUDA 13), nvidia/cuda_nvrtc/lib (12)
        for pattern in ("nvidia/cu*/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*"):
            yield from sorted(glob.glob(str(site / pattern)), reverse=True)
    for root in filter(None, [os.environ.get("CUDA_PATH"), "/usr/local/cuda"]):
        yield from sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")), reverse=True)
    found = ctypes.util.find_library("nvrtc")
    if found:
        yield found


class CtypesNvrtc:
    """The few NVRTC calls needed to compile one source, through ctypes."""

    def __init__(self):
        for path in _nvrtc_library_candidates():
            if "builtins" in path or "alt" in Path(path).name:
                continue
            try:
                # libnvrtc opens its builtins library by name at compile time:
                # load the one beside it first so that the name resolves.
                for builtins in sorted(Path(path).parent.glob("libnvrtc-builtins.so.*")):
                    if ".alt." not in builtins.name:
                        ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
                        break
                self.lib = ctypes.CDLL(path)
                self.path = path
                break
            except OSError:
                continue
        else:
            raise OSError("libnvrtc not found (pip install nvidia-cuda-nvrtc, or set "
                          "NVRTC_LIBRARY)")

    def _check(self, status, prog=None, what=""):
        if status != 0:
            self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            msg = self.lib.nvrtcGetErrorString(status).decode()
            raise RuntimeError(f"NVRTC {what}: {msg}\n{self._log(prog) if prog else ''}")

    def _log(self, prog):
        size = ctypes.c_size_t()
        self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        self.lib.nvrtcGetProgramLog(prog, buf)
        return buf.value.decode(errors="replace")

    def _get(self, prog, what):
        size = ctypes.c_size_t()
        self._check(getattr(self.lib, f"nvrtcGet{what}Size")(prog, ctypes.byref(size)), prog, what)
        buf = ctypes.create_string_buffer(size.value)
        self._check(getattr(self.lib, f"nvrtcGet{what}")(prog, buf), prog, what)
        return buf.raw

    def compile(self, source, name, options):
        """-> (cubin bytes, PTX text, log)"""
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(),
                                                0, None, None), what="create")
        try:
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            self._check(self.lib.nvrtcCompileProgram(prog, len(options), opts), prog, "compile")
            ptx = self._get(prog, "PTX").rstrip(b"\0").decode()
            return self._get(prog, "CUBIN"), ptx, self._log(prog)
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


class CupyNvrtc:
    """CuPy's own NVRTC binding (what RawModule compiles with)."""

    def __init__(self):
        self.nvrtc = cupy.cuda.nvrtc
        self.nvrtc.getVersion()  # raises if the library cannot be loaded
        self.path = "cupy.cuda.nvrtc"

    def compile(self, source, name, options):
        prog = self.nvrtc.createProgram(source, name, [], [])
        try:
            try:
                self.nvrtc.compileProgram(prog, list(options))
            except self.nvrtc.NVRTCError as e:
                raise RuntimeError(f"NVRTC compile: {e}\n{self.nvrtc.getProgramLog(prog)}") from e
            ptx = self.nvrtc.getPTX(prog)
            ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
            return self.nvrtc.getCUBIN(prog), ptx, self.nvrtc.getProgramLog(prog)
        finally:
            self.nvrtc.destroyProgram(prog)


def _find_nvrtc():
    errors = []
    for impl in ((CupyNvrtc,) if cupy is not None else ()) + (CtypesNvrtc,):
        try:
            return impl()
        except Exception as e:  # noqa: BLE001 - any failure means "not this one"
            errors.append(f"{impl.__name__}: {e}")
    pytest.skip("no NVRTC: " + "; ".join(errors))


@pytest.fixture(scope="module")
def nvrtc():
    return _find_nvrtc()


def _nvrtc_options(file, dtype, arch):
    defines = dict(cuda_device.builds(dtype))[file]
    return list(cuda_device.NVRTC_OPTIONS) + [f"-D{k}={v}" for k, v in defines] + \
        [f"--gpu-architecture={arch}"]


@pytest.mark.parametrize("file", FILES)
def test_nvrtc_compiles_for_sm80_and_sm90(nvrtc, file):
    """A cubin for each architecture (float64 for the newest only, to save time);
    its kernels are exactly those the emulator finds in the source."""
    source = (KERNEL_DIR / file).read_text()
    _, emulated = emulator.translate(source, file)

    def compile_one(job):
        dtype, arch = job
        cubin, ptx, log = nvrtc.compile(source, file, _nvrtc_options(file, dtype, arch))
        where = f"{file} ({arch}, {dtype.__name__})"
        assert cubin[:4] == b"\x7fELF", f"{where}: NVRTC did not return a cubin"
        assert "warning" not in log.lower(), f"{where}: {log}"
        assert set(re.findall(r"\.entry\s+(\w+)", ptx)) == set(emulated), where

    jobs = [(numpy.float32, "sm_80"), (numpy.float32, "sm_90"), (numpy.float64, "sm_90")]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(compile_one, jobs))


# The conv launchers' other register tiles (4-channel groups: ResNeXt's layer1),
# compiled beside the default builds above.
TILE_VARIANTS = [("grouped_conv.cu", ("CONV_TM", 4)), ("grouped_conv_bwd_weight.cu", ("WGRAD_TK", 4))]


@pytest.mark.parametrize("file,variant", TILE_VARIANTS)
def test_nvrtc_compiles_the_conv_launchers_other_tiles(nvrtc, file, variant):
    source = (KERNEL_DIR / file).read_text()
    options = _nvrtc_options(file, numpy.float32, "sm_90") + [f"-D{variant[0]}={variant[1]}"]
    cubin, _, log = nvrtc.compile(source, file, options)
    assert cubin[:4] == b"\x7fELF" and "warning" not in log.lower(), log


# --------------------------------------------------------------------------
# nvcc
# --------------------------------------------------------------------------
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc"
                                if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_nvcc_compiles_every_file_without_warnings(tmp_path):
    # PTX only: a second C++ front end with every warning an error; ptxas has
    # already checked both architectures through NVRTC above, and a full
    # nvcc build of both costs ~4 s per file on a 2-core machine.
    def compile_one(file):
        defines = dict(cuda_device.builds(numpy.float32))[file]
        cmd = [NVCC, "-std=c++17", "-ptx", "-arch=sm_80", "-Werror", "all-warnings",
               *[f"-D{k}={v}" for k, v in defines], str(KERNEL_DIR / file),
               "-o", str(tmp_path / f"{file}.ptx")]
        return file, subprocess.run(cmd, capture_output=True, text=True)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(compile_one, FILES))
    for file, result in results:
        assert result.returncode == 0, f"nvcc failed on {file}:\n{result.stderr}"
        entries = set(re.findall(r"\.entry\s+(\w+)", (tmp_path / f"{file}.ptx").read_text()))
        assert entries == set(emulator.translate((KERNEL_DIR / file).read_text(), file)[1])


# --------------------------------------------------------------------------
# Headers: each .cu file's opening comment names its launchers, the ops that
# call them and the tests that check them; those must exist.
# --------------------------------------------------------------------------
REPO = KERNEL_DIR.parent
PACKAGE = REPO / "minitorch_gx"
# a Python file named in a header, then the names it defines: "ops/conv.py
# conv2d_forward_reference / conv2d_backward_data_reference", "optim/sgd.py SGD.step"
_NAMED = re.compile(r"(?<![\w/])((?:minitorch_gx/)?(?:cuda|ops|optim|nn)/\w+\.py|resnext/\w+\.py)"
                    r"(?:\s+([A-Za-z_][\w.*]*(?:\s*(?:/|\band\b)\s*[A-Za-z_][\w.*]*)*))?")
_TESTS = re.compile(r"\btests/[\w/]+\.py")


def _header(file):
    """The comment lines before the first preprocessor line, joined into one text."""
    lines = []
    for line in (KERNEL_DIR / file).read_text().splitlines():
        if line.startswith("#"):
            break
        if line.startswith("//"):
            lines.append(line[2:].strip())
    return " ".join(lines)


def _python_path(named):
    """A header's path as a file: minitorch_gx/... and resnext/... from the
    repository root, ops/... optim/... nn/... cuda/... inside the package."""
    return REPO / named if named.startswith(("minitorch_gx/", "resnext/")) else PACKAGE / named


def _defined_names(path):
    """Top-level functions and classes, and Class.method for every method."""
    import ast
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{m.name}" for m in node.body
                         if isinstance(m, ast.FunctionDef))
    return names


def _is_defined(name, defined):
    import fnmatch
    if "*" in name:                       # batch_norm_*: at least one
        return bool(fnmatch.filter(defined, name))
    if name.startswith("_") and name not in defined:
        # "softmax_cross_entropy_forward / _backward": the same stem, another ending
        return any(d.endswith(name) for d in defined)
    return name in defined


@pytest.mark.parametrize("file", FILES)
def test_header_names_launchers_that_launch_this_file(file):
    header = _header(file)
    launchers = re.findall(r"Launchers?:\s*(minitorch_gx/cuda/\w+\.py)", header)
    assert launchers, f"{file}: the header names no launcher (\"Launcher: minitorch_gx/cuda/...\")"
    sources = []
    for launcher in launchers:
        path = REPO / launcher
        assert path.exists(), f"{file}: the header names {launcher}, which does not exist"
        sources.append(path.read_text())
        assert f'"{file}"' in sources[-1], f"{file}: {launcher} does not launch it"
    # every kernel of the file is launched, by name, from one of its launchers
    _, kernels = emulator.translate((KERNEL_DIR / file).read_text(), file)
    for kernel in kernels:
        assert any(f'"{kernel}"' in s for s in sources), \
            f"{file}: kernel {kernel} is launched from none of {launchers}"


@pytest.mark.parametrize("file", FILES)
def test_header_names_python_that_exists(file):
    header = _header(file)
    named = _NAMED.findall(header)
    assert named, f"{file}: the header names no Python file"
    for path_text, names in named:
        path = _python_path(path_text)
        assert path.exists(), f"{file}: the header names {path_text}, which does not exist"
        defined = _defined_names(path)
        for name in filter(None, re.split(r"\s*(?:/|\band\b)\s*", names or "")):
            assert _is_defined(name, defined), \
                f"{file}: the header names {path_text} {name}, which it does not define"


@pytest.mark.parametrize("file", FILES)
def test_header_names_tests_that_exist(file):
    tests = _TESTS.findall(_header(file))
    assert tests, f"{file}: the header names no test file"
    for test in tests:
        assert (REPO / test).exists(), f"{file}: the header names {test}, which does not exist"
