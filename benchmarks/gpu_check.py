"""Every GPU check of the CUDA backend in one run, sized for a lent H200 (under 8 minutes).

    python benchmarks/gpu_check.py                  # GPU machine; logs to $OUT or a temp dir
    python benchmarks/gpu_check.py --fetch-wheels   # here, with network: test wheels -> .whl/
    python benchmarks/gpu_check.py --smoke          # no GPU: the same stages, CPU-sized

Stages, each a subprocess with its own time limit, its output in <out>/<stage>.log:
  env      what the machine has (GPU, CuPy, PyTorch versions)
  tests    pytest, the GPU cases only: tests/ops/ and tests/optim/ with -k cupy (every
           kernel through CuPy against the NumPy reference, at ResNeXt's shapes
           too), tests/resnext/test_model_on_kernels.py (resnext50_32x4d
           forward/backward against the NumPy backend, training steps) and
           tests/cuda/test_compile.py (NVRTC builds of every kernel)
  sanitizer  NVIDIA's compute-sanitizer (memcheck, racecheck, initcheck, synccheck),
           one run per tool over the small-shape kernel tests, to set its verdict
           beside the emulator's (which finds every kernel clean)
  gpu_step benchmarks/gpu_step.py (the traced per-step cost table, each row's time
           measured with CUDA events beside its floor, the device's copy and sgemm rates)
  kernels  benchmarks/bench_kernels.py --batch 128 (each kernel beside PyTorch)
  train    benchmarks/bench_train.py --device gpu --batch 128 (img/s beside PyTorch), in
           fp32 and again with --tf32 on both sides
A summary goes to <out>/summary.txt; the exit code is non-zero if any stage failed.

The GPU machine has no network and may lack pytest/pillow/tqdm: run --fetch-wheels
here first and carry the ignored .whl/ folder; they are installed from it offline.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
NEEDED = ["pytest", "pillow", "tqdm"]  # what the test files import beyond the GPU stack


# The GPU tests: the kernel cases of the op and optimizer tests are the ones
# parametrised with the "cupy" implementation (tests/backends.py); the two
# whole files run entirely (their CPU cases are quick).
GPU_TEST_FILES = ["tests/ops", "tests/optim", "tests/cuda/test_compile.py",
                  "tests/resnext/test_model_on_kernels.py", "tests/cuda/test_small_kernels.py",
                  "tests/cuda/test_prefetch.py"]
GPU_TEST_SELECTION = ["-k", "cupy or test_compile.py or test_model_on_kernels.py or on_a_gpu"]


def stages(smoke):
    py = sys.executable
    if smoke:
        return [
            ("env", [py, "-c", ENV_REPORT], 60),
            ("tests", [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                       *GPU_TEST_SELECTION, *GPU_TEST_FILES], 120),
            ("kernels", [py, "benchmarks/bench_kernels.py", "--emulate", "--only", "sgd", "small",
                         "--json", "{out}/bench_kernels.json"], 300),
            ("train", [py, "benchmarks/bench_train.py", "--device", "cpu", "--arch", "resnext_mini",
                       "--batch", "2", "--image_size", "32", "--steps", "1", "--no_torch"], 120),
        ]
    return [
        ("env", [py, "-c", ENV_REPORT], 60),
        ("tests", [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--durations=10",
                   *GPU_TEST_SELECTION, *GPU_TEST_FILES], 140),
        *[(f"sanitizer-{tool}", ["compute-sanitizer", "--tool", tool, "--error-exitcode", "3",
                                 py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k",
                                 "cupy and not million and not resnext50", *SANITIZED_TESTS], 30)
          for tool in ("memcheck", "racecheck", "initcheck", "synccheck")],
        ("gpu_step", [py, "benchmarks/gpu_step.py"], 40),
        ("kernels", [py, "benchmarks/bench_kernels.py", "--batch", "128",
                     "--json", "{out}/bench_kernels.json"], 45),
        ("train", [py, "benchmarks/bench_train.py", "--device", "gpu", "--batch", "128",
                   "--steps", "5", "--warmup", "2"], 50),
        ("train-tf32", [py, "benchmarks/bench_train.py", "--device", "gpu", "--batch", "128",
                        "--steps", "5", "--warmup", "2", "--tf32"], 50),
    ]


# Small shapes only: under compute-sanitizer a kernel runs 10-100x slower.
SANITIZED_TESTS = ["tests/ops/test_basic.py", "tests/ops/test_pool.py", "tests/ops/test_loss.py",
                   "tests/optim/test_sgd.py", "tests/ops/test_norm.py"]


ENV_REPORT = """
import platform, sys
print("python", sys.version.split()[0], platform.machine())
try:
    import cupy
    print("cupy", cupy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())
    props = cupy.cuda.runtime.getDeviceProperties(0)
    print("device", props["name"].decode(), "sm_%d%d" % (props["major"], props["minor"]),
          "%.0f GiB" % (props["totalGlobalMem"] / 2**30), props["multiProcessorCount"], "SMs")
