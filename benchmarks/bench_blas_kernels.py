"""How fast NumPy's OpenBLAS runs float32 GEMMs on each of its kernel sets.

    python benchmarks/bench_blas_kernels.py                          # own choice vs Haswell
    python benchmarks/bench_blas_kernels.py --cores Haswell,SkylakeX --rounds 8

OpenBLAS picks its kernels by the CPU it finds when NumPy loads it, unless
OPENBLAS_CORETYPE names them; it reads the variable once, so each arm is a
child process: "own" with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset
(OpenBLAS's own choice), and one per name in --cores, with that
OPENBLAS_CORETYPE. The arms alternate in ABBA order over --rounds rounds
(this shared machine's speed drifts within minutes); each child times
every shape's A @ B (median of 15 after 3 untimed) on OpenBLAS's threads
and prints GMAC/s. Printed per arm: the kernels it ran (``cpu.blas_core``)
and per shape the median over the rounds, with its ratio to "own". The
shapes: a large square GEMM, and three of resnext50_32x4d's at batch 32,
64x64 (a 1x1 convolution's, and a folded grouped convolution's per group).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

SHAPES = [(2048, 2048, 2048), (256, 128, 8192), (512, 1024, 512), (16, 144, 512)]

CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import minitorch_gx  # before NumPy, as train.py
import numpy
from minitorch_gx import cpu
rates = []
for m, k, n in json.loads(sys.argv[2]):
    rng = numpy.random.default_rng(0)
    a = rng.standard_normal((m, k), numpy.float32)
    b = rng.standard_normal((k, n), numpy.float32)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    rates.append(m * k * n / sorted(times)[7] / 1e9)
print(json.dumps({"core": cpu.blas_core(), "rates": rates}))
"""


def run_arm(core):
    """(kernels run, [GMAC/s per shape]) in a child with OPENBLAS_CORETYPE=core
    (None: unset, with OPENBLAS_L2_SIZE, for OpenBLAS's own choice)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    if core is not None:
        env["OPENBLAS_CORETYPE"] = core
    done = subprocess.run([sys.executable, "-c", CHILD, ROOT, json.dumps(SHAPES)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: the child with OPENBLAS_CORETYPE={core} failed: "
                 f"{done.stderr.strip().splitlines()[-1:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["core"], out["rates"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cores", default="Haswell",
                   help="comma-separated OPENBLAS_CORETYPE values to set against 'own'")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()
    cores = [c.strip() for c in args.cores.split(",")]
    if args.rounds < 1 or not all(c.isalnum() for c in cores):
        sys.exit("error: need --rounds >= 1 and --cores a comma-separated list of names "
                 "(e.g. Haswell,SkylakeX)")
    arms = {"own": None, **{c: c for c in cores}}
    names = list(arms)
    ran, rates = {}, {name: [] for name in names}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            ran[name], got = run_arm(arms[name])
            rates[name].append(got)
    print(f"float32 GEMM GMAC/s, {os.cpu_count()} cores, {args.rounds} ABBA rounds; "
          f"medians (ratio to own)")
    header = " ".join(f"{'x'.join(map(str, s)):>21s}" for s in SHAPES)
    print(f"{'arm':10s} {'kernels':10s} {header}")
    own = [statistics.median(r[i] for r in rates["own"]) for i in range(len(SHAPES))]
    for name in names:
        med = [statistics.median(r[i] for r in rates[name]) for i in range(len(SHAPES))]
        cells = " ".join(f"{m:13.1f} ({m / o:5.2f})" for m, o in zip(med, own))
        print(f"{name:10s} {ran[name] or 'not OpenBLAS':10s} {cells}")


if __name__ == "__main__":
    main()
