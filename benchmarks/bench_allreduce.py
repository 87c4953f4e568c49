"""Allreduce time and bus bandwidth over 1, 2 and 4 ranks; optionally training
img/s on 1 and N ranks and the scaling efficiency.

    python benchmarks/bench_allreduce.py                      # launches mpirun -n 1, 2, 4 itself
    python benchmarks/bench_allreduce.py --ranks 1 2 --device gpu
    python benchmarks/bench_allreduce.py --train --arch resnext_mini --batch 16 --image_size 64
    mpirun -n 8 python benchmarks/bench_allreduce.py --device gpu   # started by mpirun: that N only

Started by hand, the script runs itself under ``mpirun -n N --worker`` for each
N of --ranks (the mpirun beside the interpreter, as the PyPI mpich wheel
installs it, else the one on PATH) and prints one table. Started by mpirun,
it measures that world size only.

What is timed: ``distributed.allreduce_inplace`` on a float32 array, the path
gradient buckets take (MPI_Iallreduce + Wait on CPU; NCCL, or MPI through
pinned host memory, on GPU). Per size: the slowest rank's mean over the timed
calls. algbw = bytes / time; busbw = algbw * 2 (N - 1) / N, the traffic per
link of a ring allreduce, comparable across N (NCCL's nccl-tests convention).
With one rank nothing travels: the time is the call overhead and busbw is 0.

--train times full training steps (forward, loss, backward, bucketed
allreduce, SGD) of a ResNeXt on synthetic data at --batch images per rank and
prints img/s over all ranks and efficiency = img/s(N) / (N * img/s(1)).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minitorch_gx import backend, distributed  # noqa: E402
from minitorch_gx.distributed import process_group  # noqa: E402

SIZES = [10 ** 3, 10 ** 4, 10 ** 5, 10 ** 6, 10 ** 7, 10 ** 8]  # bytes, 1 KB .. 100 MB


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4],
                   help="world sizes to launch (ignored under mpirun)")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="message sizes in bytes")
    p.add_argument("--train", action="store_true", help="also time training steps")
    p.add_argument("--arch", default="resnext50_32x4d")
    p.add_argument("--batch", type=int, default=16, help="images per rank per step")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def under_mpirun():
    return any(int(os.environ.get(v, "0") or 0) >= 1 for v in process_group._LAUNCHER_SIZE_VARS)


def find_mpirun():
    beside = Path(sys.executable).parent / "mpirun"
    if beside.exists():
        return str(beside)
    import shutil
    return shutil.which("mpirun") or shutil.which("mpiexec")


# --------------------------------------------------------------------------
# Worker: one rank of one world size
# --------------------------------------------------------------------------
def time_allreduce(ctx, nbytes, xp, sync):
    n = max(1, nbytes // 4)
    buf = xp.ones(n, xp.float32)
    distributed.allreduce_inplace(buf, ctx)  # also the warm-up
    if float(buf[0]) != ctx.world_size or float(buf[-1]) != ctx.world_size:
        raise RuntimeError(f"allreduce of {nbytes} bytes of ones gave {float(buf[0])}, "
                           f"expected {ctx.world_size}")
    buf.fill(0)  # zeros stay zeros however many calls follow
    calls = max(3, min(50, int(2e8 // nbytes)))  # the same count on every rank
    distributed.barrier(ctx)
    start = time.perf_counter()
    for _ in range(calls):
        distributed.allreduce_inplace(buf, ctx)
    sync()
    seconds = (time.perf_counter() - start) / calls
    if ctx.world_size > 1:
        seconds = ctx.comm.allreduce(seconds, op=_mpi_max())
    return {"bytes": n * 4, "calls": calls, "seconds": seconds,
            "algbw_GBps": n * 4 / seconds / 1e9,
            "busbw_GBps": n * 4 / seconds / 1e9 * 2 * (ctx.world_size - 1) / ctx.world_size}


def _mpi_max():
    from mpi4py import MPI
    return MPI.MAX


def time_training(ctx, args, xp, sync):
    import minitorch_gx as mt
    from minitorch_gx.functional import cross_entropy
    from minitorch_gx.optim import SGD
    from resnext.model import build_model

    model = build_model(args.arch, 1000, seed=0)
    if args.device == "gpu":
        model.to("gpu")
    model.train()
    opt = SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    distributed.broadcast_parameters(model, ctx=ctx)
    reducer = distributed.GradientAllreducer(model.parameters(), ctx=ctx)
    rng = numpy.random.default_rng(ctx.rank)
    x = mt.Tensor(xp.asarray(rng.standard_normal(
        (args.batch, 3, args.image_size, args.image_size)).astype(numpy.float32)))
    labels = xp.asarray(rng.integers(0, 1000, args.batch))

    def step():
        opt.zero_grad()
        cross_entropy(model(x), labels, label_smoothing=0.1).backward()
        reducer.synchronize()
        opt.step()

    for _ in range(2):  # warm-up: kernel compilation, scratch buffers, pools
        step()
    sync()
    distributed.barrier(ctx)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    if ctx.world_size > 1:
        seconds = ctx.comm.allreduce(seconds, op=_mpi_max())
    return {"arch": args.arch, "batch_per_rank": args.batch, "image_size": args.image_size,
            "step_seconds": seconds, "img_per_s": ctx.world_size * args.batch / seconds,
            "buckets": len(reducer.buckets)}


def worker(args):
    ctx = distributed.init(args.device)
    distributed.install_failure_handler(ctx)
    xp = backend.cupy if args.device == "gpu" else numpy
    sync = (lambda: backend.cupy.cuda.Device().synchronize()) if args.device == "gpu" else (lambda: None)
    result = {"world": ctx.world_size, "device": args.device, "transport": ctx.transport,
              "allreduce": [time_allreduce(ctx, b, xp, sync) for b in args.sizes]}
    if args.train:
        result["train"] = time_training(ctx, args, xp, sync)
    if ctx.rank == 0 and args.worker:  # for the launcher to read
        print("RESULT " + json.dumps(result), flush=True)
    return result


# --------------------------------------------------------------------------
# Launcher: one mpirun per world size, one table
# --------------------------------------------------------------------------
def launch(args, n):
    mpirun = find_mpirun()
    if mpirun is None:
        raise SystemExit("error: mpirun not found (pip install mpi4py mpich)")
    cmd = [mpirun, "-n", str(n), sys.executable, __file__, "--worker", "--device", args.device,
           "--sizes", *map(str, args.sizes), "--arch", args.arch, "--batch", str(args.batch),
           "--image_size", str(args.image_size), "--steps", str(args.steps)]
    if args.train:
        cmd.append("--train")
    # The same BLAS threads per rank in every run (enough for the largest N to
    # fill the cores), so that efficiency measures communication, not threading.
    threads = str(max(1, (os.cpu_count() or 1) // max(args.ranks)))
    env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"error: mpirun -n {n} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def print_tables(results):
    print(f"{'ranks':>5} {'transport':>16} {'bytes':>11} {'time (us)':>11} {'algbw GB/s':>11} "
          f"{'busbw GB/s':>11}")
    for r in results:
        for a in r["allreduce"]:
            # one rank moves nothing: only the call overhead is worth printing
            bw = (f"{a['algbw_GBps']:>11.3f} {a['busbw_GBps']:>11.3f}" if r["world"] > 1
                  else f"{'-':>11} {'-':>11}")
            print(f"{r['world']:>5} {r['transport']:>16} {a['bytes']:>11,} "
                  f"{a['seconds'] * 1e6:>11.1f} {bw}")
    trained = [r for r in results if "train" in r]
    if trained:
        base = next((r["train"]["img_per_s"] for r in trained if r["world"] == 1), None)
        t = trained[0]["train"]
        print(f"\ntraining {t['arch']}, {t['batch_per_rank']} images/rank, "
              f"{t['image_size']}x{t['image_size']}")
        print(f"{'ranks':>5} {'step (s)':>9} {'img/s':>9} {'efficiency':>11}")
        for r in trained:
            eff = f"{r['train']['img_per_s'] / (r['world'] * base):.1%}" if base else "-"
            print(f"{r['world']:>5} {r['train']['step_seconds']:>9.3f} "
                  f"{r['train']['img_per_s']:>9.2f} {eff:>11}")


def main():
    args = parse_args()
    if args.worker or under_mpirun():
        result = worker(args)
        if not args.worker and distributed.get_context().rank == 0:
            print_tables([result])
        return
    print(f"{os.cpu_count()} CPU cores; device {args.device}", flush=True)
    results = [launch(args, n) for n in args.ranks]
    print_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