except Exception as e:
    print("cupy: not usable:", e)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.cuda.is_available())
except Exception as e:
    print("torch: not importable:", e)
"""


def fetch_wheels():
    """Download the test dependencies for the GPU machine (Python 3.12, x86-64) into .whl/."""
    WHEELS.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version",
           "3.12", "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
           "-d", str(WHEELS), *NEEDED]
    sys.exit(subprocess.call(cmd))


def ensure_test_dependencies(log):
    """Make pytest/pillow/tqdm importable from the carried .whl/ when they are missing."""
    missing = [m for m, mod in zip(NEEDED, ["pytest", "PIL", "tqdm"])
               if subprocess.call([sys.executable, "-c", f"import {mod}"],
                                  stderr=subprocess.DEVNULL) != 0]
    if not missing:
        return
    if not WHEELS.is_dir():
        log(f"missing {missing} and no .whl/ folder: run --fetch-wheels where there is network "
            f"and carry .whl")
        return
    # A wheel is a zip laid out as site-packages: unpacking it is enough for
    # `python -m pytest` (no pip, no network needed).
    target = WHEELS / "site"
    for wheel in sorted(WHEELS.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target),
                                                             os.environ.get("PYTHONPATH")]))
    log(f"missing {missing}: unpacked the wheels in .whl/ into {target}")


def _pump(stream, log_file, name):
    for line in stream:  # echo and log as it comes
        sys.stdout.write(f"[{name}] {line}")
        log_file.write(line)
        log_file.flush()


def run_stage(name, cmd, limit, out):
    cmd = [c.replace("{out}", str(out)) for c in cmd]
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.time()
    with open(out / f"{name}.log", "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        pump = threading.Thread(target=_pump, args=(proc.stdout, f, name), daemon=True)
        pump.start()
        try:
            proc.wait(timeout=limit)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = f"timed out after {limit} s"
        pump.join(timeout=5)
    return status, time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="no GPU: run the stages CPU-sized")
    p.add_argument("--fetch-wheels", action="store_true",
                   help="download pytest/pillow/tqdm wheels for the GPU machine into .whl/")
    p.add_argument("--only", nargs="+", help="run only these stages (env tests kernels train)")
    args = p.parse_args()
    if args.fetch_wheels:
        fetch_wheels()
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    summary = []

    def log(line):
        print(line, flush=True)
        summary.append(line)

    ensure_test_dependencies(log)
    failed = False
    for name, cmd, limit in stages(args.smoke):
        if args.only and name not in args.only:
            continue
        status, seconds = run_stage(name, cmd, limit, out)
        log(f"{name:8s} {status:28s} {seconds:6.0f} s")
        failed |= status != "ok"
    (out / "summary.txt").write_text("\n".join(summary) + "\n")
    print(f"logs in {out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
